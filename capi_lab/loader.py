"""The training loader: the image stream, its workers, and each batch's copy to the device on a side stream.

``make_loader`` serves batch ``n`` of a run to every rank in the same order whatever the number of workers, so
a resumed run (``start_step``) sees exactly the samples it would have seen (capi_lab.data.StreamSampler).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric import Fabric

from capi_lab.data import Batch, MaskCollator, PretrainStream, StreamSampler, batch_to

if TYPE_CHECKING:
    from capi_lab.train import RunConfig


def default_workers(device_type: str, cores: int, local_rank: int = 0, gpus: int = 0) -> int:
    """Loader workers per process for ``--num-workers -1``. Training on a CPU with fewer than 4 cores: none,
    since the step already uses every core and a loader process competing with it costs more than the loading
    it does (the README's quick start is slower with one worker on 2 cores). Otherwise cores / processes - 1, at
    most 8 on a CPU (the step needs the cores) and 16 on a GPU, since one core decodes a few hundred images a
    second and a compiled ViT-B/16 step on a Hopper GPU takes thousands (figures in benchmarks/RESULTS.md)."""
    if device_type == "cpu" and cores < 4:
        return 0
    cap = 16 if device_type == "cuda" else 8
    workers = max(0, min(cap, cores // max(local_rank + 1, 1) - 1))
    return min(workers, max(cores // max(gpus, 1) - 1, 0))


def make_loader(run: RunConfig, fabric: Fabric, source: Any, start_step: int) -> torch.utils.data.DataLoader:
    """The run's loader from ``start_step``: over a folder-like source the positions of :class:`StreamSampler`,
    over tar shards a :class:`~capi_lab.data.shards.ShardStream` per rank (``loader.readers`` is then the number
    of shard readers, ranks x workers, which the shard order depends on; None for folders)."""
    from capi_lab.data.shards import ShardSource, ShardStream

    cfg = run.capi
    grid = (cfg.image_size // cfg.model.patch_size,) * 2
    workers = run.num_workers
    if workers < 0:
        workers = default_workers(fabric.device.type, os.cpu_count() or 1, fabric.local_rank, torch.cuda.device_count())
    common = dict(
        batch_size=cfg.batch_size,
        collate_fn=MaskCollator(grid, cfg.mask, run.seed),
        num_workers=workers,
        pin_memory=fabric.device.type == "cuda",
        persistent_workers=workers > 0,
        # 4 batches ahead per worker, 2 with more than 4 workers (a ViT-B/16 batch of 256 is 154 MB of shared
        # memory: 16 workers x 4 would hold 10 GB)
        prefetch_factor=(4 if workers <= 4 else 2) if workers > 0 else None,
    )
    if isinstance(source, ShardSource):
        stream = ShardStream(source, cfg.image_size, cfg.batch_size, fabric.global_rank, fabric.world_size,
                             start_step, run.seed, cfg.crop_scale, run.full_decode)  # fmt: skip
        stream.check_split(workers)
        loader = torch.utils.data.DataLoader(stream, **common)
        loader.readers = fabric.world_size * max(workers, 1)
        return loader
    loader = torch.utils.data.DataLoader(
        PretrainStream(source, cfg.image_size, run.seed, cfg.crop_scale, run.full_decode),
        sampler=StreamSampler(cfg.batch_size, fabric.global_rank, fabric.world_size, start_step),
        **common,
    )
    loader.readers = None
    return loader


class DeviceBatches:
    """The loader's batches on the training device, each copied on a side stream.

    The training loop never waits for the GPU, so when it asks for batch ``n + 1`` the GPU is still running
    step ``n``. On CUDA the batch's copy then goes on a side stream, from the loader's page-locked memory, and
    the copy engine moves it while step ``n`` computes; on the compute stream it would wait for step ``n`` to
    finish, and step ``n + 1`` for it (a ViT-B/16 batch of 256 fp32 images is 154 MB: milliseconds over PCIe).
    Nothing is fetched ahead of time, so a slow loader never holds up a step whose batch is ready. Elsewhere it
    is ``fabric.to_device``.
    """

    def __init__(self, loader: Iterator[Batch], fabric: Fabric):
        self.loader, self.fabric = loader, fabric
        self.stream = torch.cuda.Stream(fabric.device) if fabric.device.type == "cuda" else None

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> Batch:
        batch = next(self.loader)
        if self.stream is None:
            return batch_to(batch, self.fabric.to_device)
        with torch.cuda.stream(self.stream):
            batch = batch_to(batch, lambda t: t.to(self.fabric.device, non_blocking=True))
        compute = torch.cuda.current_stream(self.fabric.device)
        compute.wait_stream(self.stream)  # the step starts once its batch has arrived
        for t in (batch.images, *batch.masks):
            t.record_stream(compute)  # keeps the allocator from reusing it before the step is done
        return batch
