"""Screenshots of the app's views for the README (docs/img/app_*.png), taken in headless Chromium.

    python scripts/make_app_screenshots.py                       # trains the README's quick start for the Runs view
    python scripts/make_app_screenshots.py --run runs/quickstart  # or shows this run folder

Starts the app on the default model on a free port, uploads three example photos, runs every view
(app/browser_check.py), then opens the Runs view on a training run (its newest snapshot and step 0) and
shows the run's checkpoint side by side with the default model; saves each panel as a small PNG (downscaled,
256-colour palette).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


QUICKSTART = ["--preset", "tiny", "--data", "demo-photos", "--max-steps", "150", "--image-size", "32",
              "--batch-size", "32", "--log-every", "10"]  # fmt: skip
"""The README's quick start (its <!-- quickstart --> command), the run the Runs view shows by default."""


def main(out_dir: Path = ROOT / "docs" / "img", width: int = 720, run: Path | None = None) -> None:
    import capi_lab

    sys.path.insert(0, str(ROOT))
    from app import browser_check as browser
    from app import main as app

    with tempfile.TemporaryDirectory() as tmp:
        if run is None:
            from capi_lab.train import main as train

            run = Path(tmp) / "runs" / "quickstart"
            print(f"training the README's quick start into {run} for the Runs view (about a minute)")
            if train([*QUICKSTART, "--output-dir", str(run)]) != 0:
                raise SystemExit("error: the quick-start run failed")
        else:  # alone in a runs folder, so that the Runs view opens on it
            (Path(tmp) / "runs").mkdir()
            (Path(tmp) / "runs" / run.name).symlink_to(run.resolve(), target_is_directory=True)
            run = Path(tmp) / "runs" / run.name
        demo = app.build_demo(capi_lab.load_pretrained("default"), "default", runs_dir=str(run.parent))
        demo.queue().launch(prevent_thread_lock=True, quiet=True, **app.launch_kwargs(port=None))
        try:
            photos = [str(p) for p in app.EXAMPLES if p.stem in ("astronaut", "coffee", "chelsea")]
            shots = browser.drive_app(demo.local_url, photos, tmp)["screenshots"]
            shots.update(browser.drive_runs(demo.local_url, photos[:2], tmp)["screenshots"])
            out_dir.mkdir(parents=True, exist_ok=True)
            for key, path in shots.items():
                img = Image.open(path).convert("RGB")
                img = img.resize((width, round(img.height * width / img.width)), Image.Resampling.LANCZOS)
                dest = out_dir / f"app_{key}.png"
                img.quantize(256, method=Image.Quantize.MEDIANCUT).save(dest, optimize=True)
                print(f"{dest.relative_to(ROOT)}: {img.width}x{img.height}, {dest.stat().st_size // 1024} KB")
        finally:
            demo.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=None, help="a training run folder with snapshots for the Runs view")
    args = ap.parse_args()
    if args.run is not None and not (args.run / "snapshots" / "index.jsonl").is_file():
        raise SystemExit(f"error: --run {args.run}: no snapshots/index.jsonl there (train with --snapshot-every)")
    main(run=args.run)
