"""Drive the running app in a real browser (headless Debian Chromium through playwright): upload photos,
run every view, wait for its output images, take screenshots. Used by the browser test and by
``scripts/make_app_screenshots.py``. Never runs ``playwright install``: it uses the system Chromium.
"""

from __future__ import annotations

import contextlib
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


LOCAL = ("http://127.0.0.1", "http://localhost", "data:", "blob:", "ws://127.0.0.1")


@contextlib.contextmanager
def _open_app(url: str, external: list[str], height: int, timeout_ms: int):
    """A headless Chromium page on the app at ``url``, loaded; every request that leaves this machine is
    appended to ``external``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": height})
        page.on("request", lambda r: None if r.url.startswith(LOCAL) else external.append(r.url))
        page.goto(url)
        page.wait_for_selector("text=what a CAPI model sees", timeout=timeout_ms)
        try:
            yield page
        finally:
            browser.close()


def drive_app(
    url: str, photos: list[str], out_dir: str | Path, bad_file: str | None = None, timeout_ms: int = 60_000
) -> dict:
    """Run every view at ``url`` on ``photos``; returns the screenshots taken, the text of each view's
    status, the number of output images per view, requests that left this machine, and (with
    ``bad_file``) the error message the UI showed for it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"screenshots": {}, "status": {}, "images": {}, "external_requests": []}
    with _open_app(url, result["external_requests"], 900, timeout_ms) as page:
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
    return result


def drive_runs(url: str, photos: list[str], out_dir: str | Path, timeout_ms: int = 60_000) -> dict:
    """The Runs view at ``url`` (its runs folder holding one trained run with snapshots): wait for the newest
    snapshot, move the step slider to the first one and see the pictures change, then send the run's checkpoint
    to model B and show the PCA view of ``photos`` side by side. Returns the screenshots, the snapshot status
    before and after the slider moved, the first picture's address before and after, whether the curves were
    drawn, the PCA status and image count with model B, and requests that left this machine."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"screenshots": {}, "external_requests": []}
    first_src = "() => document.querySelector('#snap-gallery img')?.getAttribute('src')"
    with _open_app(url, result["external_requests"], 1400, timeout_ms) as page:
        page.get_by_role("tab", name="Runs").click()
        page.locator("#snap-gallery img").first.wait_for(timeout=timeout_ms)
        page.wait_for_function(
            "() => document.querySelector('#snap-status').innerText.includes('step')", timeout=timeout_ms
        )
        page.wait_for_load_state("networkidle")
        result["curves_drawn"] = page.locator("#run-plot .js-plotly-plot").count() > 0
        result["snapshot_status_newest"] = page.locator("#snap-status").inner_text()
        result["first_picture_newest"] = page.evaluate(first_src)
        shot = out / "app_runs.png"
        page.locator("#tab-runs").screenshot(path=str(shot))
        result["screenshots"]["runs"] = shot
        # the step slider: a click at the far left of its track releases it at the first snapshot (step 0)
        track = page.locator("#snap-slider input[type=range]")
        box = track.bounding_box()
        track.click(position={"x": 1, "y": box["height"] / 2})
        page.wait_for_function(
            "() => document.querySelector('#snap-status').innerText.includes('snapshot 1 of')", timeout=timeout_ms
        )
        page.wait_for_function(f"prev => ({first_src})() !== prev", arg=result["first_picture_newest"],
                               timeout=timeout_ms)  # fmt: skip
        page.wait_for_load_state("networkidle")
        result["snapshot_status_first"] = page.locator("#snap-status").inner_text()
        result["first_picture_first"] = page.evaluate(first_src)
        shot = out / "app_runs_step0.png"
        page.locator("#tab-runs").screenshot(path=str(shot))
        result["screenshots"]["runs_step0"] = shot
        # the run's checkpoint as model B, then a view side by side
        page.get_by_role("button", name="Compare with it (model B)").click()
        page.wait_for_function("() => document.querySelector('#model-b textarea, #model-b input').value !== ''",
                               timeout=timeout_ms)  # fmt: skip
        result["model_b"] = page.locator("#model-b textarea, #model-b input").first.input_value()
        page.locator("input[type=file]").first.set_input_files(photos)
        page.get_by_text(Path(photos[-1]).stem).first.wait_for(timeout=timeout_ms)
        tab, button, gallery, status = VIEWS["pca"]
        page.get_by_role("tab", name=tab).click()
        page.get_by_role("button", name=button, exact=True).click()
        page.wait_for_function(
            "() => document.querySelector('#pca-status').innerText.includes('Side by side')", timeout=timeout_ms
        )
        page.locator(f"#{gallery} img").first.wait_for(timeout=timeout_ms)
        page.wait_for_load_state("networkidle")
        result["side_by_side_status"] = page.locator(f"#{status}").inner_text()
        result["side_by_side_images"] = page.locator(f"#{gallery} img").count()
        shot = out / "app_side_by_side.png"
        page.locator("#tab-pca").screenshot(path=str(shot))
        result["screenshots"]["side_by_side"] = shot
    return result
