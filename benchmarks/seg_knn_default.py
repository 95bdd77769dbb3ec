"""k-NN segmentation of the shipped default model against its random twin (the §3 target of the default-model
issue), at one or more input sizes, with the object-vs-background reading of the same predictions.

    python benchmarks/seg_knn_default.py                    # 64 px, the training size
    python benchmarks/seg_knn_default.py 64 128             # also at 128 px (RoPE lets the model run larger)
    python benchmarks/seg_knn_default.py --pixels           # and the raw-pixel patches (no model at all)
    python benchmarks/seg_knn_default.py --run runs/default # every checkpoint of a run, in step order: the trend

Needs the fetched cut-outs and photos (python scripts/fetch_demo_data.py). The sets are those of
scripts/build_default_model.py (300 train / 150 test generated images, seed 0, held-out cut-outs and photos);
one JSON line per model and size. With ``--run`` the random twin is of the run's architecture and the rows carry
the checkpoint's step, so whether segmentation improves with training can be read off one run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from build_default_model import random_twin  # noqa: E402

from capi_lab import load_pretrained  # noqa: E402
from capi_lab.evaluation.segmentation import RawPixelPatches, seg_knn_miou, tuxpaint_sets  # noqa: E402


def run_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every periodic checkpoint of a run folder, in step order (``last.ckpt`` is a copy of the
    newest, so it is left out)."""
    ckpts = sorted((int(re.sub(r"\D", "", p.stem)), p) for p in (run / "checkpoints").glob("step_*.ckpt"))
    if not ckpts:
        raise SystemExit(f"{run}: no checkpoints/step_*.ckpt; pass a run folder of python -m capi_lab.train")
    return ckpts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sizes", nargs="*", type=int, default=[64], help="input sizes in pixels (default: 64)")
    ap.add_argument("--run", type=Path, help="measure every checkpoint of this run folder instead of the default")
    ap.add_argument("--pixels", action="store_true", help="also the raw-pixel patches of the model's patch size")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.run:
        models = [(f"step {step}", lambda p=path: load_pretrained(p), step) for step, path in run_checkpoints(args.run)]
    else:
        models = [("model", lambda: load_pretrained("default"), None)]
    first = models[0][1]()
    extra = [("random twin", lambda: random_twin(first), None)]
    if args.pixels:
        extra.append(("raw pixels", lambda: RawPixelPatches(first.patch_size), None))
    for size in args.sizes:
        train, test = tuxpaint_sets(size, 300, 150, 0)
        for name, make, step in extra + models:
            row = {"size": size, "model": name, **({"step": step} if step is not None else {})}
            row.update(seg_knn_miou(make(), train, test, device="cpu"))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
