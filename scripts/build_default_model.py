"""Train the embedded default model, measure it, and write it with its metrics and PCA pictures into
capi_lab/weights/. One command reproduces it:

    python scripts/fetch_demo_data.py          # the photos and cut-outs it is trained on (Debian packages, foolbox)
    python scripts/build_default_model.py      # CPU: ~40 minutes on 2 cores
    python scripts/build_default_model.py --accelerator cuda --max-steps 20000   # the GPU recipe

It runs `python -m capi_lab.train --preset default --data composite ...` (tuxpaint cut-outs pasted on the demo
photos, only the train side of the seeded split that seg-knn tests on), loads the teacher of the final checkpoint
and measures it on data it was not trained on (``--report-only`` measures the shipped file again):

* k-NN segmentation of the generated tuxpaint scenes (held-out cut-outs on held-out photos), against a randomly
  initialised model of the same shape;
* the predictor's agreement with the teacher's cluster on held-out photos at the training resolution (training
  masks, top-1 and top-5, with chance levels);
* Fashion-MNIST k-NN (a domain it never saw), against the same random model;
* PCA maps of the app's 7 example photos and of 5 held-out photos (``default_pca.png``).

It writes capi_lab/weights/default.pt (a capi_lab model file with the training provenance and these metrics),
default_metrics.json and default_pca.png; MODEL_CARD.md quotes them.
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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from capi_lab import load_pretrained  # noqa: E402
from capi_lab.data import cache_dir, demo_photo_paths, demo_photos, eval_transform, stamp_split  # noqa: E402
from capi_lab.explore import example_photos  # noqa: E402
from capi_lab.explore.pca import pca_rgb  # noqa: E402
from capi_lab.pretrained import DEFAULT_MODEL, model_state, read_checkpoint  # noqa: E402

WEIGHTS = ROOT / "capi_lab" / "weights"
TRAIN_FLAGS = ["--preset", "default", "--data", "composite"]


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import os

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def held_out_photos(seed: int = 0) -> list[Path]:
    """Demo photos on the test side of the cut-out split: never seen by a model trained on ``composite``."""
    return stamp_split(cache_dir() / "demo-data" / "tuxpaint", demo_photo_paths(), "test", seed)[2]


def random_twin(model, seed: int = 0):
    """A randomly initialised model of the same shape (the baseline every target is measured against)."""
    from capi_lab.model.capi import CAPIModel

    torch.manual_seed(seed)
    twin = CAPIModel(model.config, student_head=True, clustering_head=True).eval()
    twin.image_size = model.image_size
    return twin


def square(img, size: int):
    """Shorter side to ``size`` (bicubic), centre crop: the training resolution's view of a photo."""
    from PIL import Image

    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def predictor_agreement(model, paths: list[Path], size: int, masks_per_image: int = 4) -> dict[str, float]:
    """Mean top-1 / top-5 agreement of the predictor's cluster with the teacher's, over masked patches of the
    training masks (the run's mask settings), ``masks_per_image`` seeds each."""
    from PIL import Image

    from capi_lab.explore import reconstruct

    top1, top5 = [], []
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            img = square(im.convert("RGB"), size)
        for s in range(masks_per_image):
            rec, _ = reconstruct(model, img, size, seed=1000 * i + s)
            top1.append(rec.top1)
            top5.append(rec.top5)
    k = model.config.num_prototypes
    return {"top1": float(np.mean(top1)), "top5": float(np.mean(top5)), "chance_top1": 1 / k, "chance_top5": 5 / k,
            "images": len(paths), "masks_per_image": masks_per_image}  # fmt: skip


def fmnist_knn(model) -> float:
    from capi_lab.evaluation import knn_accuracy
    from capi_lab.evaluation.datasets import load_labeled
    from capi_lab.features import extract_features

    splits = load_labeled("fashion-mnist", seed=0, limit_train=10000)
    tr, te = (
        extract_features(model, s, model.image_size, 256, keep_patches=False) for s in (splits.train, splits.test)
    )
    return knn_accuracy(tr.global_repr, splits.train_labels, te.global_repr, splits.test_labels, 20, 0.07)


def measure(model, seed: int = 0) -> dict:
    from capi_lab.data import DataError
    from capi_lab.evaluation.segmentation import seg_knn_miou, tuxpaint_sets

    size = model.image_size
    twin = random_twin(model, seed)
    out: dict = {"image_size": size}
    try:
        train, test = tuxpaint_sets(size, 300, 150, seed)
        out["seg_knn"] = {name: seg_knn_miou(m, train, test) for name, m in (("model", model), ("random", twin))}
        out["seg_knn"]["ratio"] = out["seg_knn"]["model"]["miou"] / out["seg_knn"]["random"]["miou"]
        photos = held_out_photos(seed)
        out["held_out_photos"] = len(photos)
        out["agreement"] = predictor_agreement(model, photos, size)
    except DataError as e:
        print(f"seg-knn and agreement left out: {e}")
    try:
        out["fmnist_knn"] = {"model": fmnist_knn(model), "random": fmnist_knn(twin)}
    except DataError as e:
        print(f"Fashion-MNIST left out: {e}")
    return out


def pca_figure(model, paths: list[Path], out: Path, size: int, held_out: int) -> None:
    """Input, per-image PCA and joint PCA of each photo; the last ``held_out`` columns were never trained on."""
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
    fig, axes = plt.subplots(3, len(paths), figsize=(1.9 * len(paths), 6.2))
    for i, im in enumerate(images):
        axes[0, i].imshow(square(im, size))
        axes[1, i].imshow(single[i].numpy(), interpolation="nearest")
        axes[2, i].imshow(joint[i].numpy(), interpolation="nearest")
        unseen = i >= len(paths) - held_out
        axes[0, i].set_title(("(unseen) " if unseen else "") + paths[i].stem[:16], fontsize=7,
                             color="tab:red" if unseen else "black")  # fmt: skip
        for a in axes[:, i]:
            a.set_xticks([])
            a.set_yticks([])
    axes[1, 0].set_ylabel("PCA per image", fontsize=8)
    axes[2, 0].set_ylabel("PCA joint", fontsize=8)
    fig.suptitle(
        f"default model at {size} px: first 3 principal components of the patch features as RGB "
        f"(the {held_out} photos in red were never trained on)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def figure_photos(n_held_out: int = 5) -> tuple[list[Path], int]:
    examples = example_photos()
    unseen = held_out_photos()
    rng = np.random.default_rng(0)
    picked = [unseen[i] for i in sorted(rng.choice(len(unseen), min(n_held_out, len(unseen)), replace=False))]
    return examples + picked, len(picked)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-steps", type=int, default=4000)
    ap.add_argument("--output-dir", default="runs/default")
    ap.add_argument("--accelerator", default="cpu", help="cpu, or cuda for the GPU recipe")
    ap.add_argument("--report-only", action="store_true", help="measure the shipped default.pt again, redraw")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for capi_lab.train")
    args = ap.parse_args()
    if args.report_only:
        model = load_pretrained("default")
        paths, held = figure_photos()
        pca_figure(model, paths, WEIGHTS / "default_pca.png", 128, held)
        metrics = measure(model)
        (WEIGHTS / "default_metrics.json").write_text(json.dumps(metrics, indent=1))
        print(json.dumps(metrics))
        return 0
    cmd = [sys.executable, "-m", "capi_lab.train", *TRAIN_FLAGS, "--output-dir", args.output_dir,
           "--max-steps", str(args.max_steps), "--accelerator", args.accelerator, "--log-every", "50",
           "--checkpoint-every", "250", *args.extra]  # fmt: skip
    if args.accelerator != "cpu":
        cmd.append("--compile")
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    seconds = time.time() - t0
    ckpt = ROOT / args.output_dir / "checkpoints" / "last.ckpt"
    model = load_pretrained(ckpt)
    raw = read_checkpoint(ckpt)
    metrics_log = [json.loads(line) for line in (ROOT / args.output_dir / "metrics.jsonl").read_text().splitlines()]
    extra = f" --extra {' '.join(args.extra)}" if args.extra else ""
    meta = {
        "command": f"python scripts/build_default_model.py --max-steps {args.max_steps} --accelerator "
        f"{args.accelerator}{extra}",
        "train_command": " ".join(["python", *cmd[1:]]),
        "steps": int(raw["step"]),
        "train_seconds": round(seconds),
        "hardware": hardware(),
        "torch": str(torch.__version__),
        "data": dict(Counter(p.source for p in demo_photos())),
        "final_metrics": metrics_log[-1],
        "date": time.strftime("%Y-%m-%d"),
    }
    WEIGHTS.mkdir(exist_ok=True)
    from capi_lab.config import CAPIConfig

    metrics = measure(model)
    meta["evaluation"] = metrics
    torch.save(model_state(model, CAPIConfig.from_dict(raw["config"]), meta=meta), DEFAULT_MODEL)
    (WEIGHTS / "default_metrics.json").write_text(json.dumps(metrics, indent=1))
    paths, held = figure_photos()
    pca_figure(model, paths, WEIGHTS / "default_pca.png", 128, held)
    print(json.dumps({k: v for k, v in meta.items() if k != "final_metrics"}))
    print(f"wrote {DEFAULT_MODEL} ({DEFAULT_MODEL.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
