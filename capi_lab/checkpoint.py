"""Training checkpoints: one state dict for save and exact resume, written atomically, read without running code.

``DIR/checkpoints/step_XXXXXXX.ckpt`` holds the student, the teacher (``CAPIModel`` layout, what
``load_pretrained`` reads), both optimizers, the step, the data-stream position and the RNG states;
``last.ckpt`` points at the newest. A run folder is resumed only with the same method config.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from capi_lab.command_line import read_yaml
from capi_lab.config import CAPIConfig
from capi_lab.pretrained import FORMAT

if TYPE_CHECKING:
    from capi_lab.train import RunConfig, Trainer


def _state_dict_options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def checkpoint_state(tr: Trainer, run: RunConfig) -> dict[str, Any]:
    """The one state dict for save/resume, as full (unsharded) tensors on the CPU; ``teacher`` (with
    both heads, in :class:`CAPIModel` layout) is what load_pretrained uses. Collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _state_dict_options(cpu_offload=True)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "format": FORMAT,
        "config": tr.cfg.to_dict(),
        "run": run.to_dict(),
        "student": get_model_state_dict(tr.student_module, options=opts),
        "teacher": get_model_state_dict(tr.teacher_module, options=opts),
        "optimizer": get_optimizer_state_dict(tr.student_module, _raw(tr.optimizer), options=opts),
        "clustering_optimizer": get_optimizer_state_dict(
            tr.teacher_module, _raw(tr.clustering_optimizer), options=opts
        ),
        "step": tr.step,
        "stream_position": tr.step * run.capi.batch_size * tr.fabric.world_size,
        "rng": rng,
    }


def _raw(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # Fabric's wrapper -> the torch optimizer


def save_checkpoint(tr: Trainer, run: RunConfig, ckpt_dir: Path) -> Path:
    """Write ``step_XXXXXXX.ckpt`` atomically (temporary file, then rename) and point ``last.ckpt`` at it
    with an atomic hard-link swap; keep the ``keep_checkpoints`` newest."""
    fabric = tr.fabric
    final = ckpt_dir / f"step_{tr.step:07d}.ckpt"
    state = checkpoint_state(tr, run)  # every rank takes part (gathers shards under FSDP)
    if fabric.global_rank == 0:
        tmp = ckpt_dir / f".{final.name}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, final)
        link_tmp = ckpt_dir / ".last.ckpt.tmp"
        link_tmp.unlink(missing_ok=True)
        try:
            os.link(final, link_tmp)
        except OSError:  # file systems without hard links
            import shutil

            shutil.copyfile(final, link_tmp)
        os.replace(link_tmp, ckpt_dir / "last.ckpt")
        periodic = sorted(ckpt_dir.glob("step_*.ckpt"))
        for old in periodic[: max(len(periodic) - run.keep_checkpoints, 0)]:
            old.unlink()
    fabric.barrier()
    return final


def load_checkpoint(tr: Trainer, path: Path) -> dict[str, Any]:
    """Restore models, optimizers, step and RNG states from a checkpoint (read without running code)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    ck = torch.load(path, map_location="cpu", weights_only=True)
    opts = _state_dict_options(strict=True)
    set_model_state_dict(tr.student_module, ck["student"], options=opts)
    set_model_state_dict(tr.teacher_module, ck["teacher"], options=opts)
    set_optimizer_state_dict(tr.student_module, _raw(tr.optimizer), ck["optimizer"], options=opts)
    set_optimizer_state_dict(tr.teacher_module, _raw(tr.clustering_optimizer), ck["clustering_optimizer"], options=opts)
    tr.step = int(ck["step"])
    torch.set_rng_state(ck["rng"]["torch"])
    random.setstate(_as_tuple(ck["rng"]["python"]))
    if "cuda" in ck["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
    return ck


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def check_resume_config(run: RunConfig) -> None:
    """A run folder with a checkpoint must be resumed with the same method config."""
    saved = Path(run.output_dir) / "config.yaml"
    if not (Path(run.output_dir) / "checkpoints" / "last.ckpt").exists() or not saved.exists():
        return
    old = read_yaml(saved)
    method = {f.name for f in dataclasses.fields(CAPIConfig)}  # every field of the method, crop_scale included
    old_capi = CAPIConfig.from_dict({k: v for k, v in old.items() if k in method})
    if old_capi != run.capi:
        diff = [k for k, (a, b) in _flat_pairs(old_capi.to_dict(), run.capi.to_dict()).items() if a != b]
        raise SystemExit(
            f"error: {run.output_dir} holds a checkpoint of a run with different settings ({', '.join(diff)}). "
            "Rerun with the same settings to resume, or choose a new --output-dir"
        )


def _flat_pairs(a: dict, b: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    out = {}
    for k in a:
        if isinstance(a[k], dict):
            out.update(_flat_pairs(a[k], b.get(k, {}), f"{prefix}{k}."))
        else:
            out[prefix + k] = (a[k], b.get(k))
    return out
