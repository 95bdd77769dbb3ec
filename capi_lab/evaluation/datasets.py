"""Labelled image sets for the evaluations: Fashion-MNIST or a folder of class sub-folders, split and subsampled
with a seed; and the models an evaluation can be pointed at (``random:PRESET``, ``raw-pixels``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from capi_lab.data import (
    IMAGE_EXTENSIONS,
    DataError,
    FileImages,
    ImageSource,
    eval_transform,
    list_images,
    load_fashion_mnist,
)


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


SPLIT_NAMES = {"train", "training", "val", "validation", "test", "testing"}


def _folder_split(root: Path) -> tuple[FileImages, np.ndarray, list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if classes and set(classes) <= SPLIT_NAMES:
        raise DataError(
            f"the sub-folders of {root} ({', '.join(classes)}) are named like dataset splits, not classes; a "
            "classification folder has class sub-folders, or train/ and val/ (or test/) that each hold class "
            "sub-folders (for ADE20K's images/ folder, a segmentation set, use seg-knn on ADEChallengeData2016)"
        )
    paths, labels = [], []
    for c, name in enumerate(classes):
        found = list_images(root / name)
        paths += found
        labels += [c] * len(found)
    if not paths or len(classes) < 2:
        loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        where = f"; it holds {len(loose)} images directly, with no class sub-folders" if loose else ""
        raise DataError(
            f"{root} needs at least two class sub-folders holding images (found {len(classes)}){where} (a "
            "segmentation set such as ADE20K or VOC goes to seg-knn / seg-linear)"
        )
    return FileImages(paths), np.array(labels), classes


def load_labeled(
    spec: str, seed: int = 0, limit_train: int | None = None, limit_test: int | None = None
) -> LabeledSplits:
    """Train and test splits with integer labels for ``fashion-mnist``, a folder of class sub-folders (with
    ``train/`` and ``val/``, ``validation/`` or ``test/`` when present) or a list file (:func:`read_label_list`)."""
    rng = np.random.default_rng(seed)
    if spec == "fashion-mnist":
        from capi_lab.data import FASHION_MNIST_CLASSES

        tr, te = load_fashion_mnist("train"), load_fashion_mnist("test")
        tr_idx, te_idx = np.arange(len(tr)), np.arange(len(te))
        train, test, y_tr, y_te = tr, te, tr.labels, te.labels
        classes = list(FASHION_MNIST_CLASSES)
    elif Path(spec).is_file():
        train, y_tr, test, y_te, classes = read_label_list(Path(spec))
    else:
        root = Path(spec)
        if not root.is_dir():
            raise DataError(f"--dataset {spec!r}: not 'fashion-mnist', a folder or a list file")
        sub = {d.name for d in root.iterdir() if d.is_dir()}
        train_name = next((n for n in ("train", "training") if n in sub), None)
        test_name = next((n for n in ("val", "validation", "test") if n in sub), None)
        if train_name and test_name:
            train, y_tr, classes = _folder_split(root / train_name)
            test, y_te, test_classes = _folder_split(root / test_name)
            if test_classes != classes:
                raise DataError(f"{root}/{train_name} and {root}/{test_name} have different class folders")
        else:
            train, y_tr, classes = _folder_split(root)
            test, y_te = train, y_tr
    if spec != "fashion-mnist":
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


def read_label_list(path: Path) -> tuple[FileImages, np.ndarray, FileImages, np.ndarray, list[str]]:
    """A list file of ``path label [split]`` lines (whitespace-separated; ``#`` comments and blank lines skipped;
    relative paths are relative to the file). ``label`` is a class name or an integer; ``split`` is ``train`` or
    ``val``/``test``. Without a split column every line is train, and :func:`load_labeled` splits 80/20."""
    rows = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in {"train", "val", "test"}):
            raise DataError(f"{path}:{n}: expected 'path label' or 'path label train|val|test', got {line[:80]!r}")
        rows.append((parts[0], parts[1], "train" if len(parts) == 2 else parts[2]))
    if not rows:
        raise DataError(f"{path} lists no images (expected lines of 'path label [split]')")
    names = sorted({r[1] for r in rows}, key=lambda c: (0, int(c)) if c.lstrip("-").isdigit() else (1, c))
    if len(names) < 2:
        raise DataError(f"{path} lists one class only ({names[0]}); classification needs at least two")
    index = {c: i for i, c in enumerate(names)}
    paths = [Path(r[0]) if Path(r[0]).is_absolute() else path.parent / r[0] for r in rows]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} of the {len(paths)} images in {path} do not exist (first: {missing[0]})")
    is_train = np.array([r[2] == "train" for r in rows])
    labels = np.array([index[r[1]] for r in rows])
    all_files = FileImages(paths)
    if is_train.all():
        return all_files, labels, all_files, labels, names
    tr, te = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    return (FileImages([paths[i] for i in tr]), labels[tr], FileImages([paths[i] for i in te]), labels[te], names)


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
