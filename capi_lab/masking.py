"""Which patches the student sees and which it must predict (capi-method.md §2).

A strategy yields one boolean ``[h, w]`` mask per image (True = masked) with exactly
``n_masked = int(N * ratio)`` masked patches; optionally rolled; then ``n_predict =
int(n_masked * prediction_subsampling)`` of the masked patches are chosen to be scored. A batch is
described by flat index tensors into ``[B*N)`` that reshape to ``[B, n]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from capi_lab.config import MaskConfig


class MaskBatch(NamedTuple):
    """Masks of a batch and the flat indices the model consumes."""

    masks: Bool[Tensor, "b n"]
    """True where a patch is hidden from the student."""
    visible_indices: Int[Tensor, " b_n_vis"]
    """Flat indices (into ``[B*N)``) of the visible patches, image by image, sorted."""
    predict_indices: Int[Tensor, " b_n_pred"]
    """Flat indices of the masked patches that are predicted and scored."""


def mask_counts(num_patches: int, config: MaskConfig) -> tuple[int, int, int]:
    """``(n_masked, n_visible, n_predict)`` per image; raises if any would be zero."""
    n_masked = int(num_patches * config.ratio)
    n_predict = int(n_masked * config.prediction_subsampling)
    n_visible = num_patches - n_masked
    if min(n_masked, n_visible, n_predict) < 1:
        raise ValueError(
            f"with {num_patches} patches, mask ratio {config.ratio} and prediction subsampling "
            f"{config.prediction_subsampling}: {n_masked} masked, {n_visible} visible, {n_predict} predicted; "
            "each must be >= 1 (use larger images, a smaller patch size, or a higher prediction_subsampling)"
        )
    return n_masked, n_visible, n_predict


def rectangle(n: int, h: int, w: int, rng: np.random.Generator, min_aspect: float, max_aspect: float) -> np.ndarray:
    """A boolean ``[h, w]`` map with exactly ``n`` True cells: a rectangle of random aspect ratio
    (height/width log-uniform in ``[min_aspect, max_aspect]``, clipped to fit) and random position,
    truncated in row-major order to ``n`` cells."""
    aspect = math.exp(rng.uniform(math.log(min_aspect), math.log(max_aspect)))
    rh = min(max(round(math.sqrt(n * aspect)), 1), h)
    rw = math.ceil(n / rh)
    if rw > w:
        rw = w
        rh = math.ceil(n / w)
    top = int(rng.integers(0, h - rh + 1))
    left = int(rng.integers(0, w - rw + 1))
    cells = np.zeros(rh * rw, dtype=bool)
    cells[:n] = True
    out = np.zeros((h, w), dtype=bool)
    out[top : top + rh, left : left + rw] = cells.reshape(rh, rw)
    return out


def _random(n_masked: int, h: int, w: int, rng: np.random.Generator, config: MaskConfig) -> np.ndarray:
    out = np.zeros(h * w, dtype=bool)
    out[rng.choice(h * w, n_masked, replace=False)] = True
    return out.reshape(h, w)


def _block(n_masked: int, h: int, w: int, rng: np.random.Generator, config: MaskConfig) -> np.ndarray:
    return rectangle(n_masked, h, w, rng, config.min_aspect, config.max_aspect)


def _inverse_block(n_masked: int, h: int, w: int, rng: np.random.Generator, config: MaskConfig) -> np.ndarray:
    return ~rectangle(h * w - n_masked, h, w, rng, config.min_aspect, config.max_aspect)


MASK_STRATEGIES: dict[str, Callable[..., np.ndarray]] = {
    "random": _random,
    "block": _block,
    "inverse_block": _inverse_block,
}
"""Registry of masking strategies: ``fn(n_masked, h, w, rng, config) -> bool [h, w]``."""


def sample_mask(h: int, w: int, config: MaskConfig, rng: np.random.Generator) -> np.ndarray:
    """One ``[h, w]`` mask (True = masked) with exactly ``int(h*w*ratio)`` masked patches."""
    n_masked, _, _ = mask_counts(h * w, config)
    mask = MASK_STRATEGIES[config.strategy](n_masked, h, w, rng, config)
    if config.roll:
        mask = np.roll(mask, (int(rng.integers(h)), int(rng.integers(w))), axis=(0, 1))
    return mask


def sample_masks(
    batch_size: int, h: int, w: int, config: MaskConfig, rng: np.random.Generator | int | None = None
) -> MaskBatch:
    """Masks and flat visible/predict indices for a batch of ``batch_size`` images of ``h x w`` patches."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    n = h * w
    _, _, n_predict = mask_counts(n, config)
    masks = np.stack([sample_mask(h, w, config, rng).reshape(n) for _ in range(batch_size)])
    offsets = np.arange(batch_size)[:, None] * n
    visible = np.stack([np.flatnonzero(~m) for m in masks]) + offsets
    predict = np.stack([np.sort(rng.choice(np.flatnonzero(m), n_predict, replace=False)) for m in masks]) + offsets
    return MaskBatch(
        torch.from_numpy(masks),
        torch.from_numpy(visible.reshape(-1)).long(),
        torch.from_numpy(predict.reshape(-1)).long(),
    )
