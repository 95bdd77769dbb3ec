"""Training checkpoints: one state dict for save and exact resume, written atomically, read without running code.

``DIR/checkpoints/step_XXXXXXX.ckpt`` holds the student, the teacher (``CAPIModel`` layout, what
``load_pretrained`` reads), both optimizers, the step, the data-stream position, the RNG states and the run's
config; ``last.ckpt`` is a copy of the newest (a file of its own, so damage to one leaves the other). Resuming
takes the newest checkpoint that reads, and only with the checkpoint's own seed, data and method settings unless
the changes are asked for (``--resume-with-changes``); each resume is recorded in ``DIR/resumes.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from capi_lab.config import CAPIConfig, ConfigError
from capi_lab.pretrained import FORMAT, CheckpointError, read_checkpoint
from capi_lab.schedules import Schedules

if TYPE_CHECKING:
    from capi_lab.train import RunConfig, Trainer

log = logging.getLogger("capi_lab.train")

IDENTITY = ("seed", "data")
"""Run settings that make a run what it is, besides the method: resuming with other values is refused unless
asked for. The others (devices, workers, logging, compile, ...) may change from one resume to the next."""


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
        "data_readers": tr.data_readers,
        "rng": rng,
    }


def _raw(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # Fabric's wrapper -> the torch optimizer


def save_checkpoint(tr: Trainer, run: RunConfig, ckpt_dir: Path) -> Path:
    """Write ``step_XXXXXXX.ckpt`` and then ``last.ckpt`` as a copy of it, each atomically (temporary file, then
    rename), so a crash leaves the previous files whole and damage to one file leaves the other; keep the
    ``keep_checkpoints`` newest periodic ones."""
    fabric = tr.fabric
    final = ckpt_dir / f"step_{tr.step:07d}.ckpt"
    state = checkpoint_state(tr, run)  # every rank takes part (gathers shards under FSDP)
    if fabric.global_rank == 0:
        tmp = ckpt_dir / f".{final.name}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, final)
        last_tmp = ckpt_dir / ".last.ckpt.tmp"
        shutil.copyfile(final, last_tmp)
        os.replace(last_tmp, ckpt_dir / "last.ckpt")
        periodic = sorted(ckpt_dir.glob("step_*.ckpt"))
        for old in periodic[: max(len(periodic) - run.keep_checkpoints, 0)]:
            old.unlink()
    fabric.barrier()
    return final


TRAINING_KEYS = ("config", "run", "student", "teacher", "optimizer", "clustering_optimizer", "step", "rng")


def read_training_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint's state (read without running code), or a :class:`CheckpointError` saying why not."""
    ck = read_checkpoint(path)
    missing = [k for k in TRAINING_KEYS if k not in ck]
    if missing:
        raise CheckpointError(f"{str(path)!r} is not a capi_lab training checkpoint: it has no {missing}")
    if not isinstance(ck["step"], int) or ck["step"] < 0:
        raise CheckpointError(f"{str(path)!r} has an invalid step {ck['step']!r}")
    return ck


def resume_candidates(ckpt_dir: Path) -> list[Path]:
    """``last.ckpt``, then the periodic checkpoints, newest first."""
    periodic = sorted(ckpt_dir.glob("step_*.ckpt"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0), reverse=True)
    last = ckpt_dir / "last.ckpt"
    return ([last] if last.exists() else []) + periodic


def find_resume_checkpoint(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``ckpt_dir`` that reads, with its state; None when there is none. A file that does
    not read is passed over with a warning naming it; when none reads, a :class:`CheckpointError` lists them."""
    candidates = resume_candidates(ckpt_dir)
    failures = []
    for path in candidates:
        try:
            ck = read_training_checkpoint(path)
        except CheckpointError as e:
            failures.append(f"{path.name}: {e}")
            log.warning("cannot resume from %s (%s); trying the next older checkpoint", path, e)
            continue
        if failures:
            log.warning("resuming from %s (step %d) instead", path, ck["step"])
        return path, ck
    if candidates:
        raise CheckpointError(
            f"none of the {len(candidates)} checkpoints in {ckpt_dir} can be read ({'; '.join(failures)}). "
            f"Move {ckpt_dir} away to start the run afresh, or choose a new --output-dir"
        )
    return None


def load_checkpoint(tr: Trainer, ck: dict[str, Any] | Path) -> dict[str, Any]:
    """Restore models, optimizers, step and RNG states from a checkpoint's state (or file, read without running
    code). Weights that do not fit the model are a :class:`CheckpointError`."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if isinstance(ck, Path):
        ck = read_training_checkpoint(ck)
    opts = _state_dict_options(strict=True)
    try:
        set_model_state_dict(tr.student_module, ck["student"], options=opts)
        set_model_state_dict(tr.teacher_module, ck["teacher"], options=opts)
        set_optimizer_state_dict(tr.student_module, _raw(tr.optimizer), ck["optimizer"], options=opts)
        set_optimizer_state_dict(
            tr.teacher_module, _raw(tr.clustering_optimizer), ck["clustering_optimizer"], options=opts
        )
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(
            f"the checkpoint's weights do not fit this run's model ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]}); resume with the checkpoint's model settings"
        ) from None
    tr.step = int(ck["step"])
    torch.set_rng_state(ck["rng"]["torch"])
    random.setstate(_as_tuple(ck["rng"]["python"]))
    if "cuda" in ck["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
    return ck


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def resume_changes(run: RunConfig, ck: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (checkpoint's value, this run's)}`` for every method field and identity setting
    (:data:`IDENTITY`) that differs from the checkpoint's own config."""
    try:
        saved = CAPIConfig.from_dict(ck["config"])
    except ConfigError as e:
        raise CheckpointError(f"the checkpoint's config is invalid ({e})") from None
    changes = {k: (a, b) for k, (a, b) in _flat_pairs(saved.to_dict(), run.capi.to_dict()).items() if a != b}
    for k in IDENTITY:
        if k in ck["run"] and ck["run"][k] != getattr(run, k):
            changes[k] = (ck["run"][k], getattr(run, k))
    return changes


def check_resume(run: RunConfig, path: Path, ck: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume from ``ck`` with other seed, data or method settings, unless ``run.resume_with_changes``
    (then they are warned about); warn when a new ``--max-steps`` re-stretches the schedules. Returns the
    changes, for the resume record."""
    changes = resume_changes(run, ck)
    listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
    if changes and not run.resume_with_changes:
        raise ConfigError(
            f"{run.output_dir} holds a checkpoint ({path.name}, step {ck['step']}) of a run with different settings "
            f"({listed}; checkpoint -> this command). Rerun with the checkpoint's settings to resume, add "
            "--resume-with-changes to continue with these, or choose a new --output-dir"
        )
    if changes:
        log.warning("resuming with changed settings (--resume-with-changes): %s", listed)
    old_steps = ck["run"].get("max_steps", run.max_steps)
    if old_steps != run.max_steps:
        step = int(ck["step"])
        before, after = (Schedules.of(n, run.capi.optim) for n in (old_steps, run.max_steps))
        log.warning(
            "--max-steps %d -> %d stretches the schedules to the new length: at step %d the lr goes from %.3g to "
            "%.3g and the teacher momentum from %.5f to %.5f",
            old_steps, run.max_steps, step, before.lr_at(step), after.lr_at(step),
            before.momentum_at(step), after.momentum_at(step),
        )  # fmt: skip
        changes["max_steps"] = (old_steps, run.max_steps)
    return changes


def record_resume(out_dir: Path, path: Path, ck: dict[str, Any], changes: dict[str, tuple[Any, Any]]) -> None:
    """Append one line to ``DIR/resumes.jsonl``: when, from which checkpoint and step, and what changed."""
    row = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": path.name,
        "step": int(ck["step"]),
        "changes": {k: list(v) for k, v in changes.items()},
    }
    with (out_dir / "resumes.jsonl").open("a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a metrics-style JSON-lines file that have an integer ``step``; a line cut in half by a running
    writer (or damaged) is skipped, and a missing or unreadable file is no rows."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            out.append(row)
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of ``metrics.jsonl`` up to ``step`` (the resumed one; 0 for a new run), so that after a
    kill and resume it still holds one line per logged step."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut by a kill
            continue
    path.write_text("".join(line + "\n" for line in keep))


def _flat_pairs(a: dict, b: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    out = {}
    for k in a:
        if isinstance(a[k], dict):
            out.update(_flat_pairs(a[k], b.get(k, {}), f"{prefix}{k}."))
        else:
            out[prefix + k] = (a[k], b.get(k))
    return out
