"""Labelled image sets for the evaluations: Fashion-MNIST or a folder of class sub-folders, split and subsampled
with a seed; and the models an evaluation can be pointed at (``random:PRESET``, ``raw-pixels``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from capi_lab.data import DataError, FileImages, ImageSource, eval_transform, list_images, load_fashion_mnist


class Subset(ImageSource):
    def __init__(self, source: ImageSource, indices: np.ndarray):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int, min_side: int | None = None):
        return self.source.load(int(self.indices[i]), min_side)

    def describe(self, i: int) -> str:
        return self.source.describe(int(self.indices[i]))


@dataclass
class LabeledSplits:
    train: ImageSource
    train_labels: torch.Tensor
    test: ImageSource
    test_labels: torch.Tensor
    classes: list[str]


def _folder_split(root: Path) -> tuple[FileImages, np.ndarray, list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths, labels = [], []
    for c, name in enumerate(classes):
        found = list_images(root / name)
        paths += found
        labels += [c] * len(found)
    if not paths or len(classes) < 2:
        raise DataError(f"{root} needs at least two class sub-folders holding images (found {len(classes)})")
    return FileImages(paths), np.array(labels), classes


def load_labeled(
    spec: str, seed: int = 0, limit_train: int | None = None, limit_test: int | None = None
) -> LabeledSplits:
    """Train and test splits with integer labels for ``fashion-mnist`` or a folder of class sub-folders."""
    rng = np.random.default_rng(seed)
    if spec == "fashion-mnist":
        from capi_lab.data import FASHION_MNIST_CLASSES

        tr, te = load_fashion_mnist("train"), load_fashion_mnist("test")
        tr_idx, te_idx = np.arange(len(tr)), np.arange(len(te))
        train, test, y_tr, y_te = tr, te, tr.labels, te.labels
        classes = list(FASHION_MNIST_CLASSES)
    else:
        root = Path(spec)
        if not root.is_dir():
            raise DataError(f"--dataset {spec!r}: not 'fashion-mnist' and not a folder")
        sub = {d.name for d in root.iterdir() if d.is_dir()}
        test_name = next((n for n in ("val", "test") if n in sub), None)
        if "train" in sub and test_name:
            train, y_tr, classes = _folder_split(root / "train")
            test, y_te, test_classes = _folder_split(root / test_name)
            if test_classes != classes:
                raise DataError(f"{root}/train and {root}/{test_name} have different class folders")
        else:
            train, y_tr, classes = _folder_split(root)
            test, y_te = train, y_tr
        tr_idx, te_idx = np.arange(len(train)), np.arange(len(test))
        if test is train:  # stratified 80/20 split
            is_test = np.zeros(len(y_tr), dtype=bool)
            for c in np.unique(y_tr):
                members = rng.permutation(np.flatnonzero(y_tr == c))
                is_test[members[: max(1, len(members) // 5)]] = True
            tr_idx, te_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    if limit_train and limit_train < len(tr_idx):
        tr_idx = np.sort(rng.choice(tr_idx, limit_train, replace=False))
    if limit_test and limit_test < len(te_idx):
        te_idx = np.sort(rng.choice(te_idx, limit_test, replace=False))
    return LabeledSplits(
        Subset(train, tr_idx), torch.as_tensor(y_tr[tr_idx]).long(),
        Subset(test, te_idx), torch.as_tensor(y_te[te_idx]).long(), classes,
    )  # fmt: skip


def load_model(spec: str, seed: int = 0):
    """``random:PRESET`` is a freshly initialised model (the random-init baseline); anything else goes
    to load_pretrained."""
    import capi_lab

    if spec.startswith("random:"):
        torch.manual_seed(seed)
        return capi_lab.create_model(spec.split(":", 1)[1]).eval()
    return capi_lab.load_pretrained(spec)


def raw_pixels(source: ImageSource, image_size: int, desc: str = "pixels") -> tuple[torch.Tensor, list[int] | None]:
    """The flattened normalised pixels of every image that reads, and which images those are (None: all);
    unreadable images are left out as by :func:`capi_lab.features.extract_features`."""
    from capi_lab.features import kept_index, read_inputs

    kept: list[int] = []
    skipped: list[str] = []
    tf = eval_transform(image_size)
    x = read_inputs(source, range(len(source)), lambda img: tf(img).flatten(), kept, skipped)
    index = kept_index(source, kept, skipped, desc)
    return torch.stack(x), index
