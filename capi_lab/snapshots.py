"""Snapshots during training: what the teacher sees in a fixed set of probe images, every N steps.

    python -m capi_lab.train --preset tiny --data fashion-mnist --max-steps 300              # on by default
    python -m capi_lab.train ... --snapshot-every 50 --snapshot-images my_probe_photos/
    python -m capi_lab.train ... --snapshot-every 0                                          # off

Each snapshot is a folder ``DIR/snapshots/step_0000300/`` with, for every probe image, three maps at the patch
grid (one pixel a patch: tiny files that a viewer blows up with sharp patch edges and lays over
``DIR/snapshots/images/NAME.png`` at any opacity):

* ``pca_NAME.png`` — the joint PCA of the teacher's patch tokens over all probe images (one colour, one meaning,
  in every image of the snapshot);
* ``clusters_NAME.png`` — each patch's teacher cluster, coloured by a PCA of the prototype vectors (similar
  prototypes get similar colours);
* ``predict_NAME.png`` — a fixed training mask per image (the run's strategy and ratio, seeded): at each masked
  patch green when the predictor's top cluster is the teacher's, yellow when the teacher's is in its top 5, red
  otherwise; visible patches grey;

plus ``numbers.npz`` (the arrays behind the maps) and ``snapshot.json`` (per image: predictor top-1/top-5
agreement, clusters used, mean assignment entropy; the joint PCA's explained variance); the run's last snapshot
also gets ``overview.png`` (all of them in one picture; :func:`overview` draws it for any snapshot).
``DIR/snapshots/index.jsonl`` has one line per snapshot with the aggregates (``snapshot/pred_top1`` ...), which
also go to the run's loggers (TensorBoard, CSV); ``metrics.jsonl`` keeps one line per logged step. A resumed run
cuts the index back to its step. By default a run snapshots at step 0, every :func:`snapshot_interval` steps and
at its end; a snapshot of ``tiny`` costs ~0.05 s on a 2-core CPU (benchmarks/snapshot_cost.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from capi_lab import explore as ex
from capi_lab.checkpoint import read_jsonl, truncate_metrics
from capi_lab.config import ConfigError, MaskConfig
from capi_lab.data import to_input
from capi_lab.explore import render as rd
from capi_lab.explore.pca import joint_pca
from capi_lab.masking import sample_mask
from capi_lab.model.capi import CAPIModel

log = logging.getLogger("capi_lab.train")  # shown with the training log

SNAPSHOTS_PER_RUN = 20
"""Snapshots a long run takes by default (besides the one at step 0): every ``ceil(max_steps / 20)`` steps."""
MIN_SNAPSHOT_INTERVAL = 50
"""Fewest steps between two default snapshots: a snapshot costs a few small forward passes (~0.05 s for ``tiny``
on a 2-core CPU, a third of a training step of batch 32), so at 50 steps apart the snapshots of the README's quick
start take ~1 % of its time (benchmarks/snapshot_cost.py) instead of the ~5 % that 20 per run would."""
MAX_PROBE_IMAGES = 8
"""Probe images used from a folder (the first, by name)."""
SHOWN_SIDE = 192
"""Side, in pixels, of the probe photos written to ``snapshots/images`` (what a viewer lays the maps over)."""
OVERVIEW_SIDE = 128
"""Side of each tile of ``overview.png`` (maps blown up with sharp patch edges)."""
AGREE_COLORS = {"top1": (40, 170, 60), "top5": (235, 190, 40), "miss": (210, 50, 40), "visible": (70, 70, 70)}
"""Colours of the predictor map: top-1 hit, in the top 5, miss, and patches the encoder saw."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def snapshot_interval(every: int | None, max_steps: int) -> int:
    """Steps between snapshots: ``every`` (0: off), or by default :data:`SNAPSHOTS_PER_RUN` over the run but at
    least :data:`MIN_SNAPSHOT_INTERVAL` steps apart (a run also snapshots at step 0 and at its last step)."""
    if every is None:
        return max(MIN_SNAPSHOT_INTERVAL, math.ceil(max_steps / SNAPSHOTS_PER_RUN))
    if every < 0:
        raise ConfigError(f"--snapshot-every must be >= 0 (0: no snapshots), got {every}")
    return every


def probe_paths(images: str | None) -> list[Path]:
    """The probe images: the bundled example photos, or the first :data:`MAX_PROBE_IMAGES` images of a folder."""
    if images is None:
        return ex.example_photos()
    folder = Path(images)
    if not folder.is_dir():
        raise ConfigError(f"--snapshot-images {images!r} is not a folder; give a folder of a few photos")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ConfigError(
            f"--snapshot-images {images!r} holds no image ({', '.join(IMAGE_SUFFIXES)}); add a few photos to it"
        )
    return paths[:MAX_PROBE_IMAGES]


def _stem(path: Path, taken: set[str]) -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem) or "image"
    name, i = stem, 1
    while name in taken:
        i += 1
        name = f"{stem}_{i}"
    taken.add(name)
    return name


def square_crop(image: Image.Image, side: int) -> Image.Image:
    """The centre square of ``image``, resized to ``side`` (a probe is seen as a training crop is)."""
    w, h = image.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return image.crop(box).resize((side, side), Image.Resampling.BICUBIC)


def probe_masks(n: int, grid: int, mask: MaskConfig, seed: int) -> np.ndarray:
    """``[n, grid, grid]`` fixed masks of the run's strategy and ratio (the same count in each; a grid too
    small for the run's mask gets random halves)."""
    cfg = MaskConfig(**{**vars(mask), "prediction_subsampling": 1.0})
    try:
        return np.stack([sample_mask(grid, grid, cfg, np.random.default_rng(seed + i)) for i in range(n)])
    except ValueError:
        half = max(1, grid * grid // 2)
        out = np.zeros((n, grid * grid), bool)
        for i in range(n):
            out[i, np.random.default_rng(seed + i).permutation(grid * grid)[:half]] = True
        return out.reshape(n, grid, grid)


class Snapshotter:
    """The probe images, read once; ``snapshotter(model, step)`` writes one snapshot and returns its aggregates.
    Probes are centre squares at the training resolution, so one batched forward sees them all."""

    def __init__(
        self,
        out_dir: str | Path,
        images: str | None,
        resolution: int,
        patch_size: int,
        mask: MaskConfig,
        seed: int = 0,
    ):
        self.root = Path(out_dir) / "snapshots"
        self.resolution = resolution
        try:
            loaded, self.notes = ex.load_images(probe_paths(images), max_images=MAX_PROBE_IMAGES)
        except ex.InputError as e:
            raise ConfigError(f"--snapshot-images: {e}") from None
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        taken: set[str] = set()
        self.names = [_stem(Path(li.name), taken) for li in loaded]
        crops = [square_crop(li.image, resolution) for li in loaded]
        self.inputs = torch.stack([to_input(c) for c in crops])
        self.masks = probe_masks(len(crops), resolution // patch_size, mask, seed)
        for name, crop in zip(self.names, crops, strict=True):  # what overview() and the Runs view show
            crop.resize((SHOWN_SIDE, SHOWN_SIDE), Image.Resampling.BICUBIC).save(self.root / "images" / f"{name}.png")

    def truncate(self, step: int) -> None:
        """Drop the index lines after ``step`` (a resumed run writes them again)."""
        truncate_metrics(self.root / "index.jsonl", step)

    @torch.inference_mode()
    def __call__(self, model: CAPIModel, step: int, with_overview: bool = False) -> dict[str, float]:
        """Write the snapshot of ``step`` (and its ``overview.png`` when ``with_overview``); its aggregates."""
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            results = ex.reconstruct_batch(model, self.inputs, self.masks)
        finally:
            model.train(was_training)
        recs = [r for r, _, _ in results]
        feats = [f for _, f, _ in results]
        if not all(bool(torch.isfinite(f).all()) and bool(torch.isfinite(lg).all()) for _, f, lg in results):
            # a diverged model (the NaN guard stops the run a step or two later): nothing worth a picture
            log.warning("snapshot at step %d skipped: the teacher's features are NaN/inf", step)
            return {}
        joint_maps, ratio = joint_pca(feats)
        joint = [m.numpy() for m in joint_maps]
        colors = rd.similarity_palette(ex.prototypes(model))
        probs = [torch.softmax(lg / ex.TEACHER_TEMPERATURE, -1) for _, _, lg in results]
        entropy = [float(-torch.special.xlogy(q, q).sum(-1).mean()) for q in probs]

        folder = self.root / f"step_{step:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        per_image, arrays = {}, {}
        for name, rec, pca, ent in zip(self.names, recs, joint, entropy, strict=True):
            maps = {"pca": pca, "clusters": colors[rec.teacher], "predict": agreement_map(rec)}
            for kind, a in maps.items():  # at the patch grid: tiny files, blown up by whoever shows them
                rd.to_pil(a).save(folder / f"{kind}_{name}.png", compress_level=1)
            per_image[name] = {
                "pred_top1": rec.top1,
                "pred_top5": rec.top5,
                "clusters_used": int(np.unique(rec.teacher).size),
                "entropy": ent,
            }
            arrays[f"pca_{name}"] = pca.astype(np.float16)
            arrays[f"teacher_{name}"] = rec.teacher.astype(np.int32)
            arrays[f"predicted_{name}"] = rec.predicted.astype(np.int32)
            arrays[f"mask_{name}"] = rec.mask
        arrays["prototype_colors"] = colors
        np.savez(folder / "numbers.npz", **arrays)
        n = len(recs)
        used = np.unique(np.concatenate([r.teacher.ravel() for r in recs])).size
        summary = {
            "snapshot/pred_top1": sum(r.top1 for r in recs) / n,
            "snapshot/pred_top5": sum(r.top5 for r in recs) / n,
            "snapshot/clusters_used": int(used),
            "snapshot/entropy": sum(entropy) / n,
            "snapshot/pca_top3_variance": float(ratio[:3].sum()),
        }
        record = {
            "step": step,
            "folder": folder.name,
            "resolution": self.resolution,
            "images": self.names,
            "num_prototypes": int(colors.shape[0]),
            **summary,
            "seconds": time.perf_counter() - t0,
            "per_image": per_image,
            "explained_variance": [float(v) for v in ratio],
        }
        (folder / "snapshot.json").write_text(json.dumps(record, indent=1))
        if with_overview:
            overview(folder).save(folder / "overview.png", compress_level=1)
        with (self.root / "index.jsonl").open("a") as f:
            f.write(json.dumps({k: v for k, v in record.items() if k != "per_image"}) + "\n")
        return {**summary, "snapshot/seconds": record["seconds"]}


def overview(folder: str | Path) -> Image.Image:
    """One picture of a snapshot folder (``.../snapshots/step_XXXXXXX``): per probe image a row of the photo, the
    joint PCA, the teacher's clusters over the photo and the predictor's hits, at :data:`OVERVIEW_SIDE` px a tile.
    Drawn from the folder's small PNGs (the trainer writes it only for a run's last snapshot; this draws any)."""
    folder = Path(folder)
    record = json.loads((folder / "snapshot.json").read_text())
    size = (OVERVIEW_SIDE, OVERVIEW_SIDE)
    rows = []
    for name in record["images"]:
        photo = Image.open(folder.parent / "images" / f"{name}.png").convert("RGB")
        photo = photo.resize(size, Image.Resampling.BICUBIC)
        big = {
            k: rd.upscale(np.asarray(Image.open(folder / f"{k}_{name}.png").convert("RGB")), size)
            for k in ("pca", "clusters", "predict")
        }
        rows.append(rd.row([photo, big["pca"], rd.blend(photo, big["clusters"], 0.7), big["predict"]]))
    titles = ["step " + str(record["step"]), "joint PCA", "teacher clusters", "predictor hit/top5/miss"]
    return rd.stack([rd.header(titles, OVERVIEW_SIDE), *rows])


def agreement_map(rec: ex.Reconstruction) -> np.ndarray:
    """``[h, w, 3]`` uint8: the predictor's hits and misses on the masked patches (:data:`AGREE_COLORS`)."""
    out = np.zeros((*rec.mask.shape, 3), np.uint8)
    out[:] = AGREE_COLORS["visible"]
    hit = rec.mask & (rec.predicted == rec.teacher)
    out[hit] = AGREE_COLORS["top1"]
    out[rec.mask & ~hit & rec.in_top5] = AGREE_COLORS["top5"]
    out[rec.mask & ~rec.in_top5] = AGREE_COLORS["miss"]
    return out


def read_index(run_dir: str | Path) -> list[dict]:
    """The snapshots of a run folder, oldest first; a line cut by a running writer is skipped."""
    rows = [r for r in read_jsonl(Path(run_dir) / "snapshots" / "index.jsonl") if "folder" in r]
    by_step = {r["step"]: r for r in rows}  # a snapshot rewritten after a resume: the newest line wins
    return [by_step[s] for s in sorted(by_step)]
