"""The CAPI network: RoPE, blocks, encoder, predictor, heads, and the model that bundles them."""

from capi_lab.model.capi import CAPIBackbone, CAPIModel, Context
from capi_lab.model.heads import ClusteringHead, StudentHead

__all__ = ["CAPIBackbone", "CAPIModel", "ClusteringHead", "Context", "StudentHead"]
