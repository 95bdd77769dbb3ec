"""Drive the running app in a real browser (headless Debian Chromium through playwright): upload photos,
run every view, wait for its output images, take screenshots. Used by the browser test and by
``scripts/make_app_screenshots.py``. Never runs ``playwright install``: it uses the system Chromium.
"""

from __future__ import annotations

import shutil
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWS = {  # tab element id -> (tab title, button, output gallery id, status id)
    "pca": ("PCA feature maps", "Show PCA", "pca-maps", "pca-status"),
    "clusters": ("Clusters", "Show clusters", "cl-maps", "cl-status"),
    "reconstruct": ("Predictor reconstructions", "Mask and predict", "rc-gallery", "rc-status"),
    "similarity": ("Patch similarity", "Compare", "sim-gallery", "sim-status"),
}


def chromium_path() -> str | None:
    p = Path(CHROMIUM)
    return str(p) if p.exists() else shutil.which("chromium")


def drive_app(
    url: str, photos: list[str], out_dir: str | Path, bad_file: str | None = None, timeout_ms: int = 60_000
) -> dict:
    """Run every view at ``url`` on ``photos``; returns the screenshots taken, the text of each view's
    status, the number of output images per view, requests that left this machine, and (with
    ``bad_file``) the error message the UI showed for it."""
    from playwright.sync_api import sync_playwright

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"screenshots": {}, "status": {}, "images": {}, "external_requests": []}
    local = ("http://127.0.0.1", "http://localhost", "data:", "blob:", "ws://127.0.0.1")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("request", lambda r: None if r.url.startswith(local) else result["external_requests"].append(r.url))
        page.goto(url)
        page.wait_for_selector("text=what a CAPI model sees", timeout=timeout_ms)
        page.locator("input[type=file]").first.set_input_files(photos)
        page.get_by_text(Path(photos[-1]).stem).first.wait_for(timeout=timeout_ms)
        for key, (tab, button, gallery, status) in VIEWS.items():
            page.get_by_role("tab", name=tab).click()
            page.get_by_role("button", name=button, exact=True).click()
            imgs = page.locator(f"#{gallery} img")
            imgs.first.wait_for(timeout=timeout_ms)
            page.wait_for_load_state("networkidle")
            result["images"][key] = imgs.count()
            result["status"][key] = page.locator(f"#{status}").inner_text()
            shot = out / f"app_{key}.png"
            page.locator(f"#tab-{key}").screenshot(path=str(shot))
            result["screenshots"][key] = shot
        # click a patch of the query image: the similarity view follows the click
        before = page.locator("#sim-status").inner_text()
        query = page.locator("#sim-query img")
        query.wait_for(timeout=timeout_ms)
        box = query.bounding_box()
        query.click(position={"x": box["width"] * 0.7, "y": box["height"] * 0.3})
        page.wait_for_function(
            "prev => { const t = document.querySelector('#sim-status').innerText;"
            " return t !== prev && t.startsWith('Query'); }",
            arg=before,
            timeout=timeout_ms,
        )
        result["status"]["similarity_click"] = page.locator("#sim-status").inner_text()
        if bad_file is not None:  # a fresh page holding only the bad file
            page.goto(url)
            page.wait_for_selector("text=what a CAPI model sees", timeout=timeout_ms)
            page.locator("input[type=file]").first.set_input_files([bad_file])
            page.get_by_text(Path(bad_file).stem).first.wait_for(timeout=timeout_ms)
            page.get_by_role("tab", name=VIEWS["pca"][0]).click()
            page.get_by_role("button", name=VIEWS["pca"][1], exact=True).click()
            toast = page.get_by_test_id("toast-text").first
            toast.wait_for(timeout=timeout_ms)
            result["error_message"] = toast.inner_text()
            page.screenshot(path=str(out / "app_error.png"))
        browser.close()
    return result
