"""Train the embedded default model and write it, with its model card and PCA pictures, into
capi_lab/weights/. One command reproduces it:

    python scripts/fetch_demo_data.py          # optional: more photos (Debian packages, foolbox)
    python scripts/build_default_model.py --max-steps 2000

It runs `python -m capi_lab.train --preset default --data demo-photos ...`, loads the teacher of the
final checkpoint, evaluates it, and writes capi_lab/weights/default.pt (a capi_lab model file with the
training provenance), capi_lab/weights/default_pca.png and capi_lab/weights/MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from capi_lab import load_pretrained  # noqa: E402
from capi_lab.data import demo_photos, eval_transform  # noqa: E402
from capi_lab.pca import pca_rgb  # noqa: E402
from capi_lab.pretrained import model_state, read_checkpoint  # noqa: E402

WEIGHTS = ROOT / "capi_lab" / "weights"


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import os

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def pca_figure(model, paths: list[Path], out: Path, size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    tf = eval_transform(size)
    images = [Image.open(p).convert("RGB") for p in paths]
    x = torch.stack([tf(im) for im in images])
    with torch.no_grad():
        fmaps = model(x)[2]
    joint, single = pca_rgb(list(fmaps), joint=True), pca_rgb(list(fmaps), joint=False)
    fig, axes = plt.subplots(3, len(paths), figsize=(2.2 * len(paths), 6.9))
    for i, im in enumerate(images):
        w, h = im.size
        s = min(w, h)
        axes[0, i].imshow(im.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((size, size)))
        axes[1, i].imshow(single[i].numpy(), interpolation="nearest")
        axes[2, i].imshow(joint[i].numpy(), interpolation="nearest")
        axes[0, i].set_title(paths[i].stem[:18], fontsize=8)
        for a in axes[:, i]:
            a.set_xticks([])
            a.set_yticks([])
    axes[1, 0].set_ylabel("PCA per image", fontsize=8)
    axes[2, 0].set_ylabel("PCA joint", fontsize=8)
    fig.suptitle(f"default model at {size} px: first 3 principal components of the patch features as RGB", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _figure_photos() -> list[Path]:
    return [
        p.path for p in demo_photos() if p.path.stem in ("astronaut", "chelsea", "coffee", "rocket", "grace_hopper")
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--output-dir", default="runs/default")
    ap.add_argument("--figure-only", action="store_true", help="only redraw default_pca.png from default.pt")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for capi_lab.train")
    args = ap.parse_args()
    if args.figure_only:
        pca_figure(load_pretrained("default"), _figure_photos(), WEIGHTS / "default_pca.png", size=128)
        return 0
    cmd = [sys.executable, "-m", "capi_lab.train", "--preset", "default", "--data", "demo-photos",
           "--output-dir", args.output_dir, "--max-steps", str(args.max_steps), "--log-every", "50",
           "--checkpoint-every", "500", *args.extra]  # fmt: skip
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    seconds = time.time() - t0
    ckpt = ROOT / args.output_dir / "checkpoints" / "last.ckpt"
    model = load_pretrained(ckpt)
    raw = read_checkpoint(ckpt)
    metrics = [json.loads(line) for line in (ROOT / args.output_dir / "metrics.jsonl").read_text().splitlines()]
    photos = demo_photos()
    meta = {
        "command": "python scripts/build_default_model.py --max-steps " + str(args.max_steps),
        "train_command": " ".join(["python", *cmd[1:]]),
        "steps": int(raw["step"]),
        "train_seconds": round(seconds),
        "hardware": hardware(),
        "torch": str(torch.__version__),
        "data": dict(Counter(p.source for p in photos)),
        "final_metrics": metrics[-1],
        "date": time.strftime("%Y-%m-%d"),
    }
    WEIGHTS.mkdir(exist_ok=True)
    from capi_lab.config import CAPIConfig

    torch.save(model_state(model, CAPIConfig.from_dict(raw["config"]), meta=meta), WEIGHTS / "default.pt")
    pca_figure(model, _figure_photos(), WEIGHTS / "default_pca.png", size=128)
    print(json.dumps({k: v for k, v in meta.items() if k != "final_metrics"}))
    print(f"wrote {WEIGHTS / 'default.pt'} ({(WEIGHTS / 'default.pt').stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
