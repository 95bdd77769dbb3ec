"""Sinkhorn-Knopp balancing of teacher logits into soft cluster assignments (capi-method.md §3).

The position-wise variant balances, for every patch position separately, how much each prototype
is used across the images of the (global) batch. Under ``torch.distributed`` the image axis is split
across ranks, so the max and the image-axis sums are all-reduced: every rank gets exactly what a
single process would compute on the concatenated batch.

The iterations are carried out on the two Sinkhorn scalings in log space ("potentials"): with
``q = exp(z + log_u + log_v)``, dividing by the sum over images updates ``log_u`` (one value per
position and prototype), and dividing by the sum over prototypes updates ``log_v`` (one value per
token). This is exactly the spec's alternating normalisation of ``exp(z - max + 50)``, but

* it cannot underflow: with the exp form a token whose scores sit ~150 below every prototype's best
  image becomes a row of zeros and then NaN;
* only the small scaling vectors are written between iterations, never a full ``[b, n, K]`` tensor,
  so a compiled step reads the logits once per half-iteration (``[256, 196, 16384]`` fp32 would be
  3.3 GB per pass at ViT-B / batch 256).

Run eagerly (no torch.compile) that form materialises several temporaries per half-iteration, so
there the first iteration is done on logarithms and the rest on the assignments themselves, which
is the same computation again: after one log-space iteration every column holds an entry >= 1/B and
every row one >= 1/K, so the multiplicative iterations cannot underflow either. The eager form works
in place on one copy of the logits: on a CPU every new tensor the size of a batch's logits is fresh
memory from the operating system, and touching it costs more than the arithmetic done on it (a new
51 MB tensor ~15 ms on two cores, an in-place division of the same tensor ~2 ms).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


CHUNK = 1 << 19
"""Elements in one temporary of the eager forms (2 MB of fp32): blocks that size are reused by the memory
allocator, while a temporary the size of the logits would be fresh memory every time."""


def row_chunks(x: Tensor) -> tuple[Tensor, ...]:
    """``x`` as ``[tokens, K]`` rows, in blocks of rows of at most :data:`CHUNK` elements (views when ``x`` is
    contiguous)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows.split(max(1, CHUNK // max(rows.shape[1], 1)))


def _logsumexp_images(x: Tensor, chunked: bool = False) -> Tensor:
    """``logsumexp`` over the image axis (dim 0) of the global batch: max and sum are all-reduced.
    ``chunked``: the sum a block at a time, with temporaries of at most :data:`CHUNK` elements."""
    m = x.amax(dim=0, keepdim=True).detach()
    if _distributed():
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    if chunked:  # a block of images at a time (contiguous)
        step = max(1, CHUNK // max(x[0].numel(), 1))
        s = sum(torch.exp(xc - m).sum(dim=0, keepdim=True) for xc in x.split(step))
    else:
        s = torch.exp(x - m).sum(dim=0, keepdim=True)
    if _distributed():
        dist.all_reduce(s, op=dist.ReduceOp.SUM)
    return m + torch.log(s)


def _log_sum_images(x: Tensor) -> Tensor:
    """``log(sum(exp(x)))`` over the image axis (dim 0) of the global batch, for ``x <= 0`` whose sums
    cannot underflow: one pass, no max."""
    s = torch.exp(x).sum(dim=0, keepdim=True)
    if _distributed():
        dist.all_reduce(s, op=dist.ReduceOp.SUM)
    return torch.log(s)


def sinkhorn_potentials(
    z: Float[Tensor, "b n k"], n_iter: int = 3
) -> tuple[Float[Tensor, "1 n k"], Float[Tensor, "b n 1"]]:
    """Log-scalings with ``exp(z + log_u + log_v)`` balanced: images on axis 0 (split across ranks),
    positions on axis 1 (balanced separately), prototypes on axis 2. Computed in fp32.

    Only the first iteration needs max-stabilised log-sum-exps. From then on the previous scalings are
    the stabiliser, so every later half-iteration reads the logits once:

    * after a column step every column sums to 1 over the images, so ``z + log_u + log_v <= 0``; the
      next row sum is over entries <= 1 and, the rows having summed to 1 before the column step, at
      least ``1 / B`` (a column sum is at most B) — no overflow, no underflow;
    * after a row step every row sums to 1, so ``z + log_u + log_v <= 0``; the next column sum is at
      least ``1 / K`` (each row was divided by at most K) — again safe in fp32.
    """
    z = z.float()
    log_u = -_logsumexp_images(z)
    log_v = -torch.logsumexp(z + log_u, dim=2, keepdim=True)
    for _ in range(n_iter - 1):
        log_u = log_u - _log_sum_images(z + log_u + log_v)
        log_v = log_v - torch.log(torch.exp(z + log_u + log_v).sum(dim=2, keepdim=True))
    return log_u, log_v


def sinkhorn_eager(z: Float[Tensor, "b n k"], n_iter: int = 3) -> Float[Tensor, "b n k"]:
    """The same balancing as ``exp(z + sinkhorn_potentials(z))``, cheaper without a compiler: one
    iteration on logarithms, then the usual multiplicative iterations on the assignments. Works on one fp32
    copy of ``z``; no gradient (the assignments are targets)."""
    return _balance_(z.detach().to(torch.float32, copy=True), n_iter)


@torch.no_grad()
def _balance_(x: Float[Tensor, "b n k"], n_iter: int) -> Float[Tensor, "b n k"]:
    """:func:`sinkhorn_eager` in place on ``x`` (fp32), which it returns."""
    x.sub_(_logsumexp_images(x, chunked=True))  # the first column step, on logarithms
    x.sub_(x.amax(dim=2, keepdim=True)).exp_()  # the first row step: a softmax over prototypes
    x.div_(x.sum(dim=2, keepdim=True))
    for _ in range(n_iter - 1):
        s = x.sum(dim=0, keepdim=True)
        if _distributed():
            dist.all_reduce(s, op=dist.ReduceOp.SUM)
        x.div_(s)
        x.div_(x.sum(dim=2, keepdim=True))
    return x


def teacher_targets(
    logits: Float[Tensor, "b n k"], temperature: float = 0.06, n_iter: int = 3, positionwise: bool = True
) -> Float[Tensor, "b n k"]:
    """Soft cluster assignments of every patch token from clustering-head logits ``[images, positions, K]``:
    each token's row sums to 1; per position, prototypes get even mass across the (global) batch.
    Eagerly the result carries no gradient (the method uses it as a target)."""
    z = logits.float() / temperature  # a new tensor, which the eager form balances in place
    b, n, k = z.shape
    if not positionwise:  # one axis of all tokens (of all images and ranks) to balance over
        z = z.reshape(b * n, 1, k)
    if torch.compiler.is_compiling():
        log_u, log_v = sinkhorn_potentials(z, n_iter)
        q = torch.exp(z + log_u + log_v)
    else:  # targets: no gradient
        q = _balance_(z.detach(), n_iter)
    return q.view(b, n, k)


def sinkhorn_knopp(logits: Float[Tensor, "n b k"], n_iter: int = 3) -> Float[Tensor, "n b k"]:
    """Position-wise Sinkhorn-Knopp in the spec's ``[positions, images, prototypes]`` layout
    (temperature already applied): per iteration, divide by the sum over images, then over prototypes."""
    return teacher_targets(logits.transpose(0, 1), 1.0, n_iter).transpose(0, 1)


def sinkhorn_standard(logits: Float[Tensor, "t k"], n_iter: int = 3) -> Float[Tensor, "t k"]:
    """The standard variant: all tokens (of all images and ranks) form one axis to balance over."""
    return teacher_targets(logits[:, None], 1.0, n_iter, positionwise=False)[:, 0]
