"""The encoder: self-attention blocks over ``[registers, visible patches]`` and a scale-free
final RMSNorm (``enc_norm``)."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor, nn

from capi_lab.model.block import Block, RMSNorm, draw_drops


class Encoder(nn.Module):
    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        rope: dict | None = None,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, drop_path, rope=rope) for _ in range(depth))
        self.norm = RMSNorm(dim, eps=1e-5, elementwise_affine=False)

    def forward(self, x: Float[Tensor, "b t d"], coords: Float[Tensor, "b t 2"]) -> Float[Tensor, "b t d"]:
        for block, drops in zip(self.blocks, draw_drops(self.blocks, x.shape[0], x.device), strict=True):
            x = block(x, coords, drops=drops)
        return self.norm(x)
