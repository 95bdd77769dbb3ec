"""One picture per tutorial notebook for the README (docs/img/nb_*.png), drawn with matplotlib from the
same library calls the notebooks make.

    python scripts/make_notebook_pictures.py        # ~1 minute on a laptop CPU (trains a tiny CAPI briefly)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from capi_lab import explore  # noqa: E402
from capi_lab.config import MaskConfig  # noqa: E402
from capi_lab.explore import notebook as nbk  # noqa: E402
from capi_lab.explore import render  # noqa: E402
from capi_lab.masking import sample_mask  # noqa: E402
from capi_lab.sinkhorn import teacher_targets  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "img"


def _save(fig, name: str) -> None:
    path = OUT / name
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    print(f"{path}: {path.stat().st_size // 1024} KB")


def quickstart(model, images) -> None:
    enc = [explore.encode(model, im, 128) for im in images[:4]]
    pca = explore.pca_maps(enc)
    fig, axes = plt.subplots(2, 4, figsize=(8, 4.2))
    for i, e in enumerate(enc):
        axes[0, i].imshow(e.shown)
        axes[1, i].imshow(render.upscale(pca.joint[i], e.shown.size))
    for a in axes.flat:
        a.axis("off")
    fig.suptitle("00 quickstart: photos and the joint PCA of their patch features (default model)")
    _save(fig, "nb_00_quickstart.png")


def masking(model, images) -> None:
    enc = explore.encode(model, images[0], 224)
    h, w = enc.grid
    variants = [("random", False), ("block", False), ("inverse_block", False), ("inverse_block", True)]
    fig, axes = plt.subplots(2, 4, figsize=(9, 4.8))
    rng = np.random.default_rng(0)
    for i, (s, r) in enumerate(variants):
        cfg = MaskConfig(strategy=s, roll=r)
        axes[0, i].imshow(render.mask_picture(enc, sample_mask(h, w, cfg, np.random.default_rng(1))))
        axes[0, i].set_title(s.replace("_", " ") + (" + roll" if r else ""), fontsize=9)
        cover = np.mean([sample_mask(16, 16, cfg, rng) for _ in range(500)], axis=0)
        axes[1, i].imshow(cover, vmin=0, vmax=1, cmap="viridis")
    for a in axes.flat:
        a.axis("off")
    fig.suptitle("01 masking: one mask per strategy (top) and how often each position is masked (bottom)")
    _save(fig, "nb_01_masking.png")


def sinkhorn(model, images) -> None:
    encoded = [explore.encode(model, im.resize((64, 64)), 64) for im in images]
    logits = torch.stack([e.logits.reshape(-1, e.logits.shape[-1]) for e in encoded])
    pos = logits.shape[1] // 2
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for name, q in (
        ("softmax (no balancing)", torch.softmax(logits / 0.06, -1)),
        ("standard Sinkhorn", teacher_targets(logits, 0.06, 3, positionwise=False)),
        ("position-wise Sinkhorn", teacher_targets(logits, 0.06, 3, positionwise=True)),
    ):
        ax.plot(q[:, pos].sum(0).sort(descending=True).values.numpy(), label=name)
    ax.set(yscale="log", xlabel="prototype rank", ylabel="mass over the batch", ylim=(1e-6, 10))
    ax.set_title(f"02 Sinkhorn: mass per prototype at one patch position ({len(images)} photos)", fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, "nb_02_sinkhorn.png")


def prototypes(model, images) -> None:
    encoded = [explore.encode(model, im, 128) for im in images]
    cl = explore.cluster_maps(encoded)
    colors = render.palette(cl.usage, cl.num_clusters)
    gallery = render.cluster_gallery(encoded, cl, top=4, per_cluster=8)
    fig = plt.figure(figsize=(9, 4.6))
    for i in range(3):
        ax = fig.add_subplot(2, 3, i + 1)
        ax.imshow(render.cluster_map(encoded[i], cl.assignments[i], colors))
        ax.axis("off")
    ax = fig.add_subplot(2, 1, 2)
    ax.imshow(render.mosaic([g for g, _ in gallery], columns=2, pad=6))
    ax.axis("off")
    ax.set_title("most confident patches of the 4 most used prototypes", fontsize=9)
    fig.suptitle(f"03 prototypes: cluster maps ({len(cl.usage)} of {cl.num_clusters} prototypes used)")
    _save(fig, "nb_03_prototypes.png")


def training() -> None:
    from capi_lab import train

    out = Path(tempfile.mkdtemp(prefix="capi_nbpic_"))
    data = "fashion-mnist" if Path("/usr/share/datasets/fashion-mnist").is_dir() else "demo-photos"
    args = "--preset tiny --max-steps 200 --batch-size 64 --image-size 28 --log-every 5 --num-workers 0".split()
    train.main([*args, "--data", data, "--output-dir", str(out)])
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = [r["step"] for r in m]
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
    axes[0].plot(step, [r["capi_loss"] for r in m], label="CAPI loss")
    axes[0].plot(step, [r["clustering_loss"] for r in m], label="clustering loss")
    axes[0].legend(fontsize=8)
    axes[1].plot(step, [r["target_entropy"] for r in m])
    axes[1].set_title("target entropy", fontsize=9)
    axes[2].plot(step, [r["prototypes_used"] for r in m])
    axes[2].set_title("prototypes used", fontsize=9)
    for a in axes:
        a.set_xlabel("step")
    fig.suptitle(f"04 training dynamics: tiny CAPI, 200 steps on {data}", y=1.06)
    _save(fig, "nb_04_training_dynamics.png")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    model = nbk.default_model()
    images = nbk.photos(8)
    quickstart(model, images)
    masking(model, images)
    sinkhorn(model, images)
    prototypes(model, images)
    training()


if __name__ == "__main__":
    main()
