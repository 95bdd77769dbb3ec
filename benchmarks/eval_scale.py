"""What the evaluations need at the paper's scale, measured scaled down on this machine and extrapolated.

    python benchmarks/eval_scale.py            # prints one JSON line per measurement, then the extrapolations

k-NN classification (ImageNet-1k: a 1.28 M-image bank, 50k queries, ViT-L width 1024) and the authors' k-NN
segmentation on ADE20K (20,210 train images, 2,000 validation, 224 px at patch 14: 256 patches each) run the same
code as ``capi_lab.evaluation`` (``knn_predict``, ``knn_segment``) on random features of the real width, at a
bank and query count this machine holds; time scales with queries x bank x width (one matrix product per chunk
pair), memory is the bank, its labels and one chunk. Medians of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capi_lab.evaluation.classification import knn_predict  # noqa: E402
from capi_lab.evaluation.segmentation import KNN_GRID, knn_segment  # noqa: E402

WIDTH = 1024  # ViT-L
IN1K = {"bank": 1_281_167, "queries": 50_000}
ADE = {"train": 20_210, "val_split": 2_021, "test": 2_000, "patches": 256, "pixels": 14 * 14}


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bank", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=4_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(args.bank, WIDTH, generator=g)
    queries = torch.randn(args.queries, WIDTH, generator=g)
    labels = torch.randint(0, 1000, (args.bank,), generator=g)
    dev = torch.device(args.device)
    work = args.bank * args.queries * WIDTH

    t_cls = _median_seconds(lambda: knn_predict(bank, labels, queries, 20, 0.07, 1000, device=dev), args.repeats)
    rate = work / t_cls
    print(json.dumps({"what": "knn classification", "bank": args.bank, "queries": args.queries, "width": WIDTH,
                      "seconds": round(t_cls, 3), "mac_per_s": f"{rate:.3g}"}))  # fmt: skip
    pix = torch.randint(0, 151, (args.bank, ADE["pixels"]), generator=g).to(torch.int16)
    t_seg = _median_seconds(
        lambda: knn_segment(bank, pix, queries, KNN_GRID["k"], "cosine", dev), args.repeats
    )  # one distance, all four k
    seg_rate = work / t_seg
    print(json.dumps({"what": "knn segmentation (1 distance, k 1/3/10/30, per-pixel votes)", "bank": args.bank,
                      "queries": args.queries, "width": WIDTH, "seconds": round(t_seg, 3),
                      "mac_per_s": f"{seg_rate:.3g}"}))  # fmt: skip
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"what": "peak resident memory of this benchmark", "mb": round(peak_mb)}))

    # extrapolations
    gb = 1e9
    in1k_work = IN1K["bank"] * IN1K["queries"] * WIDTH
    bank_tr = (ADE["train"] - ADE["val_split"]) * ADE["patches"]
    bank_all = ADE["train"] * ADE["patches"]
    val_q, test_q = ADE["val_split"] * ADE["patches"], ADE["test"] * ADE["patches"]
    ade_work = 2 * val_q * bank_tr * WIDTH + test_q * bank_all * WIDTH  # grid: 2 distances; refit: 1
    out = {
        "in1k_knn": {
            "memory_gb": {"bank_fp32": round(IN1K["bank"] * WIDTH * 4 / gb, 1),
                          "queries_fp32": round(IN1K["queries"] * WIDTH * 4 / gb, 2),
                          "registers_if_kept_16_fp32": round(IN1K["bank"] * 16 * WIDTH * 4 / gb, 1)},
            "multiply_adds": f"{in1k_work:.3g}",
            "hours_at_this_machine_rate": round(in1k_work / rate / 3600, 2),
        },
        "ade20k_seg_knn": {
            "memory_gb": {"train_val_features_fp32": round(bank_all * WIDTH * 4 / gb, 1),
                          "pixel_labels_int16": round(bank_all * ADE["pixels"] * 2 / gb, 1),
                          "test_features_fp32": round(test_q * WIDTH * 4 / gb, 1),
                          "one_hot_of_old_quick_protocol_150_classes_fp32": round(
                              bank_all * ADE["pixels"] * 151 * 4 / gb)},
            "multiply_adds": f"{ade_work:.3g}",
            "hours_at_this_machine_rate": round(ade_work / seg_rate / 3600, 1),
        },
    }  # fmt: skip
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
