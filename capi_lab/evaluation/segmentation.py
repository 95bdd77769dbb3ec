"""k-NN patch-label segmentation on a generated set: photo cut-outs pasted on photo crops.

The cut-outs are Debian's tuxpaint-stamps-default photos (RGBA, so the alpha channel is an exact
object mask; class = the stamp's top-level folder: animals, food, plants, vehicles, ...), fetched by
``scripts/fetch_demo_data.py --only tuxpaint``. Each image is a random square crop of a demo photo
with one stamp pasted at a random scale (35-70 % of the side) and position; its label map is 0 for
background and ``1 + class`` where the stamp's alpha is at least 128. Stamps and background photos
are split 70/30 between the train and test images (``capi_lab.data.stamp_split``), so test objects are unseen
instances; the ``composite`` pretraining source uses only the train side.

Evaluation (as the paper's k-NN segmentation): every train patch gets the majority label of its
pixels; each test patch takes the temperature-weighted vote of its k most similar train patches;
patch predictions are upsampled to pixels and scored by mean IoU over the classes present, and, read as
object-vs-background (any class against label 0), by a two-class mean IoU that asks only whether objects are found.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from capi_lab.data import cache_dir, demo_photo_paths, stamp_split, to_input


@dataclass
class StampSegmentation:
    """A deterministic generated segmentation set (see the module docstring)."""

    stamps_root: Path
    backgrounds: list[Path]
    n_images: int = 200
    image_size: int = 64
    split: str = "train"
    seed: int = 0

    def __post_init__(self) -> None:
        self.classes, self.stamps, self.bg_paths = stamp_split(
            self.stamps_root, self.backgrounds, self.split, self.seed
        )
        self._cache: dict[Path, Image.Image] = {}

    @property
    def num_classes(self) -> int:
        """Classes including background (label 0)."""
        return len(self.classes) + 1

    def __len__(self) -> int:
        return self.n_images

    def _open(self, path: Path, mode: str) -> Image.Image:
        if path not in self._cache:
            with Image.open(path) as im:
                im = im.convert(mode)
                im.thumbnail((512, 512))
                self._cache[path] = im
        return self._cache[path]

    def __getitem__(self, i: int) -> tuple[Image.Image, np.ndarray]:
        rng = np.random.default_rng([self.seed, i, 0 if self.split == "train" else 1])
        s = self.image_size
        bg = self._open(self.bg_paths[rng.integers(len(self.bg_paths))], "RGB")
        side = int(min(bg.size) * rng.uniform(0.4, 1.0))
        x0, y0 = rng.integers(0, bg.width - side + 1), rng.integers(0, bg.height - side + 1)
        canvas = bg.crop((x0, y0, x0 + side, y0 + side)).resize((s, s), Image.Resampling.BICUBIC)
        c = int(rng.integers(len(self.classes)))
        stamp = self._open(self.stamps[c][rng.integers(len(self.stamps[c]))], "RGBA")
        scale = rng.uniform(0.35, 0.7) * s / max(stamp.size)
        stamp = stamp.resize(
            (max(1, int(stamp.width * scale)), max(1, int(stamp.height * scale))), Image.Resampling.BICUBIC
        )
        px, py = rng.integers(0, s - stamp.width + 1), rng.integers(0, s - stamp.height + 1)
        canvas.paste(stamp, (int(px), int(py)), stamp)
        labels = np.zeros((s, s), dtype=np.int64)
        alpha = np.asarray(stamp)[..., 3] >= 128
        labels[py : py + stamp.height, px : px + stamp.width][alpha] = c + 1
        return canvas, labels


def tuxpaint_sets(image_size: int, n_train: int = 200, n_test: int = 100, seed: int = 0, root: Path | None = None):
    """Train and test :class:`StampSegmentation` sets from the fetched tuxpaint stamps and demo photos."""
    root = root or cache_dir() / "demo-data" / "tuxpaint"
    backgrounds = demo_photo_paths()
    return (
        StampSegmentation(root, backgrounds, n_train, image_size, "train", seed),
        StampSegmentation(root, backgrounds, n_test, image_size, "test", seed),
    )


def patch_labels(labels: torch.Tensor, patch: int, num_classes: int) -> torch.Tensor:
    """Majority label of each ``patch x patch`` cell: ``[B, H, W] -> [B, H/p, W/p]``."""
    onehot = F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()
    return F.avg_pool2d(onehot, patch).argmax(1)


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """(mean IoU over the classes present in prediction or target, pixel accuracy)."""
    conf = torch.bincount(target.flatten() * num_classes + pred.flatten(), minlength=num_classes**2)
    conf = conf.view(num_classes, num_classes).double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()), float(inter.sum() / conf.sum())


def _features(model, ds: StampSegmentation, batch_size: int, device: torch.device, desc: str):
    feats, labels = [], []
    for start in tqdm(range(0, len(ds), batch_size), desc=desc, unit="batch"):
        items = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        x = torch.stack([to_input(im) for im, _ in items])
        with torch.no_grad():
            fm = model(x.to(device))[2].float().cpu()
        feats.append(fm)
        labels.append(torch.stack([torch.from_numpy(lb) for _, lb in items]))
    return torch.cat(feats), torch.cat(labels)


def seg_knn_miou(
    model, train: StampSegmentation, test: StampSegmentation, k: int = 10, temperature: float = 0.07,
    batch_size: int = 32, device: str | torch.device | None = None,
) -> dict[str, float]:  # fmt: skip
    """k-NN patch-label segmentation of ``test`` with ``train`` as the bank; mIoU and pixel accuracy."""
    from capi_lab.evaluation.classification import knn_predict

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    p = model.patch_size
    if train.image_size % p:
        raise ValueError(f"image size {train.image_size} is not a multiple of the patch size {p}")
    f_tr, y_tr = _features(model, train, batch_size, device, "features (train)")
    f_te, y_te = _features(model, test, batch_size, device, "features (test)")
    n_cls = train.num_classes
    bank_labels = patch_labels(y_tr, p, n_cls).flatten()
    pred = knn_predict(f_tr.flatten(0, 2), bank_labels, f_te.flatten(0, 2), k, temperature, n_cls)
    h, w = f_te.shape[1:3]
    pred = pred.view(-1, h, w).repeat_interleave(p, 1).repeat_interleave(p, 2)
    miou, acc = mean_iou(pred, y_te, n_cls)
    # the same predictions read as object vs background: does the model find objects, whatever their class?
    fg_miou, _ = mean_iou((pred > 0).long(), (y_te > 0).long(), 2)
    return {"miou": miou, "pixel_acc": acc, "fg_bg_miou": fg_miou, "num_classes": n_cls, "k": k}
