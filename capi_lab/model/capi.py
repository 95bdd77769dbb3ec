"""The CAPI backbone (patch embedding, registers, encoder, predictor) and the model that bundles it
with its heads. ``model(images) -> (global_repr, registers, feature_map)`` is the same call as the
authors' published models (capi-method.md §5)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from capi_lab.config import ModelConfig
from capi_lab.model.block import init_weights
from capi_lab.model.encoder import Encoder
from capi_lab.model.heads import ClusteringHead, StudentHead
from capi_lab.model.predictor import Predictor
from capi_lab.model.rope import patch_coordinates, register_coordinates, rescale_to_bbox


class Context(NamedTuple):
    """What the encoder hands the predictor: normalized tokens ``[registers, patches]`` and their
    coordinates, plus the patch grid they came from."""

    tokens: Tensor  # (b, R + n, D)
    coords: Tensor  # (b, R + n, 2)
    grid: tuple[int, int]  # (h, w) of the full image's patch grid


class CAPIBackbone(nn.Module):
    """Encoder + predictor, with the authors' parameter names (``patch_embed``, ``registers``,
    ``mask_token``, ``encoder.blocks.i``; their ``decoder`` is our ``predictor``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.patch_size = c.patch_size
        self.num_registers = c.num_registers
        self.patch_embed = nn.Conv2d(3, c.embed_dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.registers = nn.Parameter(torch.zeros(1, c.num_registers, c.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, c.dim_pred))
        rope = dict(max_freq=c.rope_max_freq, min_freq=c.rope_min_freq, layout=c.rope_layout)
        self.encoder = Encoder(c.embed_dim, c.depth, c.num_heads, c.mlp_ratio, c.drop_path_rate, rope)
        self.predictor = Predictor(
            c.dim_pred, c.pred_depth, c.heads_pred, c.embed_dim, c.mlp_ratio, c.drop_path_rate, rope
        )
        self.register_buffer("register_unit_coords", register_coordinates(c.num_registers), persistent=False)
        init_weights(self)
        nn.init.normal_(self.registers, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def grid_size(self, images: Tensor) -> tuple[int, int]:
        """``(h, w)`` patch grid of ``images``, after checking they are a batch of RGB images whose
        sides are multiples of the patch size."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected a batch of RGB images of shape [B, 3, H, W], got shape {list(images.shape)}; "
                "convert grayscale/RGBA images to RGB and add a batch axis (images[None]) for one image"
            )
        if not images.is_floating_point():
            raise ValueError(f"expected float images (normalized), got dtype {images.dtype}")
        p = self.patch_size
        H, W = images.shape[-2:]
        for name, side in (("height", H), ("width", W)):
            if side % p or side == 0:
                lo, hi = max(p, side // p * p), (side // p + 1) * p
                raise ValueError(
                    f"image {name} {side} is not a multiple of the patch size {p}; resize or crop it to {lo} or {hi}"
                )
        return H // p, W // p

    # Public entry points take a bare ``Tensor``: grid_size() checks the shape itself with a message
    # that says how to fix it, which a generic shape-annotation error would not.
    def encode(self, images: Tensor, visible_indices: Int[Tensor, " n_vis_total"] | None = None) -> Context:
        """Encode ``images``; with ``visible_indices`` (flat indices into ``[B*N)``, the same count per
        image) only those patches are embedded into the sequence."""
        h, w = self.grid_size(images)
        b, n = images.shape[0], h * w
        tokens = self.embed_patches(images, visible_indices)  # (b, n or n_vis, D)
        grid = patch_coordinates(h, w, device=images.device)
        coords = grid.expand(b, n, 2) if visible_indices is None else grid[visible_indices % n].view(b, -1, 2)
        reg_coords = rescale_to_bbox(self.register_unit_coords, coords)
        x = torch.cat([self.registers.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        all_coords = torch.cat([reg_coords, coords], dim=1)
        return Context(self.encoder(x, all_coords), all_coords, (h, w))

    def embed_patches(
        self, images: Float[Tensor, "b 3 H W"], indices: Int[Tensor, " n_total"] | None = None
    ) -> Float[Tensor, "b n d"]:
        """The patch embedding (the ``Conv2d(3, D, p, stride p)`` of the published layout) computed as one
        matrix product over flattened patches, only for the patches in ``indices`` (flat into ``[B*N)``)
        when given: the student embeds its visible patches only. (cuDNN's strided convolution and its
        layout transposes cost more than the product itself.)"""
        b, p = images.shape[0], self.patch_size
        h, w = images.shape[2] // p, images.shape[3] // p
        patches = images.reshape(b, 3, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, 3 * p * p)
        if indices is not None:
            patches = patches.flatten(0, 1)[indices].view(b, -1, 3 * p * p)
        weight = self.patch_embed.weight.flatten(1)  # (D, 3*p*p), channel-major like the conv
        return F.linear(patches, weight, self.patch_embed.bias)

    def predict(
        self,
        context: Context,
        predict_indices: Int[Tensor, " n_pred_total"] | None = None,
        num_blocks: int | None = None,
    ) -> Float[Tensor, "b n_pred d_pred"]:
        """Predictor outputs (``dec_norm`` applied) at ``predict_indices`` (flat into ``[B*N)``), or at
        every patch position when None."""
        b = context.tokens.shape[0]
        h, w = context.grid
        grid_coords = patch_coordinates(h, w, device=context.tokens.device)
        if predict_indices is None:
            query_coords = grid_coords.expand(b, h * w, 2)
        else:
            query_coords = grid_coords[predict_indices % (h * w)].view(b, -1, 2)
        queries = self.mask_token.expand(b, query_coords.shape[1], -1).to(context.tokens.dtype)
        return self.predictor(queries, query_coords, context.tokens, context.coords, num_blocks)

    def forward(self, images: Tensor) -> tuple[Float[Tensor, "b d"], Float[Tensor, "b r d"], Float[Tensor, "b h w d"]]:
        """``(global_repr, registers, feature_map)``: the global representation is the mean of the
        first predictor block's (normalized) output queried at every patch position."""
        ctx = self.encode(images)
        h, w = ctx.grid
        registers = ctx.tokens[:, : self.num_registers]
        feature_map = ctx.tokens[:, self.num_registers :].unflatten(1, (h, w))
        global_repr = self.predict(ctx, num_blocks=1).mean(dim=1)
        return global_repr, registers, feature_map


class CAPIModel(nn.Module):
    """A CAPI backbone with its heads: the student head (or, on the teacher side, its EMA copy)
    and the online clustering head. Either head may be absent (the published backbones)."""

    def __init__(self, config: ModelConfig, student_head: bool = True, clustering_head: bool = True):
        super().__init__()
        self.config = config
        self.image_size: int | None = None
        """Side of the images it was trained on, when known (capi_lab checkpoints record it)."""
        self.meta: dict = {}
        """Training provenance (command, steps, hardware, data), when the checkpoint records it."""
        self.backbone = CAPIBackbone(config)
        self.head = StudentHead(config.dim_pred, config.num_prototypes) if student_head else None
        self.clustering_head = ClusteringHead(config.embed_dim, config.num_prototypes) if clustering_head else None

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def forward(self, images: Tensor) -> tuple[Float[Tensor, "b d"], Float[Tensor, "b r d"], Float[Tensor, "b h w d"]]:
        return self.backbone(images)

    def patch_features(self, images: Tensor) -> Float[Tensor, "b n d"]:
        """Normalized encoder output of the patch tokens of the full images (registers dropped)."""
        return self.backbone.encode(images).tokens[:, self.backbone.num_registers :]

    def cluster_logits(self, images: Tensor) -> Float[Tensor, "b n k"]:
        """Clustering-head logits of every patch of the full images (the teacher's view)."""
        if self.clustering_head is None:
            raise RuntimeError(
                "this model has no clustering head (the authors' published checkpoints hold only the backbone); "
                "cluster its patch features instead, e.g. with k-means"
            )
        return self.clustering_head(self.patch_features(images))

    def prediction_logits(self, context: Context, predict_indices: Tensor | None = None) -> Tensor:
        """Student-head logits of the predictor at ``predict_indices`` (all positions when None)."""
        if self.head is None:
            raise RuntimeError("this model has no student head, so it cannot turn predictions into cluster logits")
        return self.head(self.backbone.predict(context, predict_indices))


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
