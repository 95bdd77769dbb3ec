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

import argparse
import json
import sys
import time
from pathlib import Path

from capi_lab.config import ConfigError
from capi_lab.data import DataError
from capi_lab.evaluation.datasets import load_labeled, load_model, raw_pixels

DEFAULT_K = {"seg-knn": 10}
"""--k when it is not given: 10 neighbours for k-NN segmentation, 20 for classification (the paper's protocols)."""


def main(argv: list[str] | None = None) -> int:
    from capi_lab.evaluation import attentive_accuracy, knn_accuracy, linear_accuracy
    from capi_lab.features import extract_features
    from capi_lab.pretrained import CheckpointError

    ap = argparse.ArgumentParser(prog="python -m capi_lab.evaluation", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "task",
        choices=["knn", "linear", "attentive", "seg-knn", "classification"],
        help="'classification' = knn and linear on both global and mean-patch features, one extraction",
    )
    ap.add_argument(
        "--checkpoint", required=True, help="anything load_pretrained accepts, 'raw-pixels', or 'random:PRESET'"
    )
    ap.add_argument("--dataset", required=True, help="'fashion-mnist' or a folder of class sub-folders")
    ap.add_argument("--features", choices=["global", "mean-patch"], default="global")
    ap.add_argument("--image-size", type=int, default=None, help="input side (default: the model's training size)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--k", type=int, default=None, help="neighbours (default: 20; 10 for seg-knn)")
    ap.add_argument("--temperature", type=float, default=0.07)
    ap.add_argument("--limit-train", type=int, default=None, help="use a seeded random subset of the train split")
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=20, help="attentive probe training epochs")
    ap.add_argument("--n-train", type=int, default=300, help="seg-knn: generated train images")
    ap.add_argument("--n-test", type=int, default=150, help="seg-knn: generated test images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    if args.k is None:
        args.k = DEFAULT_K.get(args.task, 20)
    t0 = time.perf_counter()
    if args.task == "seg-knn":
        return _seg_knn(args, t0)
    try:
        splits = load_labeled(args.dataset, args.seed, args.limit_train, args.limit_test)
        model = None if args.checkpoint == "raw-pixels" else load_model(args.checkpoint, args.seed)
    except (DataError, CheckpointError, ConfigError) as e:
        raise SystemExit(f"error: {e}") from None
    attentive = args.task == "attentive"
    if model is None:
        if attentive:
            raise SystemExit("error: the attentive probe needs patch tokens; give a model --checkpoint")
        size = args.image_size or 28
        x_tr, x_te = raw_pixels(splits.train, size), raw_pixels(splits.test, size)
    else:
        size = args.image_size or model.image_size or 16 * model.patch_size
        pool = (args.features == "mean-patch" or args.task == "classification") and not attentive
        feats = [
            extract_features(model, s, size, args.batch_size, keep_patches=pool or attentive, pool_patches=pool,
                             device=args.device, desc=f"features ({name})")
            for name, s in (("train", splits.train), ("test", splits.test))
        ]  # fmt: skip
        if attentive:
            x_tr, x_te = (f.feature_map.flatten(1, 2) for f in feats)
        elif args.task == "classification":
            x_tr, x_te = feats  # both kinds of features, below
        else:
            x_tr, x_te = (f.mean_patch if pool else f.global_repr for f in feats)
    if args.task == "classification":
        y_tr, y_te = splits.train_labels, splits.test_labels
        kinds = {"raw": (x_tr, x_te)} if model is None else {
            "global": (x_tr.global_repr, x_te.global_repr), "mean_patch": (x_tr.mean_patch, x_te.mean_patch)
        }  # fmt: skip
        metric = {}
        for name, (a, b) in kinds.items():
            metric[f"knn_{name}"] = knn_accuracy(a, y_tr, b, y_te, args.k, args.temperature)
            metric[f"linear_{name}"] = linear_accuracy(a, y_tr, b, y_te)
    elif args.task == "knn":
        metric = {"top1": knn_accuracy(x_tr, splits.train_labels, x_te, splits.test_labels, args.k, args.temperature)}
        metric.update(k=args.k, temperature=args.temperature)
    elif attentive:
        top1 = attentive_accuracy(
            x_tr, splits.train_labels, x_te, splits.test_labels, epochs=args.epochs, seed=args.seed
        )
        metric = {"top1": top1, "epochs": args.epochs}
    else:
        metric = {"top1": linear_accuracy(x_tr, splits.train_labels, x_te, splits.test_labels)}
    row = {
        "task": args.task, "checkpoint": args.checkpoint, "dataset": args.dataset,
        "features": "raw-pixels" if model is None else ("patch-tokens" if attentive else args.features),
        "image_size": size, **metric,
        "n_train": len(splits.train), "n_test": len(splits.test), "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    print(json.dumps(row))
    return 0


def _seg_knn(args: argparse.Namespace, t0: float) -> int:
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
