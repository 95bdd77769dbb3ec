"""The predictor: cross-attention blocks whose queries are a learned mask token at each position
to predict, and whose keys/values are the encoder output. Queries never attend to each other, so
only the positions that are scored are computed (capi-method.md §1)."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor, nn

from capi_lab.model.block import Block, RMSNorm, draw_drops


class Predictor(nn.Module):
    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        context_dim: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        rope: dict | None = None,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, drop_path, context_dim, rope) for _ in range(depth)
        )
        self.norm = RMSNorm(dim, eps=1e-5, elementwise_affine=False)

    def forward(
        self,
        queries: Float[Tensor, "b q d"],
        query_coords: Float[Tensor, "b q 2"],
        context: Float[Tensor, "b m dk"],
        context_coords: Float[Tensor, "b m 2"],
        num_blocks: int | None = None,
    ) -> Float[Tensor, "b q d"]:
        """Run the first ``num_blocks`` blocks (all by default), then ``dec_norm``."""
        blocks = self.blocks[:num_blocks]
        for block, drops in zip(blocks, draw_drops(blocks, queries.shape[0], queries.device), strict=True):
            queries = block(queries, query_coords, context, context_coords, drops=drops)
        return self.norm(queries)
