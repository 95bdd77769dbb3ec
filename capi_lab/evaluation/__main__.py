"""Evaluate frozen CAPI features.

    python -m capi_lab.evaluation knn --checkpoint CKPT --dataset fashion-mnist
    python -m capi_lab.evaluation linear --checkpoint CKPT --dataset path/to/folder_with_class_subfolders
    python -m capi_lab.evaluation attentive --checkpoint CKPT --dataset fashion-mnist --limit-train 10000
    python -m capi_lab.evaluation seg-knn --checkpoint CKPT --dataset tuxpaint
    python -m capi_lab.evaluation seg-knn --checkpoint CKPT --dataset PATH/ADEChallengeData2016 --protocol capi
    python -m capi_lab.evaluation seg-linear --checkpoint CKPT --dataset PATH/VOCdevkit/VOC2012

Prints one JSON line with the metrics. ``--checkpoint`` takes anything load_pretrained accepts, or
``raw-pixels`` for the pixel baseline. A classification dataset is ``fashion-mnist``, a folder of class
sub-folders (its ``train/`` and ``val/`` or ``test/`` sub-folders when present, else a seeded, class-stratified
80/20 split) or a list file of ``path label [split]`` lines. ``seg-knn`` / ``seg-linear`` take ``tuxpaint`` (the
generated scenes, see capi_lab.evaluation.segmentation), ADE20K, Pascal VOC or an image/mask pairs folder
(capi_lab.evaluation.segsets); ``--protocol capi`` is the authors' protocol (docs/evaluation.md), ``quick`` a
fast one for small CPU data.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from capi_lab.command_line import (
    clear_errors,
    instantiate,
    normalise_argv,
    require_positive,
    shorthand_flags,
    subcommand_parser,
)
from capi_lab.config import ConfigError
from capi_lab.data import DataError
from capi_lab.evaluation.datasets import load_labeled, load_model, raw_pixels


@dataclass
class EvalConfig:
    """Settings every evaluation takes."""

    checkpoint: str
    """Anything load_pretrained accepts (a run's .ckpt, an authors' .pth, 'default', a published name),
    'random:PRESET' for a randomly initialised model, or 'raw-pixels' for the pixel baseline."""
    dataset: str
    """'fashion-mnist' or a folder of class sub-folders (with train/ and val/ or test/ when present)."""
    image_size: int | None = None
    """Input side in pixels (default: the model's training size)."""
    batch_size: int = 128
    """Images per forward pass of the feature extraction."""
    seed: int = 0
    """Seed of the train/test split, the subsets and any random initialisation."""
    device: str | None = None
    """'cpu' or 'cuda' (default: cuda when available)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Precision of the model's forward pass; fp32 on every device by default, so results do not depend on it."""
    num_workers: int = -1
    """Image-decoding worker processes; -1 picks them from the cores (none on a CPU with fewer than 4)."""

    def __post_init__(self) -> None:
        from capi_lab.features import check_workers

        require_positive(self, "batch_size", "image_size")
        check_workers(self.num_workers)


@dataclass
class _Classification(EvalConfig):
    limit_train: int | None = None
    """Use a seeded random subset of this many train images."""
    limit_test: int | None = None
    """Use a seeded random subset of this many test images."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(self, "limit_train", "limit_test")


@dataclass
class _Neighbours(_Classification):
    k: int = 20
    """Neighbours."""
    temperature: float = 0.07
    """Softmax temperature of the neighbours' votes."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(self, "k", "temperature")


@dataclass
class KNNConfig(_Neighbours):
    """Weighted k-NN classification on frozen features."""

    features: Literal["global", "mean-patch"] = "global"
    """'global' (the encoder's pooled output) or 'mean-patch' (the mean of the patch tokens)."""


@dataclass
class LinearConfig(_Classification):
    """A linear classifier on frozen features."""

    features: Literal["global", "mean-patch"] = "global"
    """'global' (the encoder's pooled output) or 'mean-patch' (the mean of the patch tokens)."""


@dataclass
class AttentiveConfig(_Classification):
    """An attentive probe on frozen patch tokens: the authors' protocol (--protocol capi) or a quick one."""

    protocol: Literal["auto", "quick", "capi"] = "auto"
    """'capi': the authors' probe (online backbone with augmentation, a grid of heads in one pass, AdamW, warmup +
    cosine, a fixed global batch, validation picks the best); 'quick': one probe on cached centre-crop features.
    'auto': capi on a GPU, quick on a CPU."""
    epochs: int = 20
    """Training epochs of the quick probe."""
    global_batch: int = 1024
    """capi: images per optimiser step (the authors': 8 GPUs x 128); --batch-size at a time, gradients accumulated."""
    iters: int = 12_500
    """capi: optimiser steps (the authors': 12500)."""
    warmup_iters: int = 1250
    """capi: linear warmup steps (the authors': 1250)."""
    lrs: list[float] | None = None
    """capi: the learning-rate grid for a global batch of 256 (default: the authors' ten, 1e-5 ... 1e-2)."""
    wds: list[float] | None = None
    """capi: the weight-decay grid (default: the authors' 5e-4, 1e-3, 5e-2)."""
    output_dir: str | None = None
    """capi: save the probe here every --checkpoint-every steps; a rerun with the same settings resumes."""
    checkpoint_every: int = 1250
    """capi: steps between probe checkpoints."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(self, "epochs", "global_batch", "iters", "checkpoint_every")
        if not 0 <= self.warmup_iters < self.iters:
            raise ConfigError(f"--warmup-iters {self.warmup_iters}: give 0 or more and fewer than --iters {self.iters}")
        if self.global_batch % self.batch_size:
            raise ConfigError(
                f"--global-batch {self.global_batch} must be a multiple of --batch-size {self.batch_size} (the "
                "images of one forward pass; gradients are accumulated over global / batch passes)"
            )


@dataclass
class ClassificationConfig(_Neighbours):
    """k-NN and linear on both global and mean-patch features, from one extraction."""


@dataclass
class _Segmentation(EvalConfig):
    dataset: str = "tuxpaint"
    """'tuxpaint' (generated scenes), a folder of class sub-folders of RGBA cut-outs, ADE20K
    (ADEChallengeData2016), Pascal VOC (VOC2012) or a folder of images/ and masks/ (see --layout)."""
    layout: Literal["auto", "ade20k", "voc", "pairs", "tuxpaint", "stamps"] = "auto"
    """How --dataset is laid out; 'auto' recognises it (an unrecognised folder is an error, never a guess)."""
    protocol: Literal["auto", "quick", "capi"] = "auto"
    """'capi': the authors' protocol (standardisation, 10 % validation, hyper-parameter grid, refit, per-pixel
    votes); 'quick': one k-NN with weighted per-patch votes. 'auto': capi for ADE20K and VOC, else quick."""
    ignore_labels: list[int] | None = None
    """Labels no metric counts (default: the dataset's: 0 and 255 for ADE20K, 255 for VOC and pairs, none for the
    generated scenes)."""
    n_train: int = 300
    """Generated train scenes (tuxpaint and cut-out folders)."""
    n_test: int = 150
    """Generated test scenes (tuxpaint and cut-out folders)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(self, "n_train", "n_test")


@dataclass
class SegKNNConfig(_Segmentation):
    """k-NN segmentation of patches."""

    k: int = 10
    """Neighbours per patch (quick protocol; the capi protocol picks k from its grid)."""
    temperature: float = 0.07
    """Softmax temperature of the neighbours' votes (quick protocol)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(self, "k", "temperature")


@dataclass
class SegLinearConfig(_Segmentation):
    """Linear segmentation: logistic regression on standardised patch features (the authors' protocol)."""

    max_iter: int = 1000
    """L-BFGS iterations per fit (the authors': 1000)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(self, "max_iter")
        if self.protocol == "quick":
            raise ConfigError("seg-linear follows the authors' protocol only; drop --protocol quick (or use seg-knn)")


TASKS: dict[str, type[EvalConfig]] = {
    "knn": KNNConfig,
    "linear": LinearConfig,
    "attentive": AttentiveConfig,
    "classification": ClassificationConfig,
    "seg-knn": SegKNNConfig,
    "seg-linear": SegLinearConfig,
}
"""The evaluation tasks (``python -m capi_lab.evaluation TASK``) and their settings."""


def parse_args(argv: list[str] | None = None) -> tuple[str, EvalConfig]:
    """``(task, its config)`` from the command line; a bad flag or value exits with a clear error."""
    argv = sys.argv[1:] if argv is None else argv
    parser = subcommand_parser("python -m capi_lab.evaluation", __doc__.split("\n\n")[0], TASKS)
    shorthands = {k: v for c in TASKS.values() for k, v in shorthand_flags(c).items()}
    with clear_errors(parser.prog, subcommands=list(TASKS)):
        ns = parser.parse_args(normalise_argv(argv, shorthands))
        return ns.task, instantiate(TASKS[ns.task], ns[ns.task])


def main(argv: list[str] | None = None) -> int:
    from capi_lab.evaluation import attentive_accuracy, knn_accuracy, linear_accuracy
    from capi_lab.features import default_device, extract_features, resolve_workers
    from capi_lab.pretrained import CheckpointError

    task, args = parse_args(argv)
    t0 = time.perf_counter()
    if task in ("seg-knn", "seg-linear"):
        return _segmentation(task, args, t0)
    try:
        splits = load_labeled(args.dataset, args.seed, args.limit_train, args.limit_test)
        model = None if args.checkpoint == "raw-pixels" else load_model(args.checkpoint, args.seed)
    except (DataError, CheckpointError, ConfigError) as e:
        raise SystemExit(f"error: {e}") from None
    attentive = task == "attentive"
    if model is None and attentive:
        raise SystemExit("error: the attentive probe needs patch tokens; give a model --checkpoint")
    if attentive and (args.protocol == "capi" or (args.protocol == "auto" and _on_gpu(args.device))):
        return _attentive_capi(args, splits, model, t0)
    try:
        if model is None:
            size = args.image_size or 28
            (x_tr, i_tr), (x_te, i_te) = (raw_pixels(s, size, f"pixels ({n})") for n, s in _named(splits))
        else:
            size = args.image_size or model.image_size or 16 * model.patch_size
            pool = task == "classification" or (task in ("knn", "linear") and args.features == "mean-patch")
            device = torch.device(args.device) if args.device else default_device()
            workers = resolve_workers(args.num_workers, device)
            feats = [
                extract_features(model, s, size, args.batch_size, keep_patches=pool or attentive, pool_patches=pool,
                                 device=device, desc=f"features ({name})", num_workers=workers, dtype=args.dtype)
                for name, s in _named(splits)
            ]  # fmt: skip
            i_tr, i_te = (f.index for f in feats)
    except (DataError, ConfigError) as e:
        raise SystemExit(f"error: {e}") from None
    y_tr, y_te = (y if i is None else y[i] for y, i in ((splits.train_labels, i_tr), (splits.test_labels, i_te)))
    n_train, n_test = len(y_tr), len(y_te)
    k = getattr(args, "k", None)
    if k is not None and k > n_train:
        print(f"warning: --k {k} is more than the {n_train} images of the bank; using k = {n_train}", file=sys.stderr)
        k = n_train
    if model is not None:
        if attentive:
            x_tr, x_te = (f.feature_map.flatten(1, 2) for f in feats)
        elif task == "classification":
            x_tr, x_te = feats  # both kinds of features, below
        else:
            x_tr, x_te = (f.mean_patch if pool else f.global_repr for f in feats)
    if task == "classification":
        kinds = {"raw": (x_tr, x_te)} if model is None else {
            "global": (x_tr.global_repr, x_te.global_repr), "mean_patch": (x_tr.mean_patch, x_te.mean_patch)
        }  # fmt: skip
        metric = {}
        for name, (a, b) in kinds.items():
            metric[f"knn_{name}"] = knn_accuracy(a, y_tr, b, y_te, k, args.temperature)
            metric[f"linear_{name}"] = linear_accuracy(a, y_tr, b, y_te)
    elif task == "knn":
        metric = {"top1": knn_accuracy(x_tr, y_tr, x_te, y_te, k, args.temperature), "k": k}
        metric["temperature"] = args.temperature
    elif attentive:
        top1 = attentive_accuracy(x_tr, y_tr, x_te, y_te, epochs=args.epochs, seed=args.seed)
        metric = {"top1": top1, "epochs": args.epochs, "protocol": "quick"}
    else:
        metric = {"top1": linear_accuracy(x_tr, y_tr, x_te, y_te)}
    row = {
        "task": task, "checkpoint": args.checkpoint, "dataset": args.dataset,
        "features": "raw-pixels" if model is None else _FEATURES.get(task) or args.features,  # type: ignore[attr-defined]
        "image_size": size, **metric,
        "n_train": n_train, "n_test": n_test, "skipped_images": len(splits.train) + len(splits.test) - n_train - n_test,
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    print(json.dumps(row))
    return 0


def _on_gpu(device: str | None) -> bool:
    return (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")


def _attentive_capi(args: AttentiveConfig, splits, model, t0: float) -> int:
    from capi_lab.evaluation.attentive import PROBE_LRS, PROBE_WDS, probe_capi
    from capi_lab.features import default_device, resolve_workers

    device = torch.device(args.device) if args.device else default_device()
    size = args.image_size or 224
    if size % model.patch_size:
        raise SystemExit(f"error: --image-size {size} is not a multiple of the patch size {model.patch_size}")
    try:
        out = probe_capi(
            model, splits.train, splits.train_labels, splits.test, splits.test_labels, image_size=size,
            global_batch=args.global_batch, batch_size=args.batch_size, iters=args.iters, warmup=args.warmup_iters,
            lrs=tuple(args.lrs or PROBE_LRS), wds=tuple(args.wds or PROBE_WDS), seed=args.seed, device=device,
            dtype=args.dtype, num_workers=resolve_workers(args.num_workers, device), output_dir=args.output_dir,
            checkpoint_every=args.checkpoint_every,
        )  # fmt: skip
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    row = {"task": "attentive", "protocol": "capi", "checkpoint": args.checkpoint, "dataset": args.dataset,
           "image_size": size, "top1": out["patch"]["test_top1"] if "patch" in out else None, **out,
           "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    print(json.dumps(row))
    return 0


def _named(splits):
    return (("train", splits.train), ("test", splits.test))


_FEATURES = {"attentive": "patch-tokens", "classification": "global+mean-patch"}


def _segmentation(task: str, args: _Segmentation, t0: float) -> int:
    from capi_lab.evaluation import segmentation as seg
    from capi_lab.evaluation.segsets import open_segmentation
    from capi_lab.features import default_device, resolve_workers
    from capi_lab.pretrained import CheckpointError

    try:
        data = open_segmentation(args.dataset, args.layout, args.seed)
        layout = data.layout if data else "tuxpaint"
        protocol = args.protocol if args.protocol != "auto" else "capi" if layout in ("ade20k", "voc") else "quick"
        if task == "seg-linear":
            protocol = "capi"
        if args.checkpoint.startswith("raw-pixels"):
            patch = args.checkpoint.partition(":")[2]
            model = seg.RawPixelPatches(int(patch) if patch.isdigit() else 8)
        else:
            model = load_model(args.checkpoint, args.seed)
        p = model.patch_size
        size = args.image_size or (224 if protocol == "capi" else model.image_size or 16 * p)
        if size % p:
            raise ConfigError(f"--image-size {size} is not a multiple of the patch size {p}; use e.g. {size // p * p}")
        if data is None:
            root = None if args.dataset == "tuxpaint" else Path(args.dataset)
            train, test = seg.tuxpaint_sets(size, args.n_train, args.n_test, args.seed, root)
            val, ignore, classes = None, (), ["background", *train.classes]
        else:
            train, test, val, ignore, classes = data.train, data.test, data.val, data.ignore_labels, data.classes
        if args.ignore_labels is not None:
            ignore = tuple(args.ignore_labels)
        device = torch.device(args.device) if args.device else default_device()
        kw = dict(batch_size=args.batch_size, device=device, dtype=args.dtype,
                  num_workers=resolve_workers(args.num_workers, device))  # fmt: skip
        if protocol == "capi":
            classifier = "knn" if task == "seg-knn" else "linear"
            out = seg.evaluate_capi(model, train, test, size, val, (classifier,), ignore, args.seed,
                                    logreg_max_iter=getattr(args, "max_iter", 1000), **kw)  # fmt: skip
            metric = {**{k: v for k, v in out.items() if k != classifier}, **out[classifier]}
        else:
            metric = seg.evaluate_quick(model, train, test, size, args.k, args.temperature, ignore,
                                        background=data is None, **kw)  # fmt: skip
    except (DataError, CheckpointError, ConfigError) as e:
        raise SystemExit(f"error: {e}") from None
    row = {
        "task": task, "checkpoint": args.checkpoint, "dataset": args.dataset, "layout": layout, "image_size": size,
        **metric, "num_classes": len(classes) if classes else None, "classes": classes,
        "notes": data.notes if data else [],
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
