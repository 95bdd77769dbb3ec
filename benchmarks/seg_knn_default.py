"""k-NN segmentation of the shipped default model against its random twin (the §3 target of the default-model
issue), at one or more input sizes, with the object-vs-background reading of the same predictions.

    python benchmarks/seg_knn_default.py            # 64 px, the training size
    python benchmarks/seg_knn_default.py 64 128     # also at 128 px (RoPE lets the model run larger)

Needs the fetched cut-outs and photos (python scripts/fetch_demo_data.py). The sets are those of
scripts/build_default_model.py (300 train / 150 test generated images, seed 0, held-out cut-outs and photos);
one JSON line per model and size.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from build_default_model import random_twin  # noqa: E402

from capi_lab import load_pretrained  # noqa: E402
from capi_lab.evaluation.segmentation import seg_knn_miou, tuxpaint_sets  # noqa: E402


def main(sizes: list[int]) -> None:
    model = load_pretrained("default")
    twin = random_twin(model)
    for size in sizes:
        train, test = tuxpaint_sets(size, 300, 150, 0)
        for name, m in (("model", model), ("random twin", twin)):
            print(json.dumps({"size": size, "model": name, **seg_knn_miou(m, train, test, device="cpu")}), flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main([int(s) for s in sys.argv[1:]] or [64])
