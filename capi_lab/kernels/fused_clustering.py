"""The teacher's Sinkhorn-Knopp targets and clustering loss as fused Triton kernels (CUDA).

At ViT-B/16, batch 256, the clustering logits are ``[256 * 196, 16384]``: 1.6 GB in bf16. Everything
the teacher derives from them is a reduction over that tensor, so the cost is the number of passes
over it and how close each pass runs to memory bandwidth. Here each Sinkhorn half-iteration is one
kernel that reads the logits once, with an online (running-max) log-sum-exp, so it never overflows or
underflows whatever the logits:

* column step (``_col_lse``): for every position and prototype, ``log_u = -logsumexp`` over the images
  of ``z + log_v`` (``z = logits / target_temp``); under ``torch.distributed`` the per-rank maxima and
  sums are all-reduced, so the balancing is over the global batch, as in :mod:`capi_lab.sinkhorn`;
* row step (``_row_lse``): for every token, ``log_v = -logsumexp`` over the prototypes of ``z + log_u``;
* the last row step is fused with everything the training step needs from the assignments
  ``q = exp(z + log_u + log_v)`` (``_final``): the rows at the predicted positions (the student's
  targets), each token's argmax, the entropy, and the clustering loss
  ``CE(q, softmax(logits / student_temp))``, whose log-sum-exp it computes in the same sweep;
* the backward of the loss (``_grad``) recomputes ``softmax(logits / student_temp) - q`` in one pass
  and writes the gradient of the logits.

With 3 iterations that is 6 reads of the logits forward and 1 read + 1 write backward. The result is
the same Sinkhorn as :func:`capi_lab.sinkhorn.teacher_targets` (tested against it, also across ranks).

The kernels run on CUDA tensors compiled by Triton, and on CPU tensors through Triton's interpreter
(slow; that is how the CPU test suite checks them). :func:`teacher_outputs` is wrapped as a
``torch.library`` custom op with its own backward, so a ``torch.compile``d teacher step calls the
kernels as one opaque node. Set ``CAPI_LAB_FUSED_SINKHORN=0`` to use the compiled PyTorch form instead.
"""

import functools
import os

import torch
import torch.distributed as dist
from torch import Tensor

from capi_lab.kernels import triton_support
from capi_lab.sinkhorn import is_distributed

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path in capi_lab.sinkhorn is used
    triton = None

if triton is not None:
    # Masked-out lanes (past K, past the last image) are loaded as the very negative NEG instead of being
    # masked with -inf after the load: their exp is exactly 0 and no inf - inf or 0 * inf can arise, so no
    # lane needs a select. NEG is -1e30 for bf16 / fp32 logits, -6e4 for fp16 (its largest finite value).

    def _program_tokens(B, N, ROWS: tl.constexpr):
        """The tokens a row-kernel program handles: ``ROWS`` images at one position ``n``. Returns ``n``, which
        of the images exist, and the tokens' flat row indices into ``[B * N, K]``."""
        pid = tl.program_id(0)
        nbb = tl.cdiv(B, ROWS)
        n = pid // nbb
        offs_b = (pid % nbb) * ROWS + tl.arange(0, ROWS)
        return n, offs_b < B, (offs_b * N + n).to(tl.int64)

    def _tile(x_ptr, lu_ptr, rows, rmask, n, k0, K: tl.constexpr, other: tl.constexpr, BLOCK_K: tl.constexpr):
        """Prototypes ``k0 .. k0 + BLOCK_K`` of the given token rows (fp32; ``other`` where ``rmask`` is off or
        past ``K``) and of ``lu[n]``; also the prototype indices and which of them exist."""
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        mask = rmask[:, None] & kmask[None, :]
        x = tl.load(x_ptr + rows[:, None] * K + offs_k[None, :], mask=mask, other=other).to(tl.float32)
        lu = tl.load(lu_ptr + n * K + offs_k, mask=kmask, other=0.0)
        return offs_k, kmask, x, lu

    # the row kernels call these, so they are Triton functions themselves (unwrapped: see _jit)
    _program_tokens = triton_support.jit(_program_tokens)
    _tile = triton_support.jit(_tile)

    def _col_lse(x_ptr, lv_ptr, m_ptr, s_ptr, B, N, K: tl.constexpr, rows_per_split: tl.constexpr, scale,
                 HAS_LV: tl.constexpr, FINISH: tl.constexpr, NEG: tl.constexpr, BLOCK_B: tl.constexpr,
                 BLOCK_K: tl.constexpr):  # fmt: skip
        """Per (split of the images, position n, block of prototypes): running max ``m`` and sum ``s`` with
        ``logsumexp_b(x[b, n, k] * scale + lv[b, n]) = m + log(s)`` over this split's images. ``FINISH``
        (one split, one rank): write the column step's result ``-(m + log s)`` to ``m_ptr`` directly."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        nkb = tl.cdiv(K, BLOCK_K)
        n = pid // nkb
        offs_k = (pid % nkb) * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        m = tl.full([BLOCK_K], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_K], tl.float32)
        for b0 in range(0, rows_per_split, BLOCK_B):  # rows_per_split is a multiple of BLOCK_B
            offs_b = split * rows_per_split + b0 + tl.arange(0, BLOCK_B)
            bmask = offs_b < B
            rows = (offs_b * N + n).to(tl.int64)
            mask = bmask[:, None] & kmask[None, :]
            x = tl.load(x_ptr + rows[:, None] * K + offs_k[None, :], mask=mask, other=NEG).to(tl.float32) * scale
            if HAS_LV:
                x += tl.load(lv_ptr + rows, mask=bmask, other=0.0)[:, None]
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[None, :]), axis=0)
            m = m_new
        out = (split * N + n) * K + offs_k
        if FINISH:
            tl.store(m_ptr + out, -(m + tl.log(s)), mask=kmask)
        else:
            tl.store(m_ptr + out, m, mask=kmask)
            tl.store(s_ptr + out, s, mask=kmask)

    def _row_lse(x_ptr, lu_ptr, lv_ptr, lse_ptr, B, N, K: tl.constexpr, scale, scale_s, WITH_LSE_S: tl.constexpr,
                 NEG: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        """``lv[b, n] = -logsumexp_k(x[b, n, k] * scale + lu[n, k])`` for ``ROWS`` images at one position
        (so each block of ``lu`` is read once for all of them); with ``WITH_LSE_S`` also
        ``lse_s[b, n] = logsumexp_k(x[b, n, k] * scale_s)`` for the clustering loss."""
        n, bmask, rows = _program_tokens(B, N, ROWS)
        m = tl.full([ROWS], float("-inf"), tl.float32)
        s = tl.zeros([ROWS], tl.float32)
        m2 = tl.full([ROWS], float("-inf"), tl.float32)
        s2 = tl.zeros([ROWS], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            _, _, x, lu = _tile(x_ptr, lu_ptr, rows, bmask, n, k0, K, NEG, BLOCK_K)
            z = x * scale + lu[None, :]
            m_new = tl.maximum(m, tl.max(z, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m = m_new
            if WITH_LSE_S:
                y = x * scale_s
                m_new = tl.maximum(m2, tl.max(y, axis=1))
                s2 = s2 * tl.exp(m2 - m_new) + tl.sum(tl.exp(y - m_new[:, None]), axis=1)
                m2 = m_new
        tl.store(lv_ptr + rows, -(m + tl.log(s)), mask=bmask)
        if WITH_LSE_S:
            tl.store(lse_ptr + rows, m2 + tl.log(s2), mask=bmask)

    def _final(x_ptr, lu_ptr, dest_ptr, t_ptr, lv_ptr, lse_ptr, loss_ptr, ent_ptr, arg_ptr, B, N,
               K: tl.constexpr, scale, scale_s, NEG: tl.constexpr, ROWS: tl.constexpr,
               BLOCK_K: tl.constexpr):  # fmt: skip
        """The last row step and everything taken from ``q = exp(z + lu + lv)``, for ``ROWS`` tokens, in one
        sweep over the logits: with ``e = exp(z + lu - m)`` under a running max ``m``,

        * ``lv = -(m + log sum e)``;
        * entropy ``-sum q log q = -lv - sum(e * (z + lu)) / sum e``;
        * loss ``sum q * (lse_s - x * scale_s) = lse_s - scale_s * sum(e * x) / sum e`` (``lse_s`` from the
          first row step);
        * argmax of ``z + lu``.

        Then, only for tiles holding a predicted token (``dest >= 0``), ``q`` is written to ``t[dest]``.
        """
        n, bmask, rows = _program_tokens(B, N, ROWS)
        m = tl.full([ROWS], float("-inf"), tl.float32)
        s = tl.zeros([ROWS], tl.float32)
        wz = tl.zeros([ROWS], tl.float32)
        wx = tl.zeros([ROWS], tl.float32)
        best_k = tl.zeros([ROWS], tl.int32)
        for k0 in range(0, K, BLOCK_K):
            _, _, x, lu = _tile(x_ptr, lu_ptr, rows, bmask, n, k0, K, NEG, BLOCK_K)
            z = x * scale + lu[None, :]
            tile_best = tl.max(z, axis=1)
            tile_k = tl.argmax(z, axis=1).to(tl.int32) + k0
            best_k = tl.where(tile_best > m, tile_k, best_k)
            m_new = tl.maximum(m, tile_best)
            alpha = tl.exp(m - m_new)
            e = tl.exp(z - m_new[:, None])  # 0 in masked lanes
            s = s * alpha + tl.sum(e, axis=1)
            wz = wz * alpha + tl.sum(e * z, axis=1)
            wx = wx * alpha + tl.sum(e * x, axis=1)
            m = m_new
        lv = -(m + tl.log(s))
        lse_s = tl.load(lse_ptr + rows, mask=bmask, other=0.0)
        tl.store(lv_ptr + rows, lv, mask=bmask)
        tl.store(loss_ptr + rows, lse_s - scale_s * wx / s, mask=bmask)
        tl.store(ent_ptr + rows, -lv - wz / s, mask=bmask)
        tl.store(arg_ptr + rows, best_k, mask=bmask)
        dest = tl.load(dest_ptr + rows, mask=bmask, other=-1).to(tl.int64)
        keep = bmask & (dest >= 0)
        if tl.max(keep.to(tl.int32), axis=0) > 0:  # ~3 % of tokens are predicted: most tiles skip this
            for k0 in range(0, K, BLOCK_K):
                offs_k, kmask, x, lu = _tile(x_ptr, lu_ptr, rows, keep, n, k0, K, 0.0, BLOCK_K)
                t = x * scale + lu[None, :] + lv[:, None]
                mask = keep[:, None] & kmask[None, :]
                tl.store(t_ptr + dest[:, None] * K + offs_k[None, :], tl.exp(t), mask=mask)

    def _grad(x_ptr, lu_ptr, lv_ptr, lse_ptr, go_ptr, g_ptr, B, N, K: tl.constexpr, scale, scale_s, coef,
              ROWS: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        """``g = go * coef * (softmax(x * scale_s) - q)``: the gradient of the mean clustering loss."""
        n, bmask, rows = _program_tokens(B, N, ROWS)
        lv = tl.load(lv_ptr + rows, mask=bmask, other=0.0)
        lse_s = tl.load(lse_ptr + rows, mask=bmask, other=0.0)
        c = tl.load(go_ptr).to(tl.float32) * coef
        for k0 in range(0, K, BLOCK_K):
            offs_k, kmask, x, lu = _tile(x_ptr, lu_ptr, rows, bmask, n, k0, K, 0.0, BLOCK_K)
            g = tl.exp(x * scale_s - lse_s[:, None]) - tl.exp(x * scale + lu[None, :] + lv[:, None])
            mask = bmask[:, None] & kmask[None, :]
            tl.store(g_ptr + rows[:, None] * K + offs_k[None, :], (g * c).to(g_ptr.dtype.element_ty), mask=mask)


def _check_runnable(x: Tensor) -> None:
    """Once per op, before anything uses Triton: CUDA tensors, or CPU tensors through Triton's interpreter."""
    triton_support.check_runnable(
        x, "fused Sinkhorn", "set CAPI_LAB_FUSED_SINKHORN=0 (or use capi_lab.sinkhorn.teacher_targets)"
    )


@functools.cache
def _jit(name: str):
    return triton_support.jit(globals()[name])


ENABLED = triton is not None and os.environ.get("CAPI_LAB_FUSED_SINKHORN", "1") != "0"
"""Use the kernels for CUDA tensors (read once from ``CAPI_LAB_FUSED_SINKHORN``; may be set directly)."""


def available(x: Tensor) -> bool:
    """Whether the fused kernels will be used for ``x``: Triton is importable, ``x`` is on a CUDA device
    (CPU tensors only through :func:`teacher_outputs` called directly, for tests) and :data:`ENABLED`."""
    return ENABLED and x.is_cuda


BLOCKS = {"col": {"BLOCK_B": 8, "BLOCK_K": 1024, "num_warps": 4}, "row": {"ROWS": 4, "BLOCK_K": 256, "num_warps": 4}}
"""Tile sizes: the column kernel streams ``BLOCK_B`` images x ``BLOCK_K`` prototypes at a time, the row
kernels (row step, final, backward) ``ROWS`` tokens x ``BLOCK_K`` prototypes
(``benchmarks/sinkhorn_kernels.py`` times alternatives)."""


def _neg(x: Tensor) -> float:
    return -6.0e4 if x.dtype == torch.float16 else -1.0e30


def _col_step(x: Tensor, lv: Tensor | None, scale: float) -> Tensor:
    """``log_u[n, k] = -logsumexp_b(x[b, n, k] * scale + lv[b, n])`` over the images of all ranks."""
    B, N, K = x.shape
    cfg = BLOCKS["col"]
    bb, nkb = cfg["BLOCK_B"], triton.cdiv(K, cfg["BLOCK_K"])
    # split the image axis when there are too few (position, prototype-block) pairs to fill the GPU
    split = max(1, min(triton.cdiv(B, 4 * bb), triton.cdiv(2048, N * nkb)))
    per = triton.cdiv(triton.cdiv(B, split), bb) * bb
    split = triton.cdiv(B, per)
    finish = split == 1 and not is_distributed()  # the kernel can write log_u itself
    m = x.new_empty((split, N, K), dtype=torch.float32)
    s = m if finish else torch.empty_like(m)
    lv_arg = lv if lv is not None else m  # unused when HAS_LV is False
    _jit("_col_lse")[(N * nkb, split)](
        x, lv_arg, m, s, B, N, K, per, scale, HAS_LV=lv is not None, FINISH=finish, NEG=_neg(x), **cfg
    )
    if finish:
        return m[0]
    top = m.amax(0)
    if is_distributed():
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    total = (s * torch.exp(m - top)).sum(0)
    if is_distributed():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return -(top + torch.log(total))


def _rows_grid(B: int, N: int) -> tuple[int]:
    return (N * triton.cdiv(B, BLOCKS["row"]["ROWS"]),)


def _row_step(x: Tensor, lu: Tensor, scale: float, lse_s: Tensor | None = None, scale_s: float = 1.0) -> Tensor:
    """``log_v[b, n] = -logsumexp_k(x[b, n, k] * scale + lu[n, k])``; also fills ``lse_s`` when given."""
    B, N, K = x.shape
    lv = x.new_empty((B, N), dtype=torch.float32)
    _jit("_row_lse")[_rows_grid(B, N)](
        x, lu, lv, lv if lse_s is None else lse_s, B, N, K, scale, scale_s, WITH_LSE_S=lse_s is not None,
        NEG=_neg(x), **BLOCKS["row"],
    )  # fmt: skip
    return lv


def _as_tokens(logits: Tensor, positionwise: bool) -> Tensor:
    """``[images, positions, K]`` to balance over axis 0 per position: as given, or every token of the
    batch on axis 0 (the standard variant)."""
    b, n, k = logits.shape
    x = logits.contiguous()
    return x if positionwise else x.view(b * n, 1, k)


@torch.library.custom_op("capi_lab::cluster_teacher", mutates_args=())
def _teacher_op(
    logits: Tensor, dest: Tensor, n_out: int, target_temp: float, student_temp: float, n_iter: int, positionwise: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_runnable(logits)
    b, n, k = logits.shape
    x = _as_tokens(logits, positionwise)
    B, N, K = x.shape
    scale, scale_s = 1.0 / target_temp, 1.0 / student_temp
    lse_s = x.new_empty((B, N), dtype=torch.float32)  # logsumexp(logits / student_temp), by the first row step
    lv = None
    for it in range(n_iter):
        lu = _col_step(x, lv, scale)
        if it < n_iter - 1:
            lv = _row_step(x, lu, scale, lse_s if it == 0 else None, scale_s)
    if n_iter == 1:  # no row step before the final one
        _row_step(x, lu, scale, lse_s, scale_s)
    targets = x.new_empty((n_out, K), dtype=torch.float32)  # every row is written: dest maps onto 0..n_out-1
    lv = x.new_empty((B, N), dtype=torch.float32)
    loss, ent = torch.empty_like(lv), torch.empty_like(lv)
    arg = x.new_empty((B, N), dtype=torch.int32)
    _jit("_final")[_rows_grid(B, N)](
        x, lu, dest, targets, lv, lse_s, loss, ent, arg, B, N, K, scale, scale_s, NEG=_neg(x), **BLOCKS["row"]
    )
    return targets, loss.mean(), ent.mean(), arg.view(b, n).long(), lu, lv, lse_s


@_teacher_op.register_fake
def _(logits, dest, n_out, target_temp, student_temp, n_iter, positionwise):
    b, n, k = logits.shape
    B, N = (b, n) if positionwise else (b * n, 1)
    f32 = torch.float32
    return (
        logits.new_empty((n_out, k), dtype=f32),
        logits.new_empty((), dtype=f32),
        logits.new_empty((), dtype=f32),
        logits.new_empty((b, n), dtype=torch.long),
        logits.new_empty((N, k), dtype=f32),
        logits.new_empty((B, N), dtype=f32),
        logits.new_empty((B, N), dtype=f32),
    )


@torch.library.custom_op("capi_lab::cluster_loss_backward", mutates_args=())
def _backward_op(
    logits: Tensor, lu: Tensor, lv: Tensor, lse_s: Tensor, grad_loss: Tensor, target_temp: float,
    student_temp: float, positionwise: bool,
) -> Tensor:  # fmt: skip
    _check_runnable(logits)
    x = _as_tokens(logits, positionwise)
    B, N, K = x.shape
    g = torch.empty_like(x)
    coef = 1.0 / (student_temp * B * N)
    _jit("_grad")[_rows_grid(B, N)](
        x, lu, lv, lse_s, grad_loss.float(), g, B, N, K, 1.0 / target_temp, 1.0 / student_temp, coef,
        **BLOCKS["row"],
    )  # fmt: skip
    return g.view(logits.shape)


@_backward_op.register_fake
def _(logits, lu, lv, lse_s, grad_loss, target_temp, student_temp, positionwise):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output) -> None:
    logits, _, _, target_temp, student_temp, _, positionwise = inputs
    ctx.save_for_backward(logits, *output[4:])
    ctx.args = (target_temp, student_temp, positionwise)


def _backward(ctx, g_targets, g_loss, *_):
    if g_loss is None:
        return (None,) * 7
    logits, lu, lv, lse_s = ctx.saved_tensors
    return (_backward_op(logits, lu, lv, lse_s, g_loss, *ctx.args),) + (None,) * 6


_teacher_op.register_autograd(_backward, setup_context=_setup_context)


def teacher_outputs(
    logits: Tensor,
    predict_indices: Tensor | None = None,
    target_temp: float = 0.06,
    student_temp: float = 0.12,
    n_iter: int = 3,
    positionwise: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(targets, clustering_loss, assignments, target_entropy)`` from clustering logits ``[b, n, K]``, as
    :func:`capi_lab.losses.teacher_step` defines them; only ``clustering_loss`` carries a gradient (into
    ``logits``). ``targets`` are the assignment rows at ``predict_indices`` (flat indices into ``b * n``),
    shaped ``[b, n_pred, K]``, or all of them when it is None."""
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    b, n, k = logits.shape
    if predict_indices is None:
        dest = torch.arange(b * n, device=logits.device, dtype=torch.int32)
        n_out = b * n
    else:
        n_out = predict_indices.numel()
        dest = torch.full((b * n,), -1, device=logits.device, dtype=torch.int32)
        dest[predict_indices] = torch.arange(n_out, device=logits.device, dtype=torch.int32)
    targets, loss, entropy, assignments, *_ = _teacher_op(
        logits, dest, n_out, float(target_temp), float(student_temp), int(n_iter), bool(positionwise)
    )
    return targets.view(b, n_out // b, k).detach(), loss, assignments, entropy.detach()


__all__ = ["available", "teacher_outputs"]
