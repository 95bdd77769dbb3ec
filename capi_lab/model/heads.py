"""The two heads that map patch features to K prototypes (capi-method.md §3, §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn


class StudentHead(nn.Module):
    """l2-normalize, then a weight-normalized linear layer without bias.

    Parameters are stored as ``last_layer.weight_g`` ([K, 1], magnitudes, init 1) and
    ``last_layer.weight_v`` ([K, D], directions, init trunc_normal(0.02)), the names the authors'
    training code saves.
    """

    def __init__(self, dim: int, num_prototypes: int):
        super().__init__()
        self.last_layer = WeightNormLinear(dim, num_prototypes)

    def forward(self, x: Float[Tensor, "*b d"]) -> Float[Tensor, "*b k"]:
        return self.last_layer(F.normalize(x, dim=-1))


class WeightNormLinear(nn.Module):
    """``y = x @ (g * v / ||v||)^T`` with the norm taken per output row."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    def forward(self, x: Float[Tensor, "*b d"]) -> Float[Tensor, "*b k"]:
        return F.linear(x, self.weight_g * F.normalize(self.weight_v, dim=1))


class ClusteringHead(nn.Module):
    """The online clustering head: ``Linear(D, K, bias=True)`` on l2-normalized teacher features,
    weights initialised ``N(0, 1)``. Trained only by its own loss, with its own optimizer."""

    def __init__(self, dim: int, num_prototypes: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_prototypes, bias=True)
        nn.init.normal_(self.linear.weight, std=1.0)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Float[Tensor, "*b d"]) -> Float[Tensor, "*b k"]:
        return self.linear(F.normalize(x, dim=-1))
