"""Evaluation during pretraining, as the authors' training loop launches it: every ``--eval.every`` steps the
teacher is scored by k-NN classification on a labelled set (``--eval.data``) and/or by quick k-NN segmentation
(``--eval.seg``), and one line of ``eval/...`` metrics goes to ``metrics.jsonl`` and the loggers.

    python -m capi_lab.train --preset tiny --data fashion-mnist --max-steps 300 --eval.every 100

The sets are read once, subsampled with a seed (``--eval.limit-train`` / ``--eval.limit-test``), and the features
are extracted at the training resolution in fp32, so a 2-core CPU spends about a second per evaluation at the
README's quick start (figures in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from capi_lab.config import ConfigError


@dataclass
class EvalDuringConfig:
    """Evaluations of the teacher while it trains (off unless ``every`` is set)."""

    every: int = 0
    """Steps between evaluations (0: none); one is also run at the last step."""
    data: str | None = None
    """Labelled set for k-NN classification: 'fashion-mnist', a folder of class sub-folders or a list file
    (default: fashion-mnist when training on it)."""
    seg: str | None = None
    """Segmentation set for quick k-NN segmentation: 'tuxpaint', a cut-out folder, ADE20K, VOC or a pairs folder."""
    limit_train: int = 1000
    """Bank images (seeded subset) of the k-NN classification; train scenes of the segmentation."""
    limit_test: int = 500
    """Test images (seeded subset); test scenes of the segmentation are a quarter of it."""
    k: int = 20
    """Neighbours of the k-NN classification (segmentation: 10)."""
    image_size: int | None = None
    """Input side (default: the training resolution)."""

    def __post_init__(self) -> None:
        for name in ("every", "limit_train", "limit_test", "k", "image_size"):
            value = getattr(self, name)
            low = 0 if name == "every" else 1
            if value is not None and value < low:
                raise ConfigError(f"--eval.{name.replace('_', '-')} must be >= {low}, got {value}")

    def resolved(self, train_data: str) -> EvalDuringConfig:
        """With ``data`` filled in (fashion-mnist when training on it); a ConfigError when ``every`` is set and
        there is nothing labelled to evaluate on."""
        if not self.every or self.data or self.seg:
            return self
        if train_data == "fashion-mnist":
            return EvalDuringConfig(**{**vars(self), "data": "fashion-mnist"})
        raise ConfigError(
            f"--eval.every {self.every} needs a labelled set: add --eval.data (fashion-mnist, a folder of class "
            "sub-folders or a list file) and/or --eval.seg (tuxpaint, ADE20K, VOC or a pairs folder)"
        )


class DuringTraining:
    """The sets of an :class:`EvalDuringConfig`, read once; ``__call__(model, step)`` scores a model."""

    def __init__(self, cfg: EvalDuringConfig, image_size: int, patch_size: int, seed: int = 0):
        from capi_lab.evaluation.datasets import load_labeled
        from capi_lab.evaluation.segsets import open_segmentation

        self.cfg, self.seed = cfg, seed
        self.size = cfg.image_size or image_size
        if self.size % patch_size:
            raise ConfigError(f"--eval.image-size {self.size} is not a multiple of the patch size {patch_size}")
        self.splits = load_labeled(cfg.data, seed, cfg.limit_train, cfg.limit_test) if cfg.data else None
        self.seg = None
        if cfg.seg:
            data = open_segmentation(cfg.seg, "auto", seed)
            if data is None:
                from pathlib import Path

                from capi_lab.evaluation.segmentation import tuxpaint_sets

                root = None if cfg.seg == "tuxpaint" else Path(cfg.seg)
                n_test = max(1, cfg.limit_test // 4)
                train, test = tuxpaint_sets(self.size, min(cfg.limit_train, 300), n_test, seed, root)
                self.seg = (train, test, ())
            else:
                self.seg = (data.train, data.test, data.ignore_labels)

    @torch.no_grad()
    def __call__(self, model, device: torch.device) -> dict[str, float]:
        from capi_lab.evaluation.classification import knn_accuracy
        from capi_lab.evaluation.segmentation import evaluate_quick
        from capi_lab.features import extract_features

        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        out: dict[str, float] = {}
        try:
            if self.splits is not None:
                s = self.splits
                f_tr, f_te = (
                    extract_features(model, src, self.size, 256, keep_patches=False, device=device, progress=False)
                    for src in (s.train, s.test)
                )
                y_tr, y_te = f_tr.labels(s.train_labels), f_te.labels(s.test_labels)
                out["eval/knn_top1"] = knn_accuracy(f_tr.global_repr, y_tr, f_te.global_repr, y_te, self.cfg.k,
                                                    device=device)  # fmt: skip
            if self.seg is not None:
                train, test, ignore = self.seg
                row = evaluate_quick(model, train, test, self.size, 10, 0.07, ignore, 64, device, progress=False,
                                     background=not ignore)  # fmt: skip
                out["eval/seg_miou"] = row["miou"]
                if "fg_bg_miou" in row:
                    out["eval/seg_fg_bg_miou"] = row["fg_bg_miou"]
        finally:
            model.train(was_training)
        out["eval/seconds"] = round(time.perf_counter() - t0, 2)
        return out
