"""Evaluate frozen CAPI features.

    python -m capi_lab.evaluation knn --checkpoint CKPT --dataset fashion-mnist
    python -m capi_lab.evaluation linear --checkpoint CKPT --dataset path/to/folder_with_class_subfolders
    python -m capi_lab.evaluation attentive --checkpoint CKPT --dataset fashion-mnist --limit-train 10000
    python -m capi_lab.evaluation seg-knn --checkpoint CKPT --dataset tuxpaint

Prints one JSON line with the metrics. ``--checkpoint`` takes anything load_pretrained accepts, or
``raw-pixels`` for the pixel baseline. A folder dataset uses its ``train/`` and ``val/`` (or ``test/``)
sub-folders when present, else a seeded, class-stratified 80/20 split of its class sub-folders.
``seg-knn`` takes ``tuxpaint`` (the fetched stamps, see capi_lab.evaluation.segmentation) or a folder
of class sub-folders of RGBA cut-outs, pasted on the demo photos.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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

    def __post_init__(self) -> None:
        require_positive(self, "batch_size", "image_size")


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
    """An attentive probe (cross-attention pooling + linear) on frozen patch tokens."""

    epochs: int = 20
    """Training epochs of the probe."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(self, "epochs")


@dataclass
class ClassificationConfig(_Neighbours):
    """k-NN and linear on both global and mean-patch features, from one extraction."""


@dataclass
class SegKNNConfig(EvalConfig):
    """k-NN segmentation of patches on generated object-on-photo scenes."""

    dataset: str = "tuxpaint"
    """'tuxpaint' (the fetched stamps) or a folder of class sub-folders of RGBA cut-outs."""
    k: int = 10
    """Neighbours per patch."""
    temperature: float = 0.07
    """Softmax temperature of the neighbours' votes."""
    n_train: int = 300
    """Generated train scenes."""
    n_test: int = 150
    """Generated test scenes."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(self, "k", "temperature", "n_train", "n_test")


TASKS: dict[str, type[EvalConfig]] = {
    "knn": KNNConfig,
    "linear": LinearConfig,
    "attentive": AttentiveConfig,
    "classification": ClassificationConfig,
    "seg-knn": SegKNNConfig,
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
    from capi_lab.features import extract_features
    from capi_lab.pretrained import CheckpointError

    task, args = parse_args(argv)
    t0 = time.perf_counter()
    if task == "seg-knn":
        return _seg_knn(args, t0)
    try:
        splits = load_labeled(args.dataset, args.seed, args.limit_train, args.limit_test)
        model = None if args.checkpoint == "raw-pixels" else load_model(args.checkpoint, args.seed)
    except (DataError, CheckpointError, ConfigError) as e:
        raise SystemExit(f"error: {e}") from None
    attentive = task == "attentive"
    if model is None and attentive:
        raise SystemExit("error: the attentive probe needs patch tokens; give a model --checkpoint")
    try:
        if model is None:
            size = args.image_size or 28
            (x_tr, i_tr), (x_te, i_te) = (raw_pixels(s, size, f"pixels ({n})") for n, s in _named(splits))
        else:
            size = args.image_size or model.image_size or 16 * model.patch_size
            pool = task == "classification" or (task in ("knn", "linear") and args.features == "mean-patch")
            feats = [
                extract_features(model, s, size, args.batch_size, keep_patches=pool or attentive, pool_patches=pool,
                                 device=args.device, desc=f"features ({name})")
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
        metric = {"top1": top1, "epochs": args.epochs}
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


def _named(splits):
    return (("train", splits.train), ("test", splits.test))


_FEATURES = {"attentive": "patch-tokens", "classification": "global+mean-patch"}


def _seg_knn(args: SegKNNConfig, t0: float) -> int:
    from capi_lab.evaluation.segmentation import tuxpaint_sets
    from capi_lab.pretrained import CheckpointError

    if args.checkpoint == "raw-pixels":
        raise SystemExit("error: seg-knn needs patch features; give a model --checkpoint")
    try:
        model = load_model(args.checkpoint, args.seed)
        size = args.image_size or model.image_size or 16 * model.patch_size
        root = None if args.dataset == "tuxpaint" else Path(args.dataset)
        train, test = tuxpaint_sets(size, args.n_train, args.n_test, args.seed, root)
    except (DataError, CheckpointError, ConfigError) as e:
        raise SystemExit(f"error: {e}") from None
    from capi_lab.evaluation.segmentation import seg_knn_miou

    metric = seg_knn_miou(model, train, test, k=args.k, temperature=args.temperature, device=args.device)
    row = {
        "task": "seg-knn", "checkpoint": args.checkpoint, "dataset": args.dataset, "image_size": size, **metric,
        "classes": train.classes, "n_train": len(train), "n_test": len(test),
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
