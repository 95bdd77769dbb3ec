"""Lightning Fabric for a run: accelerator, devices and nodes, precision, DDP or FSDP2 sharding, loggers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger, TensorBoardLogger
from torch import nn

if TYPE_CHECKING:
    from capi_lab.train import RunConfig


def is_fsdp(fabric: Fabric) -> bool:
    from lightning.fabric.strategies import ModelParallelStrategy

    return isinstance(fabric.strategy, ModelParallelStrategy)


def shard_blocks(module: nn.Module, mesh: Any) -> nn.Module:
    """FSDP2: shard every transformer block, then the rest. Parameters are sharded one by one along
    their first axis, so the teacher's shards line up with the student's and the EMA is local."""
    from torch.distributed.fsdp import fully_shard

    from capi_lab.model.block import Block

    dp = mesh["data_parallel"]
    for m in module.modules():
        if isinstance(m, Block):
            fully_shard(m, mesh=dp)
    fully_shard(module, mesh=dp)
    return module


def make_fabric(run: RunConfig) -> Fabric:
    out_dir = Path(run.output_dir)
    precision = run.precision
    cuda = run.accelerator in ("cuda", "gpu") or (run.accelerator == "auto" and torch.cuda.is_available())
    if precision == "auto":
        precision = "bf16-mixed" if cuda else "32-true"
    strategy: Any = run.strategy
    if run.strategy == "fsdp":
        from lightning.fabric.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(
            shard_blocks, data_parallel_size=int(run.devices) * run.num_nodes, tensor_parallel_size=1
        )
    # version=None: a resumed run gets version_1, version_2, ... instead of overwriting earlier logs
    loggers: list[Any] = [CSVLogger(str(out_dir), name="csv_logs")]
    try:
        import tensorboard  # noqa: F401

        loggers.append(TensorBoardLogger(str(out_dir), name="tensorboard"))
    except ImportError:
        pass
    devices: Any = int(run.devices) if run.devices.isdigit() else run.devices
    return Fabric(
        accelerator=run.accelerator,
        devices=devices,
        num_nodes=run.num_nodes,
        strategy=strategy,
        precision=precision,
        loggers=loggers,
    )
