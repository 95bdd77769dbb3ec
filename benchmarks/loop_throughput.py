"""Throughput of the whole training loop (``python -m capi_lab.train``) against its data loader alone.

    python benchmarks/loop_throughput.py --preset vit_b16 --compile                 # on a GPU
    python benchmarks/loop_throughput.py --preset tiny --max-steps 40 --log-every 10 --accelerator cpu

``train_throughput.py`` times the step on a batch already on the device. This times what a user's run does:
decode and augment JPEGs in the loader workers, pin, copy, step, log. Unless ``--data`` is given it writes
``--images`` synthetic JPEGs (smooth colour fields with texture, seeded) into ``--workdir``. It times the
loader alone, with the run's workers, over as many batches as the run will take. It then runs the training
command and reads images/s from ``metrics.jsonl``: the median of the logged windows after the first, which
holds compilation. Prints one JSON line. Any other argument goes to the training command (``--compile``,
``--num-workers 12``, ``--batch-size``, ...).

``--shards`` first writes the same images as WebDataset tar shards (``python -m capi_lab.data.shards``, into
``--workdir``) and reads those instead; ``--loader-only`` skips the training run. Shards against the folder, per
worker count:

    for w in 0 1 2; do for f in "" --shards; do
      python benchmarks/loop_throughput.py --preset tiny --image-size 224 --accelerator cpu --loader-only \
          --workdir /tmp/loop --num-workers $w $f; done; done
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from capi_lab.data import FileImages, resolve_source
from capi_lab.launch import make_fabric
from capi_lab.loader import make_loader
from capi_lab.train import main as train_main
from capi_lab.train import resolve_config


def write_jpegs(folder: Path, n: int, width: int, seed: int = 0) -> None:
    """``n`` JPEGs ``width x 3/4 width``: a bilinearly upsampled random colour field plus noise, quality 90
    (decoding them costs about what decoding photos of that size does; pure noise would cost more)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h = width * 3 // 4
    for i in range(n):
        field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, h), Image.BILINEAR)
        pixels = np.asarray(field, dtype=np.int16) + rng.integers(-12, 13, (h, width, 3), dtype=np.int16)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="images to train on (default: synthetic JPEGs)")
    p.add_argument("--images", type=int, default=2048, help="synthetic JPEGs to write")
    p.add_argument("--image-px", type=int, default=500, help="their width (ImageNet's photos average ~400x350)")
    p.add_argument("--workdir", default=None, help="keep the JPEGs and the run here (default: a temp folder, removed)")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument(
        "--decode-cache",
        action="store_true",
        help="keep the loader's cache of decoded images (256 MB a worker); off by default, since a few thousand "
        "synthetic images would all be cached after one epoch, unlike a real dataset",
    )
    p.add_argument("--shards", action="store_true", help="read the images as tar shards (written once, in --workdir)")
    p.add_argument("--shard-size", default="64MB", help="with --shards: the shards' size (default 64MB)")
    p.add_argument("--loader-only", action="store_true", help="time the loader alone; no training run")
    p.add_argument("--repeats", type=int, default=3, help="loader timings, the median is reported (default 3)")
    args, rest = p.parse_known_args()
    if not args.decode_cache:  # before any loader exists: forked workers inherit it
        FileImages.CACHE_BYTES = 0
    if args.workdir:
        _run(args, rest, Path(args.workdir))
        return
    work = Path(tempfile.mkdtemp(prefix="capi_loop_"))
    try:  # a few thousand JPEGs and a run: ~45 MB, removed unless --workdir asked to keep them
        _run(args, rest, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, rest: list[str], work: Path) -> None:
    data = args.data
    if data is None:
        data = str(work / "jpegs")
        if not any(Path(data).glob("*.jpg")):
            write_jpegs(Path(data), args.images, args.image_px)
    if args.shards:
        from capi_lab.data.shards import MANIFEST, parse_size, write_shards

        shards = work / f"shards_{Path(data).name}"
        if not (shards / MANIFEST).exists():
            write_shards(data, shards, parse_size(args.shard_size))
        data = str(shards)
    out = work / "run"
    argv = [*rest, "--data", data, "--output-dir", str(out), "--max-steps", str(args.max_steps),
            "--log-every", str(args.log_every), "--checkpoint-every", str(10 * args.max_steps)]  # fmt: skip
    if (out / "checkpoints" / "last.ckpt").exists():
        raise SystemExit(f"error: {out} holds a run already; pass another --workdir")

    run = resolve_config(argv)
    fabric = make_fabric(run)
    source = resolve_source(run.data)
    timings = []
    for _ in range(args.repeats):
        loader = make_loader(run, fabric, source, 0)
        it = iter(loader)
        next(it)  # worker start-up
        t0 = time.perf_counter()
        for _ in range(args.max_steps):
            next(it)
        timings.append(time.perf_counter() - t0)
        workers = loader.num_workers
        del it, loader
    loader_s = statistics.median(timings)
    b = run.capi.batch_size
    row = {
        "preset": run.preset,
        "batch_size": b,
        "image_size": run.capi.image_size,
        "compile": run.compile,
        "device": str(fabric.device),
        "workers": workers,
        "format": "shards" if args.shards else "folder",
        "data": args.data or f"{args.images} synthetic JPEGs, {args.image_px} px wide",
        "decode_cache": args.decode_cache,
        "loader_images_per_s": round(args.max_steps * b / loader_s, 1),
        "loader_images_per_s_runs": [round(args.max_steps * b / t, 1) for t in timings],
    }
    if args.loader_only:
        print(json.dumps(row))
        return

    t0 = time.perf_counter()
    train_main(argv)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [round(r["images_per_s"], 1) for r in rows]
    row.update(
        loop_images_per_s=statistics.median(windows[1:]) if len(windows) > 1 else None,
        loop_windows_images_per_s=windows,
        loop_wall_s=round(wall, 1),
    )
    print(json.dumps(row))


if __name__ == "__main__":
    main()
