"""PCA pictures of patch features: the first three principal components of the patch tokens as RGB.

Signs are fixed (each component oriented so that its largest-magnitude loading is positive), so the
same model and images give the same colours every time; with several images the basis is fit jointly,
so a colour means the same thing in every image.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def pca_basis(x: Float[Tensor, "n d"], k: int = 3) -> tuple[Float[Tensor, " d"], Float[Tensor, "k d"], Tensor]:
    """``(mean, components, explained_variance_ratio)`` of the rows of ``x``, sign-fixed."""
    x = x.double()
    mean = x.mean(0)
    _, s, v = torch.linalg.svd(x - mean, full_matrices=False)
    comps = v[:k]
    flip = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * flip
    var = s**2
    return mean.float(), comps.float(), (var[:k] / var.sum()).float()


def joint_pca(
    feature_maps: list[Float[Tensor, "_h _w d"]], quantile: float = 0.01
) -> tuple[list[Float[Tensor, "_h _w 3"]], Tensor]:
    """One PCA basis fit over all the maps: each ``[h, w, D]`` map as an ``[h, w, 3]`` image in [0, 1] (first 3
    components, each scaled by its ``quantile`` / ``1 - quantile`` values over all maps), and the explained
    variance ratio of those components."""
    flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in feature_maps])
    mean, comps, ratio = pca_basis(flat, min(3, *flat.shape))
    projs = [(f.reshape(-1, f.shape[-1]).float() - mean) @ comps.T for f in feature_maps]
    allp = torch.cat(projs)
    lo, hi = allp.quantile(quantile, dim=0), allp.quantile(1 - quantile, dim=0)
    maps = [((p - lo) / (hi - lo + 1e-8)).clamp(0, 1) for p in projs]
    if maps[0].shape[1] < 3:  # fewer than 3 components (a 1-patch map): the missing channels are black
        maps = [torch.nn.functional.pad(m, (0, 3 - m.shape[1])) for m in maps]
    return [m.view(*f.shape[:2], 3) for m, f in zip(maps, feature_maps, strict=True)], ratio


def pca_rgb(
    feature_maps: list[Float[Tensor, "_h _w d"]], joint: bool = True, quantile: float = 0.01
) -> list[Float[Tensor, "_h _w 3"]]:
    """Each ``[h, w, D]`` map as an ``[h, w, 3]`` image in [0, 1] (first 3 components, each scaled by
    its ``quantile`` / ``1 - quantile`` values): one basis for all maps (``joint``), or one per map."""
    if joint:
        return joint_pca(feature_maps, quantile)[0]
    return [joint_pca([f], quantile)[0][0] for f in feature_maps]
