"""Screenshots of the app's four views for the README (docs/img/app_*.png), taken in headless Chromium.

    python scripts/make_app_screenshots.py

Starts the app on the default model on a free port, uploads three example photos, runs every view
(app/browser_check.py), and saves each view's panel as a small PNG (downscaled, 256-colour palette).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main(out_dir: Path = ROOT / "docs" / "img", width: int = 720) -> None:
    import capi_lab

    sys.path.insert(0, str(ROOT))
    from app import browser_check as browser
    from app import main as app

    demo = app.build_demo(capi_lab.load_pretrained("default"), "default")
    demo.queue().launch(prevent_thread_lock=True, quiet=True, **app.launch_kwargs(port=None))
    try:
        photos = [str(p) for p in app.EXAMPLES if p.stem in ("astronaut", "coffee", "chelsea")]
        with tempfile.TemporaryDirectory() as tmp:
            shots = browser.drive_app(demo.local_url, photos, tmp)["screenshots"]
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
    main()
