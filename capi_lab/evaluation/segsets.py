"""Segmentation datasets in the layouts they are published in, read as (image, label mask) pairs.

Layouts (``--layout``, or ``auto`` to recognise them):

* ``ade20k`` — ``ADEChallengeData2016/{images,annotations}/{training,validation}``: ``*.jpg`` images and ``*.png``
  masks of the same stem; label 0 is "other" and is ignored (with 255), 1-150 are the classes. The test split is
  ``validation``.
* ``voc`` — Pascal VOC 2012: ``JPEGImages/ID.jpg``, ``SegmentationClass/ID.png`` (palette PNGs) and the split lists
  ``ImageSets/Segmentation/{train,val}.txt``; 255 (object boundaries) is ignored, 0 is background (a class).
* ``pairs`` — a generic folder: ``images/`` and ``masks/`` whose files pair up by stem, either under ``train/`` and
  ``val/`` (or ``test/``) or at the top (then a seeded 80/20 split); masks hold one class index per pixel
  (mode ``L``, ``P`` or 16-bit); 255 is ignored unless ``--ignore-labels`` says otherwise.
* ``tuxpaint`` / ``stamps`` — the generated object-on-photo scenes of :mod:`capi_lab.evaluation.segmentation`.

A folder that does not match the layout asked for is a :class:`~capi_lab.data.DataError` naming what was expected,
never a silent misreading (the ``annotations/`` folder of ADE20K given as a folder of classes, say).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from capi_lab.data import IMAGE_EXTENSIONS, DataError, read_image

LAYOUTS = ("auto", "ade20k", "voc", "pairs", "tuxpaint", "stamps")
SPLIT_NAMES = {"train", "training", "val", "validation", "test", "testing"}
ADE20K_EXPECTED = "ADEChallengeData2016/{images,annotations}/{training,validation} (*.jpg images, *.png masks)"
VOC_EXPECTED = "VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation/{train,val}.txt}"
PAIRS_EXPECTED = "images/ and masks/ with files of the same stem, at the top or under train/ and val/"


@dataclass
class SegPairs:
    """Images and their label masks, paired by position."""

    images: list[Path]
    masks: list[Path]
    name: str = "pairs"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Image.Image, np.ndarray]:
        return read_image(self.images[i]), read_mask(self.masks[i])

    def describe(self, i: int) -> str:
        return str(self.images[i])

    def subset(self, indices) -> SegPairs:
        idx = [int(i) for i in indices]
        return SegPairs([self.images[i] for i in idx], [self.masks[i] for i in idx], self.name)


@dataclass
class SegDataset:
    """A segmentation benchmark: train and test pairs, an optional validation set (else the protocol splits one
    off train), the labels no metric counts and, where known, the class names (index = label)."""

    layout: str
    train: object
    test: object
    val: object | None = None
    ignore_labels: tuple[int, ...] = (255,)
    classes: list[str] | None = None
    notes: list[str] = field(default_factory=list)


def read_mask(path: Path) -> np.ndarray:
    """A label mask as ``[H, W]`` integers; a colour (RGB) mask is an error that says what is needed."""
    with Image.open(path) as m:
        if m.mode in ("RGB", "RGBA", "CMYK", "LA"):
            raise DataError(
                f"mask {path} is a {m.mode} picture; masks must hold one class index per pixel (a mode L, P or "
                "16-bit PNG, e.g. saved from an integer array), not colours"
            )
        return np.asarray(m, dtype=np.int64 if m.mode.startswith("I") else np.uint8).astype(np.int64)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _pair(img_dir: Path, mask_dir: Path, what: str) -> SegPairs:
    images = _images_in(img_dir)
    masks = {p.stem: p for p in mask_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}
    if not images:
        raise DataError(f"{img_dir} holds no images ({what})")
    missing = [p.name for p in images if p.stem not in masks]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(images)} images in {img_dir} have no mask of the same name in {mask_dir} "
            f"(first: {missing[0]}); {what}"
        )
    return SegPairs(images, [masks[p.stem] for p in images], what)


# ----------------------------------------------------------------------------- ADE20K


def _ade_root(root: Path) -> Path | None:
    for cand in (root, root / "ADEChallengeData2016"):
        if all((cand / a / s).is_dir() for a in ("images", "annotations") for s in ("training", "validation")):
            return cand
    return None


def read_ade20k(root: Path) -> SegDataset:
    base = _ade_root(root)
    if base is None:
        hint = ""
        if root.name in ("images", "annotations") and _ade_root(root.parent):
            hint = f"; {root} is the {root.name}/ folder inside ADE20K: give its parent, {root.parent}"
        elif root.name in ("training", "validation") and _ade_root(root.parent.parent):
            hint = f"; {root} is one split inside ADE20K: give {root.parent.parent}"
        raise DataError(f"{root} is not laid out as ADE20K: expected {ADE20K_EXPECTED}{hint}")
    what = "ADE20K: each image in images/SPLIT needs annotations/SPLIT/<same name>.png"
    train = _pair(base / "images" / "training", base / "annotations" / "training", what)
    test = _pair(base / "images" / "validation", base / "annotations" / "validation", what)
    return SegDataset("ade20k", train, test, None, (0, 255))


# ----------------------------------------------------------------------------- Pascal VOC

VOC_CLASSES = (
    "background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike person "
    "pottedplant sheep sofa train tvmonitor"
).split()


def _voc_root(root: Path) -> Path | None:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir() and (cand / "SegmentationClass").is_dir():
            return cand
    return None


def read_voc(root: Path) -> SegDataset:
    base = _voc_root(root)
    if base is None:
        hint = ""
        if root.name in ("JPEGImages", "SegmentationClass", "ImageSets") and _voc_root(root.parent):
            hint = f"; {root} is a folder inside VOC2012: give its parent, {root.parent}"
        raise DataError(f"{root} is not laid out as Pascal VOC: expected {VOC_EXPECTED}{hint}")
    lists = base / "ImageSets" / "Segmentation"
    splits = {}
    for split in ("train", "val"):
        f = lists / f"{split}.txt"
        if not f.is_file():
            raise DataError(f"{base} has no {f.relative_to(base)} (Pascal VOC's list of the {split} images)")
        ids = [line.split()[0] for line in f.read_text().splitlines() if line.strip()]
        images = [base / "JPEGImages" / f"{i}.jpg" for i in ids]
        masks = [base / "SegmentationClass" / f"{i}.png" for i in ids]
        missing = [p.name for p in images + masks if not p.is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} files named by {f} are missing (first: {missing[0]}); every ID needs "
                "JPEGImages/ID.jpg and SegmentationClass/ID.png"
            )
        splits[split] = SegPairs(images, masks, f"VOC {split}")
    return SegDataset("voc", splits["train"], splits["val"], None, (255,), list(VOC_CLASSES))


# ----------------------------------------------------------------------------- generic pairs

_MASK_DIRS = ("masks", "labels", "annotations")


def _pairs_in(folder: Path) -> tuple[Path, Path] | None:
    if not (folder / "images").is_dir():
        return None
    mask_dir = next((folder / m for m in _MASK_DIRS if (folder / m).is_dir()), None)
    return (folder / "images", mask_dir) if mask_dir else None


def read_pairs(root: Path, seed: int = 0) -> SegDataset:
    what = f"a pairs folder needs {PAIRS_EXPECTED}"
    train_dir = next((root / s for s in ("train", "training") if _pairs_in(root / s)), None)
    test_dir = next((root / s for s in ("val", "validation", "test") if _pairs_in(root / s)), None)
    if train_dir and test_dir:
        train = _pair(*_pairs_in(train_dir), what)
        test = _pair(*_pairs_in(test_dir), what)
        return SegDataset("pairs", train, test, None, (255,))
    top = _pairs_in(root)
    if top is None:
        raise DataError(f"{root} is not an image/mask pairs folder: expected {PAIRS_EXPECTED}")
    pairs = _pair(*top, what)
    if len(pairs) < 2:
        raise DataError(f"{root}: a pairs folder without train/ and val/ needs at least 2 images to split")
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_test = max(1, len(pairs) // 5)
    note = f"no train/ and val/: a seeded 80/20 split of the {len(pairs)} pairs (seed {seed})"
    return SegDataset("pairs", pairs.subset(np.sort(order[n_test:])), pairs.subset(np.sort(order[:n_test])),
                      None, (255,), notes=[note])  # fmt: skip


# ----------------------------------------------------------------------------- dispatch


def detect_layout(root: Path) -> str:
    """The layout of ``root`` (see the module docstring); a :class:`DataError` when it matches none."""
    if _ade_root(root):
        return "ade20k"
    if _voc_root(root):
        return "voc"
    if _pairs_in(root) or any(_pairs_in(root / s) for s in SPLIT_NAMES if (root / s).is_dir()):
        return "pairs"
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir())
    if subdirs and set(subdirs) <= SPLIT_NAMES:
        # e.g. ADEChallengeData2016/annotations: splits, not classes of cut-outs
        raise DataError(
            f"{root} holds the splits {', '.join(subdirs)} but is not a dataset layout capi_lab reads; for ADE20K "
            f"give the folder with images/ and annotations/ ({ADE20K_EXPECTED}); for your own data use "
            f"--layout pairs ({PAIRS_EXPECTED})"
        )
    if subdirs:
        return "stamps"
    raise DataError(
        f"{root} matches no segmentation layout: expected ADE20K ({ADE20K_EXPECTED}), Pascal VOC ({VOC_EXPECTED}), "
        f"a pairs folder ({PAIRS_EXPECTED}) or class sub-folders of RGBA cut-outs"
    )


def check_stamps(root: Path) -> None:
    """Cut-out folders must hold pictures with an alpha channel (the object mask)."""
    first = next((p for d in sorted(root.iterdir()) if d.is_dir() for p in _images_in(d)), None)
    if first is None:
        raise DataError(f"{root}: its sub-folders hold no images (expected class sub-folders of RGBA cut-outs)")
    with Image.open(first) as im:
        if "A" not in im.getbands() and "transparency" not in im.info:
            raise DataError(
                f"{root} was read as class sub-folders of cut-outs, but {first} has no alpha channel, so it cannot "
                f"be pasted as an object; for images with label masks use --layout pairs ({PAIRS_EXPECTED})"
            )


def open_segmentation(spec: str, layout: str = "auto", seed: int = 0) -> SegDataset | None:
    """The :class:`SegDataset` at ``spec`` in ``layout``; None for the generated scenes (``tuxpaint`` or a folder of
    cut-outs), which :func:`capi_lab.evaluation.segmentation.tuxpaint_sets` builds."""
    if layout not in LAYOUTS:
        raise DataError(f"--layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if spec == "tuxpaint":
        if layout not in ("auto", "tuxpaint"):
            raise DataError(f"--dataset tuxpaint is the generated scenes; it has no {layout} layout")
        return None
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise DataError(
            f"--dataset {spec!r}: not 'tuxpaint' and not a folder (the generated scenes need the cut-outs of "
            "`python scripts/fetch_demo_data.py --only tuxpaint`, then --dataset tuxpaint)"
        )
    if layout == "auto":
        layout = detect_layout(root)
    if layout in ("stamps", "tuxpaint"):
        check_stamps(root)
        return None
    return {"ade20k": read_ade20k, "voc": read_voc, "pairs": lambda r: read_pairs(r, seed)}[layout](root)
