"""Lightning Fabric for a run: accelerator, devices and nodes, precision, DDP or FSDP2 sharding, loggers."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from capi_lab.config import ConfigError

if TYPE_CHECKING:
    from capi_lab.train import RunConfig

log = logging.getLogger("capi_lab.train")


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


def check_devices(run: RunConfig) -> None:
    """Refuse an accelerator this machine does not have, or more GPUs than it has, before anything starts; warn
    when more CPU processes are asked for than there are cores."""
    accelerator = run.accelerator
    if accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(
            f"--accelerator {accelerator}: no CUDA GPU is visible (torch {torch.__version__}, {build}). "
            "Use --accelerator cpu (or auto), or install a CUDA build of torch on a machine with a GPU"
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--accelerator mps: Apple's MPS is not available here; use --accelerator cpu (or auto)")
    if not run.devices.isdigit():
        return
    n = int(run.devices)
    on_gpu = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu and n > torch.cuda.device_count():
        raise ConfigError(f"--devices {n}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    cores = os.cpu_count() or 1
    if not on_gpu and accelerator in ("cpu", "auto") and n > cores:
        log.warning(
            "--devices %d on the CPU starts %d training processes on %d cores; they share the cores, so this is "
            "slower than --devices 1 (use it to try DDP/FSDP, not for speed)", n, n, cores,
        )  # fmt: skip


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
