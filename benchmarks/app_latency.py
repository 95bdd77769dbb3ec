"""Latency of the app's four views and its start-up time (a benchmark, not a test).

    python benchmarks/app_latency.py                 # default model, one 224 px photo, + ViT-L/14 timings
    python benchmarks/app_latency.py --no-vitl

Prints JSON lines: per model and resolution, the median time of all four views for one image after
warm-up (each view's own median too; the PNG encoding Gradio does is included); then the time from
``python app/main.py`` to the page answering.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

import capi_lab

ROOT = Path(__file__).resolve().parent.parent


def _png(result) -> None:
    """Encode every picture as Gradio would (PNG) so that cost is counted."""
    import io

    from PIL import Image

    for item in result if isinstance(result, (list, tuple)) else [result]:
        if isinstance(item, list):
            _png(item)
        elif isinstance(item, tuple) and item and isinstance(item[0], Image.Image):
            item[0].save(io.BytesIO(), format="png")


def time_views(app, model, name: str, resolution: int, repeats: int) -> dict:
    wb = app.Workbench(model, name)
    photo = [str(app.EXAMPLES[0])]
    views = {
        "pca": lambda: app.pca_view(wb, photo, resolution, 4),
        "clusters": lambda: app.clusters_view(wb, photo, resolution, False, 12),
        "reconstruct": lambda: app.reconstruct_view(wb, photo, 0, resolution),
        "similarity": lambda: app.similarity_view(wb, photo, 0, 1, 1, resolution),
    }
    for fn in views.values():  # warm-up
        _png(fn())
    per_view = {k: [] for k in views}
    totals = []
    for _ in range(repeats):
        wb._cache.clear()  # a new image each time: encoding is counted
        t_all = time.perf_counter()
        for k, fn in views.items():
            t0 = time.perf_counter()
            _png(fn())
            per_view[k].append(time.perf_counter() - t0)
        totals.append(time.perf_counter() - t_all)
    return {
        "model": name,
        "resolution": resolution,
        "all_four_views_s_median": round(statistics.median(totals), 3),
        **{f"{k}_s": round(statistics.median(v), 3) for k, v in per_view.items()},
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


def time_startup() -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app" / "main.py"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while time.perf_counter() - t0 < 120:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        ready = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"app_ready_s": round(ready, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-vitl", action="store_true", help="skip the authors' ViT-L/14 architecture")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from app import main as app

    print(json.dumps(time_views(app, capi_lab.load_pretrained("default"), "default", 224, args.repeats)), flush=True)
    if not args.no_vitl:
        vitl = capi_lab.create_model("vit_l14").eval()  # random weights: timing only
        for res in (224, 448):
            print(json.dumps(time_views(app, vitl, "vit_l14 (random weights)", res, 3)), flush=True)
    print(json.dumps(time_startup()), flush=True)


if __name__ == "__main__":
    main()
