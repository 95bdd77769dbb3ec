"""What the training snapshots (capi_lab.snapshots, on by default) cost, against the training step they interrupt.

    python benchmarks/snapshot_cost.py                                   # the README's quick start (CPU)
    python benchmarks/snapshot_cost.py --preset tiny --data-size 28 --batch-size 64 --max-steps 600
    python benchmarks/snapshot_cost.py --preset vit_b16 --batch-size 256 --max-steps 100000 --compile   # on a GPU

Times the real step (capi_lab.train.train_step on a synthetic batch already on the device) and one snapshot
(Snapshotter.__call__ on the bundled probe photos: teacher forward, predictor on a fixed mask, PCA, PNGs, numbers),
each as the median of repeated calls after a warm-up, and prints one JSON line: both medians, the default interval
for --max-steps (capi_lab.snapshots.snapshot_interval), and the share of the run's time the snapshots take,
``(snapshots * snapshot_s + overview_s) / (max_steps * step_s)`` (the step-0 snapshot included; ``overview_s``
is the extra time of the last snapshot, which also draws ``overview.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time

import torch
from lightning.fabric import Fabric

from capi_lab.config import get_preset, with_overrides
from capi_lab.masking import MaskBatch, sample_masks
from capi_lab.snapshots import Snapshotter, snapshot_interval
from capi_lab.train import build_trainer, train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--data-size", dest="image_size", type=int, default=32, help="training resolution (default 32)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=150, help="the run the default interval is for")
    p.add_argument("--snapshot-every", type=int, default=None, help="default: 20 per run, at least 50 steps apart")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--snapshots", type=int, default=7, help="timed snapshots")
    args = p.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    fabric = Fabric(accelerator=device, devices=1, precision="bf16-mixed" if device == "cuda" else "32-true")
    cfg = with_overrides(get_preset(args.preset), batch_size=args.batch_size, image_size=args.image_size)
    b, g = cfg.batch_size, cfg.image_size // cfg.model.patch_size
    images = fabric.to_device(torch.randn(b, 3, cfg.image_size, cfg.image_size))
    masks = [MaskBatch(*(fabric.to_device(t) for t in sample_masks(b, g, g, cfg.mask, rng=i))) for i in range(4)]
    tr = build_trainer(fabric, cfg, max_steps=10**6, compile=args.compile)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(fn, n: int, warmup: int) -> list[float]:
        for i in range(warmup):
            fn(i)
        sync()
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            fn(i)
            sync()
            out.append(time.perf_counter() - t0)
        return out

    steps = timed(lambda i: train_step(tr, images, masks[i % 4]), args.steps, 3)
    with tempfile.TemporaryDirectory() as tmp:
        snap = Snapshotter(tmp, None, cfg.image_size, cfg.model.patch_size, cfg.mask, 0)
        snaps = timed(lambda i: snap(tr.teacher, i), args.snapshots, 1)
        probes = len(snap.names)
        # the last snapshot of a run also draws overview.png: timed once, added once
        last = timed(lambda i: snap(tr.teacher, args.snapshots + i, with_overview=True), 3, 0)
        overview_s = max(statistics.median(last) - statistics.median(snaps), 0.0)
    interval = snapshot_interval(args.snapshot_every, args.max_steps)
    n_snap = 1 + math.ceil(args.max_steps / interval) if interval else 0  # step 0, every interval, the end
    step_s, snap_s = statistics.median(steps), statistics.median(snaps)
    print(json.dumps({
        "preset": args.preset, "image_size": cfg.image_size, "batch_size": b, "device": device,
        "compile": args.compile, "threads": torch.get_num_threads(), "probe_images": probes,
        "step_s_median": round(step_s, 4), "snapshot_s_median": round(snap_s, 4),
        "snapshot_s_min_max": [round(min(snaps), 4), round(max(snaps), 4)],
        "overview_s": round(overview_s, 4), "max_steps": args.max_steps, "interval": interval, "snapshots": n_snap,
        "snapshot_share_of_run": round((n_snap * snap_s + overview_s) / (args.max_steps * step_s), 4),
        "snapshot_over_interval": round(snap_s / (interval * step_s), 4) if interval else 0.0,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
