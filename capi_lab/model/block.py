"""Pre-norm transformer blocks without biases, with RoPE attention (self or cross) and per-sample
stochastic depth (capi-method.md §1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from timm.layers import Mlp
from torch import Tensor, nn

from capi_lab.model.rope import Rope


class RMSNorm(nn.RMSNorm):
    """torch's RMSNorm with its scale cast to the input dtype: under bf16 autocast a bf16 input with an
    fp32 scale falls off the fused kernel onto a slow composite path."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.to(x.dtype) if self.weight is not None else None
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/output projections, no biases, 2-D RoPE on q and k.

    Without ``context`` it is self-attention; with it, queries come from ``x`` and keys/values from
    ``context`` (whose width may differ: ``kv_dim``).
    """

    def __init__(self, dim: int, num_heads: int, kv_dim: int | None = None, rope: dict | None = None):
        super().__init__()
        kv_dim = kv_dim or dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(kv_dim, dim, bias=False)
        self.v_proj = nn.Linear(kv_dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.rope = Rope(self.head_dim, **(rope or {}))

    def _heads(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (-1, self.head_dim))  # (b, n, heads, hd): token-major, a view

    def forward(
        self,
        x: Float[Tensor, "b t d"],
        coords: Float[Tensor, "b t 2"],
        context: Float[Tensor, "b m dk"] | None = None,
        context_coords: Float[Tensor, "b m 2"] | None = None,
    ) -> Float[Tensor, "b t d"]:
        # One matrix product for the projections that share an input (q, k, v in self-attention; k, v in
        # cross-attention): the same math as three, with fewer, larger products and one read of the input.
        # The weights stay separate parameters, in the authors' layout. In self-attention q and k share their
        # coordinates, so their heads are rotated together.
        wq, wk, wv = self.q_proj.weight, self.k_proj.weight, self.v_proj.weight
        d = wq.shape[0]
        if context is None:
            qkv = F.linear(x, torch.cat([wq, wk, wv]))
            q, k = self.rope.split(self._heads(qkv[..., : 2 * d]), coords, parts=2)
            v = qkv[..., 2 * d :]
        else:
            q = self.rope(self._heads(F.linear(x, wq)), coords)
            kv = F.linear(context, torch.cat([wk, wv]))
            k = self.rope(self._heads(kv[..., :d]), context_coords)
            v = kv[..., d:]
        q, k, v = (t.transpose(1, 2) for t in (q, k, self._heads(v)))  # (b, heads, n, hd)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))


Drop = tuple[Int[Tensor, " b"], Int[Tensor, " b"]]
"""A random permutation of the batch and its inverse: which samples a residual branch keeps."""


def random_permutations(n: int, b: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """``n`` independent uniformly random permutations of ``range(b)`` and their inverses, ``[n, b]`` each,
    from one sort of 62-bit random keys (a tie, which would favour the lower index, has probability about
    ``b**2 / 2**63``). A stack of blocks draws all its branches' permutations at once: one sort and one
    scatter instead of a ``randperm`` and an ``argsort`` per branch, which in a compiled step are opaque
    calls of several kernel launches each."""
    perm = torch.randint(0, 2**62, (n, b), device=device).argsort(dim=1)
    inv = torch.empty_like(perm).scatter_(1, perm, torch.arange(b, device=device).expand(n, b))
    return perm, inv


class Residual(nn.Module):
    """``x + fn(norm(x))``; in training, stochastic depth drops the branch for whole samples.

    Dropping is done by computing the branch only on a random subset of ``keep = int(b * (1-p))``
    samples and adding it back scaled by ``b / keep`` (unbiased, like DropPath), which also saves
    a fraction ``p`` of the branch's compute. The subset is the head of a random permutation (``drop``,
    drawn here when not given), and the branch goes back to its samples through a gather with the
    inverse permutation rather than an atomic ``index_add``.
    """

    def __init__(self, dim: int, fn: nn.Module, drop_prob: float = 0.0):
        super().__init__()
        self.norm = RMSNorm(dim, eps=1e-5)
        self.fn = fn
        self.drop_prob = drop_prob

    def _keep(self, b: int) -> int:
        return max(int(b * (1 - self.drop_prob)), 1)

    def drops(self, b: int) -> bool:
        """Whether a training batch of ``b`` samples loses any to stochastic depth here."""
        return self.training and self._keep(b) < b

    def forward(
        self, x: Float[Tensor, "b t d"], drop: Drop | None = None, **batch_kwargs: Tensor | None
    ) -> Float[Tensor, "b t d"]:
        b = x.shape[0]
        if not self.drops(b):
            return x + self.fn(self.norm(x), **batch_kwargs)
        keep = self._keep(b)
        perm, inv = drop if drop is not None else (t[0] for t in random_permutations(1, b, x.device))
        idx = perm[:keep]
        sub = {k: (v[idx] if v is not None else None) for k, v in batch_kwargs.items()}
        branch = self.fn(self.norm(x[idx]), **sub).to(x.dtype) * (b / keep)
        padded = torch.cat([branch, branch.new_zeros(b - keep, *branch.shape[1:])])
        return x + padded[inv]


class Block(nn.Module):
    """Attention residual then MLP residual. Key names follow the authors' layout
    (``residual1.fn.q_proj``, ``residual2.fn.fc1``, ...) so checkpoints map one to one."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        kv_dim: int | None = None,
        rope: dict | None = None,
    ):
        """``rope``: keyword arguments of :class:`Rope` (``max_freq``, ``min_freq``, ``layout``)."""
        super().__init__()
        attn = Attention(dim, num_heads, kv_dim, rope)
        mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, bias=False)
        self.residual1 = Residual(dim, attn, drop_path)
        self.residual2 = Residual(dim, mlp, drop_path)

    def forward(
        self,
        x: Float[Tensor, "b t d"],
        coords: Float[Tensor, "b t 2"],
        context: Float[Tensor, "b m dk"] | None = None,
        context_coords: Float[Tensor, "b m 2"] | None = None,
        drops: tuple[Int[Tensor, "2 b"], Int[Tensor, "2 b"]] | None = None,
    ) -> Float[Tensor, "b t d"]:
        """``drops``: permutations and inverses for the two residual branches (drawn per branch if None)."""
        d1, d2 = ((drops[0][i], drops[1][i]) for i in range(2)) if drops is not None else (None, None)
        x = self.residual1(x, d1, coords=coords, context=context, context_coords=context_coords)
        return self.residual2(x, d2)


def draw_drops(blocks: nn.ModuleList, b: int, device: torch.device) -> list:
    """Per block of a stack, the ``drops`` argument of :meth:`Block.forward`: one batched draw for the whole
    stack when stochastic depth is on (training), else ``None`` for every block."""
    if not any(r.drops(b) for block in blocks for r in (block.residual1, block.residual2)):
        return [None] * len(blocks)
    perm, inv = random_permutations(2 * len(blocks), b, device)
    return [(perm[2 * i : 2 * i + 2], inv[2 * i : 2 * i + 2]) for i in range(len(blocks))]


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform linear weights (and patch conv viewed as a matrix), zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            w = m.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.RMSNorm) and m.weight is not None:
            nn.init.ones_(m.weight)
