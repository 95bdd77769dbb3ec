"""2-D axial rotary position embeddings and the coordinates they rotate by (capi-method.md §1).

Patches sit on a grid in the unit square; registers sit on its border ("edge" placement) and are
rescaled into the bounding box of the patches each image actually shows.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from capi_lab.kernels import fused_rope


def patch_coordinates(h: int, w: int, device: torch.device | None = None) -> Float[Tensor, "n 2"]:
    """Coordinates ``(i/(h-1), j/(w-1))`` of an ``h x w`` patch grid, flattened row-major."""
    rows = torch.linspace(0, 1, h, device=device)
    cols = torch.linspace(0, 1, w, device=device)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).flatten(0, 1)


def register_coordinates(num_registers: int, device: torch.device | None = None) -> Float[Tensor, "r 2"]:
    """Registers on the border of the unit square, R/4 per edge, walking around it.

    With ``s = R/4`` and ``c = arange(s)/s``: ``(c, 0)``, then ``(1, c)``, then ``(1-c, 1)``, then ``(0, 1-c)``.
    """
    s = num_registers // 4
    c = torch.arange(s, device=device, dtype=torch.float32) / max(s, 1)
    zeros, ones = torch.zeros_like(c), torch.ones_like(c)
    edges = [(c, zeros), (ones, c), (1 - c, ones), (zeros, 1 - c)]
    return torch.cat([torch.stack(e, dim=-1) for e in edges], dim=0)


def rescale_to_bbox(
    unit_coords: Float[Tensor, "r 2"], visible_coords: Float[Tensor, "b n_vis 2"]
) -> Float[Tensor, "b r 2"]:
    """Map coordinates in the unit square into each image's bounding box of visible patches."""
    lo = visible_coords.amin(dim=1, keepdim=True)
    hi = visible_coords.amax(dim=1, keepdim=True)
    return lo + unit_coords.to(visible_coords.dtype) * (hi - lo)


RopeLayout = Literal["capi", "rotation"]


def rope_frequencies(
    head_dim: int, max_freq: float = 7.0, min_freq: float = 7e-4, layout: RopeLayout = "capi"
) -> Float[Tensor, "2 head_dim"]:
    """The ``[2, head_dim]`` angular-frequency table, ``coords @ table`` giving each channel's angle.

    ``layout="capi"`` is the table of capi-method.md §1 and the published models: with
    ``f`` the ``head_dim/4`` log-spaced frequencies, row 0 (first coordinate) holds ``[f, f]`` on channels
    ``[0, d/2)`` and row 1 (second coordinate) ``[f, f]`` on ``[d/2, d)``. Since :func:`rotate_half` pairs
    channel ``c`` with ``c + d/2``, each pair mixes a row angle with a column angle, so this is *not* a
    rotation and attention scores are not purely relative (see tests/test_rope.py).

    ``layout="rotation"`` puts the angles as ``[row f, col f, row f, col f]`` so paired channels share one
    angle: a true 2-D rotary embedding with the same frequencies, for new models. The forward pass is the
    same; only this stored table differs, so checkpoints of either kind load unchanged.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    q = head_dim // 4
    f = max_freq * (max_freq / min_freq) ** torch.linspace(0, -1, q)
    table = torch.zeros(2, head_dim)
    if layout == "capi":
        table[0, : 2 * q] = torch.cat([f, f])
        table[1, 2 * q :] = torch.cat([f, f])
    elif layout == "rotation":
        for row, starts in ((0, (0, 2 * q)), (1, (q, 3 * q))):
            for s in starts:
                table[row, s : s + q] = f
    else:
        raise ValueError(f"unknown RoPE layout {layout!r}; use 'capi' or 'rotation'")
    return table * 2 * math.pi


def rotate_half(x: Float[Tensor, "*b d"]) -> Float[Tensor, "*b d"]:
    """``[a, b] -> [-b, a]`` on the two halves of the last axis."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Rope(nn.Module):
    """Axial RoPE with a stored frequency table: a parameter, so that checkpoints carry it (the authors'
    ``...rope.freqs``), with learning rate 0 in the recipe, which we implement by freezing it."""

    def __init__(self, head_dim: int, max_freq: float = 7.0, min_freq: float = 7e-4, layout: RopeLayout = "capi"):
        super().__init__()
        self.freqs = nn.Parameter(rope_frequencies(head_dim, max_freq, min_freq, layout), requires_grad=False)

    def angles(self, coords: Float[Tensor, "*b t 2"]) -> Float[Tensor, "*b t head_dim"]:
        """``coords @ freqs`` in at least fp32 whatever the autocast state: bf16 angles would be off by ~0.1 rad.
        (Written as two broadcast products, which autocast leaves in fp32, rather than a matmul.)"""
        dtype = torch.promote_types(coords.dtype, torch.float32)
        freqs = self.freqs.to(dtype)
        coords = coords.to(dtype)
        return coords[..., 0:1] * freqs[0] + coords[..., 1:2] * freqs[1]

    def forward(self, x: Float[Tensor, "b t n hd"], coords: Float[Tensor, "b t 2"]) -> Float[Tensor, "b t n hd"]:
        """RoPE of the ``n`` heads of every token (token-major, as the q/k/v projections give them)."""
        return self.split(x, coords, parts=1)[0]

    def split(
        self, x: Float[Tensor, "b t n hd"], coords: Float[Tensor, "b t 2"], parts: int
    ) -> tuple[Float[Tensor, "b t _ hd"], ...]:
        """RoPE as :meth:`forward`, the result split along the head axis into ``parts`` tensors:
        self-attention rotates its q and k heads in one call.

        On CUDA (with Triton) this is one Triton kernel that computes each angle's cosine and sine once for all
        heads (:mod:`capi_lab.kernels.fused_rope`; ``CAPI_LAB_FUSED_ROPE=0`` switches it off); otherwise, and when the
        table or coordinates need gradients, PyTorch.
        """
        if fused_rope.available(x, coords, self.freqs):
            return tuple(fused_rope.rotate(x, coords, self.freqs, parts))
        angle = self.angles(coords).unsqueeze(2)  # (b, t, 1, hd): shared by all heads
        cos, sin = angle.cos(), angle.sin()
        # each part on its own, so that each comes out as its own tensor, laid out (b, t, heads, hd)
        return tuple((p * cos + rotate_half(p) * sin).to(x.dtype) for p in x.chunk(parts, dim=2))
