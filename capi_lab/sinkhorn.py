"""Sinkhorn-Knopp balancing of teacher logits into soft cluster assignments (capi-method.md §3).

The method, as the spec states it (position-wise; ``z = logits / temperature`` laid out ``[positions, images,
prototypes]``)::

    q = exp(z - z.amax(dim=1, keepdim=True) + 50)
    for _ in range(n_iter):
        q = q / q.sum(dim=1, keepdim=True)  # per position and prototype: even use across the images
        q = q / q.sum(dim=2, keepdim=True)  # per token: a distribution over the prototypes

:func:`sinkhorn_reference` is exactly that, and every implementation below is tested against it. The
standard variant flattens positions and images into one axis first. Under ``torch.distributed`` the image
axis is split across ranks and the image-axis max and sums are all-reduced, so every rank gets what one
process would compute on the whole batch.

Three implementations compute the same assignments (:data:`IMPLS`; the training loop picks one per run and
says which, :func:`default_impl`):

* ``"potentials"`` — for a compiled step. The iterations are carried out on the two Sinkhorn scalings in
  log space: with ``q = exp(z + log_u + log_v)``, dividing by the sum over images updates ``log_u`` (one value
  per position and prototype), and dividing by the sum over prototypes updates ``log_v`` (one per token).
  It cannot underflow (with the exp form a token whose scores sit ~150 below every prototype's best image
  becomes a row of zeros, then NaN), and only the small scaling vectors are written between iterations, so
  the compiled step reads the logits once per half-iteration instead of writing a ``[b, n, K]`` tensor.
* ``"eager"`` — without a compiler that form makes several temporaries per half-iteration, so here the first
  iteration is done on logarithms and the rest multiplicatively on the assignments, in place on one fp32
  copy of the logits. After one log-space iteration every column holds an entry >= 1/B and every row one
  >= 1/K, so the multiplicative iterations cannot underflow either. In place matters on a CPU: every new
  tensor the size of the logits is fresh memory from the operating system, and touching it costs more than
  the arithmetic done on it.
* ``"fused"`` — Triton kernels that compute targets, loss and entropy together on a CUDA GPU
  (:mod:`capi_lab.kernels.fused_clustering`, through :func:`capi_lab.losses.clustering_outputs`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor

IMPLS = ("eager", "potentials", "fused")
"""The Sinkhorn implementations (module docstring); :func:`default_impl` picks one for a device."""


def sinkhorn_reference(z: Float[Tensor, "n b k"], n_iter: int = 3) -> Float[Tensor, "n b k"]:
    """The spec's position-wise Sinkhorn-Knopp, word for word (one process, fp32): the reference the faster
    implementations are tested against. It underflows for score spreads beyond ~130 (see the module docstring)."""
    q = torch.exp(z.float() - z.float().amax(dim=1, keepdim=True) + 50)
    for _ in range(n_iter):
        q = q / q.sum(dim=1, keepdim=True)
        q = q / q.sum(dim=2, keepdim=True)
    return q


def default_impl(device: torch.device | str, compiled: bool) -> str:
    """The implementation a step on ``device`` uses unless told otherwise: ``fused`` on a CUDA device when Triton
    is installed (and ``CAPI_LAB_FUSED_SINKHORN`` is not 0), else ``potentials`` in a compiled step and
    ``eager`` in an eager one."""
    from capi_lab.kernels import fused_clustering

    if torch.device(device).type == "cuda" and fused_clustering.ENABLED:
        return "fused"
    return "potentials" if compiled else "eager"


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown Sinkhorn implementation {impl!r}; choose one of {', '.join(IMPLS)}")
    return impl


def is_distributed() -> bool:
    """Whether the image axis is split across ranks (an initialised process group of more than one)."""
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
    if is_distributed():
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    if chunked:  # a block of images at a time (contiguous)
        step = max(1, CHUNK // max(x[0].numel(), 1))
        s = sum(torch.exp(xc - m).sum(dim=0, keepdim=True) for xc in x.split(step))
    else:
        s = torch.exp(x - m).sum(dim=0, keepdim=True)
    if is_distributed():
        dist.all_reduce(s, op=dist.ReduceOp.SUM)
    return m + torch.log(s)


def _log_sum_images(x: Tensor) -> Tensor:
    """``log(sum(exp(x)))`` over the image axis (dim 0) of the global batch, for ``x <= 0`` whose sums
    cannot underflow: one pass, no max."""
    s = torch.exp(x).sum(dim=0, keepdim=True)
    if is_distributed():
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
        if is_distributed():
            dist.all_reduce(s, op=dist.ReduceOp.SUM)
        x.div_(s)
        x.div_(x.sum(dim=2, keepdim=True))
    return x


def teacher_targets(
    logits: Float[Tensor, "b n k"],
    temperature: float = 0.06,
    n_iter: int = 3,
    positionwise: bool = True,
    impl: str | None = None,
) -> Float[Tensor, "b n k"]:
    """Soft cluster assignments of every patch token from clustering-head logits ``[images, positions, K]``:
    each token's row sums to 1; per position, prototypes get even mass across the (global) batch.
    ``n_iter=0``: no balancing at all, the plain softmax (what collapses; for ablations only).
    ``impl`` is ``eager`` or ``potentials`` (default: ``potentials`` inside torch.compile, else ``eager``; the
    ``fused`` kernels compute the loss with the targets, see :func:`capi_lab.losses.clustering_outputs`). The
    ``eager`` result carries no gradient (the method uses it as a target)."""
    impl = check_impl(impl or ("potentials" if torch.compiler.is_compiling() else "eager"))
    if impl == "fused":
        raise ValueError("the fused kernels return targets with the loss: call capi_lab.losses.clustering_outputs")
    z = logits.float() / temperature  # a new tensor, which the eager form balances in place
    b, n, k = z.shape
    if n_iter == 0:  # no balancing: the head's own softmax (the collapse ablation, Table 1(i))
        return torch.softmax(z if impl == "potentials" else z.detach(), dim=-1)
    if not positionwise:  # one axis of all tokens (of all images and ranks) to balance over
        z = z.reshape(b * n, 1, k)
    if impl == "potentials":
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
