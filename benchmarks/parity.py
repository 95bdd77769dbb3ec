"""Parity of capi_lab with an independent float64 restatement of the published forward pass.

    python benchmarks/parity.py

Builds a model with the published ViT-L/14 geometry at reduced width/depth, saves it in the authors'
key layout, loads it back with capi_lab.load_pretrained, and prints the max abs difference of each
output (global_repr, registers, feature_map) against tests/reference_capi.py (fp32 vs float64), for
224x224 and non-square inputs. The acceptance bound is 1e-4.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import capi_lab  # noqa: E402
from tests.reference_capi import reference_forward  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    model = capi_lab.create_model("vit_l14", embed_dim=256, num_heads=4, depth=4, pred_depth=2, num_prototypes=64)
    with tempfile.TemporaryDirectory() as d:
        path = capi_lab.save_authors_checkpoint(model, Path(d) / "authors.pth")
        loaded = capi_lab.load_pretrained(path)
        sd = torch.load(path, weights_only=True)
    for size in [(224, 224), (168, 280), (308, 126)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            ours = loaded(x)
        ref = reference_forward(sd, x)
        diffs = {
            n: (a.double() - b).abs().max().item()
            for n, a, b in zip(("global", "registers", "feature_map"), ours, ref, strict=True)
        }
        print(json.dumps({"input": list(size), **{k: f"{v:.2e}" for k, v in diffs.items()}}))


if __name__ == "__main__":
    main()
