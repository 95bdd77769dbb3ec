"""RoPE on q and k as one Triton kernel per call (CUDA), each angle's cosine and sine computed once.

:class:`capi_lab.model.rope.Rope` applies ``x * cos(angle) + rotate_half(x) * sin(angle)`` with the angle of
each token and channel shared by all heads. Written in PyTorch, a compiled step gets one fused pointwise
kernel for it, but that kernel computes the cosine and sine for every element of every head: at ViT-B/16
that is 12 times the trigonometry needed, and in the last GPU profile it made the kernel compute-bound
(108 us a call, 24 calls a step).

Here a program takes a tile of one image's tokens, computes their angles, cosines and sines once, and loops
over the heads, reading and writing each element once. In self-attention the q and k heads (adjacent in the
fused q/k/v projection) go through one call and come back as two tensors, so that neither the forward nor
the backward needs a copy to split or join them.

The forward is :func:`rotate` (a ``torch.library`` custom op with its own backward: the transposed map, by
the same kernel with the sines swapped and negated), so a ``torch.compile``d step calls the kernel as one
opaque node, or, with :data:`TRACEABLE`, launches it from Inductor's generated code. Like
:mod:`capi_lab.kernels.fused_clustering`, the kernel runs on CUDA tensors, and on CPU tensors through Triton's
interpreter (how the CPU test suite checks it).

On by default for CUDA tensors (``CAPI_LAB_FUSED_ROPE=0`` switches it off), because the compiled training step
is faster with it than with Inductor's kernel for the PyTorch form (figures in ``benchmarks/RESULTS.md``).
"""

import functools
import os

import torch
from torch import Tensor

from capi_lab.kernels import triton_support

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: Rope's PyTorch form is used
    triton = None

if triton is not None:

    def _rotate_pair(x_ptr, o_ptr, mask, cos_a, sin_a, cos_b, sin_b, HALF: tl.constexpr):
        """One head of a token tile: ``[x1, x2] -> [x1 cos_a - x2 sin_a, x2 cos_b + x1 sin_b]`` in fp32."""
        x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_ptr, (x1 * cos_a - x2 * sin_a).to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(o_ptr + HALF, (x2 * cos_b + x1 * sin_b).to(o_ptr.dtype.element_ty), mask=mask)

    _rotate_pair = triton_support.jit(_rotate_pair)  # called by the kernel

    def _rope(x0_ptr, x1_ptr, o0_ptr, o1_ptr, c_ptr, f_ptr, T, HEADS, sx0_b, sx0_t, sx0_h, sx1_b, sx1_t, sx1_h,
              so_b, so_t, so_h, sc_b, sc_t, sc_c, HALF: tl.constexpr, PARTS: tl.constexpr, INVERSE: tl.constexpr,
              BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
        """Program (token tile, image): the tile's angles ``coords @ freqs`` (``freqs`` is the contiguous
        ``[2, 2 * HALF]`` table), their cosines and sines, then every head of ``x0`` (and ``x1`` when
        ``PARTS == 2``) rotated into ``o0`` (``o1``). ``INVERSE`` applies the transposed map, the backward."""
        pid_t = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        tmask = offs_t < T
        dmask = offs_d < HALF
        mask = tmask[:, None] & dmask[None, :]
        coord = c_ptr + b * sc_b + offs_t * sc_t
        row = tl.load(coord, mask=tmask, other=0.0).to(tl.float32)[:, None]
        col = tl.load(coord + sc_c, mask=tmask, other=0.0).to(tl.float32)[:, None]
        angle_a = row * tl.load(f_ptr + offs_d, mask=dmask, other=0.0)[None, :]
        angle_a += col * tl.load(f_ptr + 2 * HALF + offs_d, mask=dmask, other=0.0)[None, :]
        angle_b = row * tl.load(f_ptr + HALF + offs_d, mask=dmask, other=0.0)[None, :]
        angle_b += col * tl.load(f_ptr + 3 * HALF + offs_d, mask=dmask, other=0.0)[None, :]
        cos_a, sin_a = tl.cos(angle_a), tl.sin(angle_a)
        cos_b, sin_b = tl.cos(angle_b), tl.sin(angle_b)
        if INVERSE:  # the transpose of [[cos_a, -sin_a], [sin_b, cos_b]] (not a rotation in the capi layout)
            minus_sin_b = -sin_b
            sin_b = -sin_a
            sin_a = minus_sin_b
        x0 = x0_ptr + b * sx0_b + offs_t[:, None] * sx0_t + offs_d[None, :]
        x1 = x1_ptr + b * sx1_b + offs_t[:, None] * sx1_t + offs_d[None, :]
        o = b * so_b + offs_t[:, None] * so_t + offs_d[None, :]
        for h in range(HEADS):
            _rotate_pair(x0 + h * sx0_h, o0_ptr + o + h * so_h, mask, cos_a, sin_a, cos_b, sin_b, HALF)
            if PARTS == 2:
                _rotate_pair(x1 + h * sx1_h, o1_ptr + o + h * so_h, mask, cos_a, sin_a, cos_b, sin_b, HALF)


@functools.cache
def _jit():
    return triton_support.jit(globals()["_rope"])


_MODE = os.environ.get("CAPI_LAB_FUSED_ROPE", "1")

ENABLED = triton is not None and _MODE != "0"
"""Use the kernel for CUDA tensors (the default where Triton is installed); ``CAPI_LAB_FUSED_ROPE=0`` switches
it off (read once at import; may be set directly)."""

TRACEABLE = _MODE == "traceable"
"""How the kernel is registered. By default it sits behind an opaque custom op, which a compiled step calls
through the dispatcher and Triton's launcher. With ``CAPI_LAB_FUSED_ROPE=traceable``,
:func:`torch.library.triton_op` lets Inductor see the kernel and launch it from its generated code, with less
host time per call. Compiled, that works on CUDA only: Triton's interpreter cannot be traced. It is not the
default because the compiled step measured slower with it (``benchmarks/RESULTS.md``)."""

BLOCKS = {"BLOCK_T": 32, "num_warps": 4}
"""Tokens per program and warps: the fastest tile of ``benchmarks/rope_kernel.py --sweep`` for the teacher and
student shapes of ViT-B/16 (timings in ``benchmarks/rope_kernel_h200.jsonl``)."""


def available(x: Tensor, coords: Tensor, freqs: Tensor) -> bool:
    """Whether :class:`~capi_lab.model.rope.Rope` uses the kernel: Triton is importable, :data:`ENABLED`,
    ``x`` is on a CUDA device (CPU tensors only through :func:`rotate` called directly, for tests), and
    neither the coordinates nor the frequency table need a gradient (the kernel gives none)."""
    return (
        ENABLED
        and x.is_cuda
        and not (coords.requires_grad or freqs.requires_grad)
        and coords.dtype in (torch.float32, torch.bfloat16, torch.float16)
    )


def _launch(kernel, xs: list[Tensor], outs: list[Tensor], coords: Tensor, freqs: Tensor, inverse: bool) -> None:
    otherwise = "use capi_lab.model.rope.Rope, which takes PyTorch's form on the CPU"
    triton_support.check_runnable(xs[0], "fused RoPE", otherwise)
    xs = [x if x.stride(-1) == 1 else x.contiguous() for x in xs]
    x0, x1 = xs[0], xs[-1]
    o0, o1 = outs[0], outs[-1]
    b, t, heads, d = x0.shape
    half = d // 2
    table = freqs.detach().to(torch.float32).contiguous()
    grid = (triton.cdiv(t, BLOCKS["BLOCK_T"]), b)
    kernel[grid](
        x0, x1, o0, o1, coords, table, t, heads, *x0.stride()[:3], *x1.stride()[:3], *o0.stride()[:3],
        *coords.stride(), HALF=half, PARTS=len(xs), INVERSE=inverse, BLOCK_D=triton.next_power_of_2(half), **BLOCKS,
    )  # fmt: skip


def _forward(kernel, x: Tensor, coords: Tensor, freqs: Tensor, parts: int) -> list[Tensor]:
    b, t, n, d = x.shape
    hp = n // parts
    outs = [x.new_empty((b, t, hp, d)) for _ in range(parts)]
    _launch(kernel, [x[:, :, i * hp : (i + 1) * hp] for i in range(parts)], outs, coords, freqs, inverse=False)
    return outs


def _backward(kernel, grads: list[Tensor], coords: Tensor, freqs: Tensor) -> Tensor:
    b, t, hp, d = grads[0].shape
    dx = grads[0].new_empty((b, t, hp * len(grads), d))
    _launch(kernel, grads, [dx[:, :, i * hp : (i + 1) * hp] for i in range(len(grads))], coords, freqs, inverse=True)
    return dx


# The default ops: opaque to torch.compile, with fake implementations for tracing.
@torch.library.custom_op("capi_lab::rope", mutates_args=())
def _rope_op(x: Tensor, coords: Tensor, freqs: Tensor, parts: int) -> list[Tensor]:
    return _forward(_jit(), x, coords, freqs, parts)


@_rope_op.register_fake
def _(x, coords, freqs, parts):
    b, t, n, d = x.shape
    return [x.new_empty((b, t, n // parts, d)) for _ in range(parts)]


@torch.library.custom_op("capi_lab::rope_backward", mutates_args=())
def _rope_backward_op(grads: list[Tensor], coords: Tensor, freqs: Tensor) -> Tensor:
    return _backward(_jit(), grads, coords, freqs)


@_rope_backward_op.register_fake
def _(grads, coords, freqs):
    b, t, hp, d = grads[0].shape
    return grads[0].new_empty((b, t, hp * len(grads), d))


# The traceable ops (TRACEABLE): the same, with the kernel visible to torch.compile.
@torch.library.triton_op("capi_lab::rope_traceable", mutates_args=())
def _rope_traceable_op(x: Tensor, coords: Tensor, freqs: Tensor, parts: int) -> list[Tensor]:
    return _forward(torch.library.wrap_triton(_jit()), x, coords, freqs, parts)


@torch.library.triton_op("capi_lab::rope_backward_traceable", mutates_args=())
def _rope_backward_traceable_op(grads: list[Tensor], coords: Tensor, freqs: Tensor) -> Tensor:
    return _backward(torch.library.wrap_triton(_jit()), grads, coords, freqs)


def _register_autograd(op, backward_op) -> None:
    def setup_context(ctx, inputs, output) -> None:
        x, coords, freqs, parts = inputs
        ctx.save_for_backward(coords, freqs)
        ctx.part_shape = output[0].shape

    def backward(ctx, grads):
        coords, freqs = ctx.saved_tensors
        grads = [g if g is not None else coords.new_zeros(ctx.part_shape) for g in grads]
        return backward_op(grads, coords, freqs), None, None, None

    op.register_autograd(backward, setup_context=setup_context)


_register_autograd(_rope_op, _rope_backward_op)
_register_autograd(_rope_traceable_op, _rope_backward_traceable_op)


def rotate(x: Tensor, coords: Tensor, freqs: Tensor, parts: int = 1) -> list[Tensor]:
    """RoPE of ``x`` ``[b, t, n, head_dim]`` (any strides with a contiguous last axis) at ``coords`` ``[b, t, 2]``
    with the ``[2, head_dim]`` table ``freqs``, as :class:`~capi_lab.model.rope.Rope` computes it, split along
    the head axis into ``parts`` (1 or 2) contiguous ``[b, t, n / parts, head_dim]`` tensors, in ``x``'s dtype.
    Differentiable in ``x`` only."""
    b, t, n, d = x.shape
    if parts not in (1, 2) or n % parts:
        raise ValueError(f"parts must be 1 or 2 and divide the {n} heads, got {parts}")
    if d % 4 or freqs.shape != (2, d) or coords.shape != (b, t, 2):
        raise ValueError(
            f"RoPE of x {tuple(x.shape)} needs a head dim divisible by 4, coords of shape {(b, t, 2)} "
            f"and freqs of shape {(2, d)}; got coords {tuple(coords.shape)} and freqs {tuple(freqs.shape)}"
        )
    return (_rope_traceable_op if TRACEABLE else _rope_op)(x, coords, freqs, parts)


__all__ = ["available", "rotate"]
