"""capi_lab: an interactive workbench for CAPI (Cluster and Predict Latent Patches, Darcet et al. 2025)."""

from __future__ import annotations

from typing import Any

from capi_lab.config import CAPIConfig, MaskConfig, ModelConfig, OptimConfig, get_preset, with_overrides
from capi_lab.model import CAPIModel
from capi_lab.pretrained import export_authors_state_dict, load_pretrained, save_authors_checkpoint

__version__ = "0.1.0"


def create_model(preset: str = "tiny", **overrides: Any) -> CAPIModel:
    """A freshly initialised CAPI model (with both heads) from a named preset.

    ``overrides`` are model fields (``embed_dim=256``) or dotted config paths (``"model.depth": 6``).
    """
    config = with_overrides(get_preset(preset), **overrides) if overrides else get_preset(preset)
    model = CAPIModel(config.model)
    model.image_size = config.image_size
    return model


__all__ = [
    "CAPIConfig",
    "CAPIModel",
    "MaskConfig",
    "ModelConfig",
    "OptimConfig",
    "create_model",
    "export_authors_state_dict",
    "get_preset",
    "load_pretrained",
    "save_authors_checkpoint",
    "with_overrides",
]
