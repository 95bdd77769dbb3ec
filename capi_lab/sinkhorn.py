"""Sinkhorn-Knopp balancing of teacher logits into soft cluster assignments (capi-method.md §3).

The position-wise variant balances, for every patch position separately, how much each prototype
is used across the images of the (global) batch. Under ``torch.distributed`` the image axis is split
across ranks, so the max and the image-axis sums are all-reduced: every rank gets exactly what a
single process would compute on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _logsumexp_images(x: Tensor) -> Tensor:
    """``logsumexp`` over the image axis (dim 1) of the global batch: max and sum are all-reduced."""
    m = x.amax(dim=1, keepdim=True).detach()
    if _distributed():
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m).sum(dim=1, keepdim=True)
    if _distributed():
        dist.all_reduce(s, op=dist.ReduceOp.SUM)
    return m + torch.log(s)


def _sum_images(q: Tensor) -> Tensor:
    s = q.sum(dim=1, keepdim=True)
    if _distributed():
        dist.all_reduce(s, op=dist.ReduceOp.SUM)
    return s


def sinkhorn_knopp(logits: Float[Tensor, "n b k"], n_iter: int = 3) -> Float[Tensor, "n b k"]:
    """Balance ``logits`` arranged ``[positions, images, prototypes]`` (temperature already applied).

    Each iteration divides by the sum over the image axis (per position and prototype), then by the
    sum over the prototype axis (per token), so every token's assignment sums to 1 and, per position,
    prototypes get even mass across images. Computed in fp32 whatever the input dtype.

    The first iteration is done on logarithms (``x - logsumexp``): the same computation as the spec's
    ``exp(x - max + 50)`` followed by divisions, but it cannot underflow (with the exp form, a token
    whose scores sit ~150 below every prototype's best image becomes a row of zeros, then NaN). After
    it every column holds an entry >= 1/B and every row one >= 1/K, so the remaining iterations run
    in the cheaper multiplicative form without that risk.

    For the standard (not position-wise) variant see :func:`sinkhorn_standard`.
    """
    x = logits.float()
    x = x - _logsumexp_images(x)
    x = x - torch.logsumexp(x, dim=2, keepdim=True)
    q = torch.exp(x)
    for _ in range(n_iter - 1):
        q = q / _sum_images(q)
        q = q / q.sum(dim=2, keepdim=True)
    return q


def sinkhorn_standard(logits: Float[Tensor, "t k"], n_iter: int = 3) -> Float[Tensor, "t k"]:
    """The standard variant: all tokens of all images (and ranks) form one axis to balance over."""
    return sinkhorn_knopp(logits[None], n_iter)[0]


def teacher_targets(
    logits: Float[Tensor, "b n k"], temperature: float = 0.06, n_iter: int = 3, positionwise: bool = True
) -> Float[Tensor, "b n k"]:
    """Soft cluster assignments of every patch token from clustering-head logits ``[images, positions, K]``."""
    z = logits.float() / temperature
    if positionwise:
        return sinkhorn_knopp(z.transpose(0, 1), n_iter).transpose(0, 1)
    b, n, k = z.shape
    return sinkhorn_standard(z.reshape(b * n, k), n_iter).view(b, n, k)
