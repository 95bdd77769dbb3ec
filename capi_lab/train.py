"""Pretrain CAPI with Lightning Fabric, from a laptop CPU to many GPUs.

    python -m capi_lab.train --preset tiny --data demo-photos --output-dir runs/tiny --max-steps 200

One step is capi-method.md §4: teacher forward on the full images -> clustering loss -> its backward;
student forward on the visible patches, predictor at the predicted positions -> CAPI loss -> backward;
AdamW step; EMA update of the teacher and of the EMA student head; clustering-optimizer step.
Rerunning the same command continues from ``DIR/checkpoints/last.ckpt`` (or, when that does not read, the newest
periodic checkpoint that does), with the checkpoint's own seed, data and method settings (capi_lab.checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import ArgumentParser
from lightning.fabric import Fabric
from torch import Tensor, nn
from tqdm.auto import tqdm

from capi_lab.checkpoint import (
    check_resume,
    find_resume_checkpoint,
    load_checkpoint,
    record_resume,
    save_checkpoint,
    truncate_metrics,
)
from capi_lab.command_line import (
    clear_errors,
    config_files,
    flag_value,
    flatten,
    instantiate,
    new_parser,
    normalise_argv,
    read_yaml,
    shorthand_flags,
    write_yaml,
)
from capi_lab.config import CAPIConfig, ConfigError, get_preset
from capi_lab.data import DataError, check_decodable, resolve_source
from capi_lab.evaluation.during import EvalDuringConfig
from capi_lab.launch import check_devices, is_fsdp, make_fabric
from capi_lab.loader import DeviceBatches, make_loader
from capi_lab.losses import student_step, teacher_step
from capi_lab.masking import MaskBatch, mask_counts
from capi_lab.model.capi import CAPIModel
from capi_lab.optim import ema_update_, param_groups, set_hparams
from capi_lab.pretrained import CheckpointError, load_pretrained, save_authors_checkpoint
from capi_lab.schedules import Schedules
from capi_lab.sinkhorn import check_impl, default_impl
from capi_lab.snapshots import Snapshotter, probe_paths, snapshot_interval

log = logging.getLogger("capi_lab.train")


@dataclass
class RunConfig:
    """How a pretraining run is executed; the method (model, mask, optim, image_size, batch_size, crop_scale)
    follows, its defaults those of the preset."""

    preset: str = "tiny"
    """Named preset the CAPI config starts from (tiny, default, vit_s16, vit_b16, vit_l14)."""
    data: str = "demo-photos"
    """Image folder (recursive), text file of image paths, WebDataset tar shards ('shards/s-{000000..000041}.tar',
    or a folder with shards.json), 'fashion-mnist', 'demo-photos' or 'composite'."""
    output_dir: str = "runs/capi"
    """Run folder: config.yaml, metrics.jsonl, logs, checkpoints/, teacher export."""
    max_steps: int = 1000
    """Training steps; warmup and decay schedules are stretched to this length."""
    seed: int = 0
    """Seed of the initialisation, data order, crops and masks."""
    accelerator: str = "auto"
    """'auto', 'cpu', 'cuda', 'gpu', 'mps'."""
    devices: str = "1"
    """Devices per node: a number, or 'auto' for all."""
    num_nodes: int = 1
    """Number of nodes (launch with torchrun, Slurm or `fabric run`)."""
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """'ddp' replicates the model, 'fsdp' shards it (FSDP2); 'auto' is DDP on several devices."""
    precision: Literal["auto", "bf16-mixed", "32-true"] = "auto"
    """'auto' is bf16-mixed on GPUs and 32-true on CPU."""
    compile: bool = False
    """torch.compile the teacher step and the student step."""
    sinkhorn: Literal["auto", "eager", "potentials", "fused"] = "auto"
    """Sinkhorn-Knopp implementation (capi_lab.sinkhorn: all compute the same assignments); 'auto' is 'fused' on a
    CUDA GPU with Triton, 'potentials' with --compile, else 'eager'."""
    cuda_graphs: bool = False
    """With --compile on a GPU: replay the compiled steps as CUDA graphs (torch.compile mode 'reduce-overhead'),
    so the host launches a few graphs a step instead of every kernel. Costs extra GPU memory."""
    num_workers: int = -1
    """Data-loader workers per device; -1 picks cores / devices - 1, at most 16 on a GPU and 8 on a CPU, or none
    when training on a CPU with fewer than 4 cores (the step uses them all)."""
    full_decode: bool = False
    """Decode every JPEG at full size. By default a JPEG of at least 4x the crop size on its shorter side (896 px
    at 224) is decoded by libjpeg at 1/2-1/8 scale, keeping at least twice the crop size, which makes the loader
    several times faster on phone photos (benchmarks/RESULTS.md)."""
    log_every: int = 10
    """Steps between metric lines (metrics.jsonl, loggers, progress bar)."""
    checkpoint_every: int | None = None
    """Steps between checkpoints (one is always written at the end); default: a tenth of --max-steps, at most 500,
    so a killed run loses at most a tenth of its steps."""
    keep_checkpoints: int = 3
    """Periodic checkpoints kept besides last.ckpt (a resume falls back to them when last.ckpt does not read)."""
    resume_with_changes: bool = False
    """Resume a run folder's checkpoint even though this command's seed, data or method settings differ from the
    checkpoint's (they are listed, and recorded in DIR/resumes.jsonl); the weights must still fit the model."""
    snapshot_every: int | None = None
    """Steps between snapshots of what the teacher sees in the probe images (DIR/snapshots: PCA, cluster and
    predictor maps plus their numbers; capi_lab.snapshots); default: 20 per run, at least 50 steps apart, plus
    step 0 and the last step; 0: none."""
    snapshot_images: str | None = None
    """Folder of probe photos for the snapshots (its first 8 images); default: the 7 bundled example photos."""
    eval: EvalDuringConfig = field(default_factory=EvalDuringConfig)
    """Evaluations of the teacher during training (--eval.every N with --eval.data and/or --eval.seg)."""
    capi: CAPIConfig = field(default_factory=CAPIConfig)
    """The method: model, mask, optim, image_size, batch_size (filled from the preset)."""

    def __post_init__(self) -> None:
        for name, low in [("max_steps", 1), ("log_every", 1), ("checkpoint_every", 1), ("keep_checkpoints", 1),
                          ("num_nodes", 1), ("num_workers", -1), ("seed", 0)]:  # fmt: skip
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
        if not re.fullmatch(r"auto|-1|0*[1-9]\d*|\d+(,\d+)+,?|\d+,", self.devices.replace(" ", "")):
            raise ConfigError(
                f"--devices must be a number >= 1, 'auto', -1 (all) or a list of GPU indices like 0,1; "
                f"got {self.devices!r}"
            )
        if isinstance(self.eval, dict):  # from a checkpoint's or a YAML file's settings
            self.eval = EvalDuringConfig(**self.eval)
        self.eval = self.eval.resolved(self.data)
        if self.snapshot_every is not None and self.snapshot_every < 0:
            raise ConfigError(f"--snapshot-every must be >= 0 (0: no snapshots), got {self.snapshot_every}")
        if self.strategy == "fsdp" and self.snapshot_every:
            raise ConfigError("--snapshot-every does not work with --strategy fsdp yet (the teacher is sharded)")
        if self.eval.every and self.strategy == "fsdp":
            raise ConfigError("--eval.every does not work with --strategy fsdp yet (the teacher is sharded)")
        if self.cuda_graphs and not self.compile:
            raise ConfigError("--cuda-graphs replays the compiled steps: add --compile")
        if self.cuda_graphs and self.strategy == "fsdp":
            raise ConfigError(
                "--cuda-graphs does not work with --strategy fsdp (FSDP gathers the parameters into new "
                "buffers every step); drop --cuda-graphs"
            )
        if self.strategy == "fsdp" and not self.devices.isdigit():
            raise ConfigError(f"--strategy fsdp needs a number of --devices, got {self.devices!r}")
        grid = self.capi.image_size // self.capi.model.patch_size
        try:
            mask_counts(grid * grid, self.capi.mask)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @property
    def snapshot_interval(self) -> int:
        """Steps between snapshots (0: none): ``snapshot_every``, or the default of
        :func:`capi_lab.snapshots.snapshot_interval`; none by default under FSDP."""
        if self.strategy == "fsdp" and self.snapshot_every is None:
            return 0
        return snapshot_interval(self.snapshot_every, self.max_steps)

    @property
    def checkpoint_interval(self) -> int:
        """``checkpoint_every``, or a tenth of the run (at least 1, at most 500 steps)."""
        return self.checkpoint_every or max(1, min(500, math.ceil(self.max_steps / 10)))

    def to_dict(self) -> dict[str, Any]:
        run = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "capi"}
        run["eval"] = dataclasses.asdict(self.eval)
        return {**run, **self.capi.to_dict()}


# ----------------------------------------------------------------------------- configuration

SHORTHANDS = shorthand_flags(RunConfig, flatten=frozenset({"capi"}))


def build_parser(preset: str = RunConfig.preset) -> ArgumentParser:
    """The training command line, its defaults those of ``preset``."""
    parser = new_parser(
        "python -m capi_lab.train",
        "Pretrain CAPI. Any config field can be overridden: --optim.lr 5e-4, --mask.strategy block, "
        "--model.drop_path_rate 0.1, --batch_size 128 ... (dashes work too: --batch-size).",
        config_help="YAML file of settings (the keys of DIR/config.yaml); flags given with it win",
    )
    parser.add_class_arguments(RunConfig, nested_key=None, skip={"capi"})
    parser.add_class_arguments(CAPIConfig, nested_key=None)
    parser.set_defaults({**flatten(dataclasses.asdict(get_preset(preset))), "preset": preset})
    return parser


def resolve_config(argv: list[str] | None = None) -> RunConfig:
    """Preset < ``--config`` YAML < command-line flags, validated by the config dataclasses."""
    argv = normalise_argv(sys.argv[1:] if argv is None else argv, SHORTHANDS)
    in_files = (read_yaml(path).get("preset") for path in reversed(config_files(argv)))
    preset = flag_value(argv, "--preset") or next((p for p in in_files if p), RunConfig.preset)
    with clear_errors():
        parser = build_parser(preset)
    with clear_errors(parser.prog):
        ns = parser.instantiate(parser.parse_args(argv))
        return instantiate(RunConfig, ns, capi=instantiate(CAPIConfig, ns))


# ----------------------------------------------------------------------------- the two step modules


class TeacherStep(nn.Module):
    """Frozen EMA teacher + trainable clustering head; ``forward`` is :func:`teacher_step`. Wrapped by
    Fabric (DDP/FSDP) so the clustering head's gradients are reduced across ranks. It also holds the EMA
    copy of the student head (unused in the forward) so that under FSDP it is sharded like the student
    head it follows; its state dict has the layout of a :class:`CAPIModel`."""

    def __init__(self, teacher: CAPIModel, optim: Any, sinkhorn: str):
        super().__init__()
        self.backbone, self.head, self.clustering_head = teacher.backbone, teacher.head, teacher.clustering_head
        self.o = optim
        self.sinkhorn = sinkhorn

    def forward(self, images: Tensor, predict_indices: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        o = self.o
        return tuple(
            teacher_step(
                self.backbone, self.clustering_head, images, predict_indices, o.target_temp, o.student_temp,
                o.sinkhorn_iters, o.sinkhorn_positionwise, self.sinkhorn,
            )
        )  # fmt: skip


class StudentStep(nn.Module):
    """Student backbone + head; ``forward`` is :func:`student_step`. State dict layout of a :class:`CAPIModel`."""

    def __init__(self, student: CAPIModel, student_temp: float):
        super().__init__()
        self.backbone, self.head, self.student_temp = student.backbone, student.head, student_temp

    def forward(self, images: Tensor, visible: Tensor, predict: Tensor, targets: Tensor) -> Tensor:
        masks = MaskBatch(visible.new_empty(0, dtype=torch.bool), visible, predict)  # no CPU tensor in the graph
        return student_step(self.backbone, self.head, images, masks, targets, self.student_temp)


@dataclass
class Trainer:
    """Everything a step touches. ``student_step`` / ``teacher_step`` are the modules as set up by Fabric
    (wrapped, maybe compiled); ``student_module`` / ``teacher_module`` the same modules unwrapped, which
    checkpoints read and write."""

    fabric: Fabric
    cfg: CAPIConfig
    student: CAPIModel
    teacher: CAPIModel
    student_step: Any
    teacher_step: Any
    optimizer: Any
    clustering_optimizer: Any
    schedules: Schedules
    student_module: nn.Module
    teacher_module: nn.Module
    step: int = 0
    ema_pairs: tuple[list[Tensor], list[Tensor]] = field(default_factory=lambda: ([], []))
    """(teacher, student) parameters of the backbones and student heads, in matching order."""
    cuda_graphs: bool = False
    """The compiled steps are replayed as CUDA graphs: each step starts a new graph generation, and outputs
    that outlive the step are copied out of the graphs' memory pool."""
    data_readers: int | None = None
    """Over tar shards, the ranks x loader workers that read them (the shard order depends on it)."""

    def __post_init__(self) -> None:
        self.ema_pairs = (_params(self.teacher), _params(self.student))


def build_trainer(
    fabric: Fabric,
    cfg: CAPIConfig,
    max_steps: int,
    compile: bool = False,
    seed: int = 0,
    cuda_graphs: bool = False,
    sinkhorn: str = "auto",
) -> Trainer:
    """Models, step modules, optimizers and schedules, set up by Fabric. ``cuda_graphs`` (with ``compile``,
    on CUDA) compiles the steps in mode 'reduce-overhead'; elsewhere it is ignored with a warning. ``sinkhorn``:
    the implementation (:data:`capi_lab.sinkhorn.IMPLS`), 'auto' for :func:`capi_lab.sinkhorn.default_impl`."""
    if cuda_graphs and not (compile and fabric.device.type == "cuda"):
        log.warning("CUDA graphs need --compile and a CUDA device; running without them")
        cuda_graphs = False
    if cuda_graphs and fabric.world_size > 1:
        raise ConfigError(
            f"--cuda-graphs is for one process on one GPU (this run has {fabric.world_size}): the gradient and "
            "Sinkhorn all-reduces would be captured into the graphs, which is untested. Drop --cuda-graphs"
        )
    with fabric.init_module(empty_init=False):
        torch.manual_seed(seed)
        student = CAPIModel(cfg.model, student_head=True, clustering_head=False)
        teacher = CAPIModel(cfg.model, student_head=True, clustering_head=True)
    teacher.backbone.load_state_dict(student.backbone.state_dict())
    teacher.head.load_state_dict(student.head.state_dict())
    teacher.backbone.requires_grad_(False)
    teacher.head.requires_grad_(False)
    teacher.backbone.eval()  # no stochastic depth in the teacher
    o = cfg.optim
    if sinkhorn == "auto":
        sinkhorn = default_impl(fabric.device, compile)
    check_impl(sinkhorn)
    log.info("Sinkhorn-Knopp: %s", sinkhorn)
    s_raw, t_raw = StudentStep(student, o.student_temp), TeacherStep(teacher, o, sinkhorn)
    fsdp = is_fsdp(fabric)
    mode = "reduce-overhead" if cuda_graphs else None
    s_step = fabric.setup_module(torch.compile(s_raw, mode=mode) if compile else s_raw)
    t_step = fabric.setup_module(torch.compile(t_raw, mode=mode) if compile else t_raw)
    # optimizers are built after set-up: FSDP replaces the parameters by sharded ones
    groups = param_groups({"backbone": student.backbone, "head": student.head}, o.patch_embed_lr_mult, o.norm_wd_mult)
    fused = fabric.device.type == "cuda" and not fsdp
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in groups], lr=o.lr, betas=o.betas, fused=fused
    )
    clustering_optimizer = torch.optim.AdamW(
        teacher.clustering_head.parameters(),
        lr=o.lr,
        betas=o.betas,
        weight_decay=o.clustering_weight_decay,
        fused=fused,
    )
    optimizer, clustering_optimizer = fabric.setup_optimizers(optimizer, clustering_optimizer)
    if not fsdp:
        fabric.to_device(teacher)
    schedules = Schedules.of(max_steps, o)
    return Trainer(
        fabric, cfg, student, teacher, s_step, t_step, optimizer, clustering_optimizer, schedules, s_raw, t_raw,
        cuda_graphs=cuda_graphs,
    )  # fmt: skip


def train_step(tr: Trainer, images: Tensor, masks: MaskBatch) -> dict[str, Tensor]:
    """One CAPI step in the paper's order; returns detached device tensors (no host sync)."""
    fabric, o, step = tr.fabric, tr.cfg.optim, tr.step
    if tr.cuda_graphs:  # the previous step's graph outputs may be overwritten from here on
        torch.compiler.cudagraph_mark_step_begin()
    set_hparams(tr.optimizer, tr.schedules.lr_at(step), o.weight_decay)
    set_hparams(tr.clustering_optimizer, tr.schedules.clustering_lr_at(step), o.clustering_weight_decay)
    # (1) teacher on the full images -> targets, clustering loss -> backward into the clustering head
    targets, clustering_loss, assignments, entropy = tr.teacher_step(images, masks.predict_indices)
    fabric.backward(clustering_loss)
    # (2) student on the visible patches, predictor at the predicted ones -> CAPI loss -> backward
    capi_loss = tr.student_step(images, masks.visible_indices, masks.predict_indices, targets)
    fabric.backward(capi_loss)
    if o.grad_clip is not None:
        # error_if_nonfinite would read the norm on the host, a sync every step; a non-finite norm is left to
        # the NaN-loss check of the loop instead
        fabric.clip_gradients(tr.student_step, tr.optimizer, max_norm=o.grad_clip, error_if_nonfinite=False)
    # (3) AdamW step of the student
    tr.optimizer.step()
    tr.optimizer.zero_grad(set_to_none=True)
    # (4) EMA of the teacher backbone and of the student head's EMA copy
    ema_update_(tr.ema_pairs[0], tr.ema_pairs[1], tr.schedules.momentum_at(step))
    # (5) clustering-head step
    tr.clustering_optimizer.step()
    tr.clustering_optimizer.zero_grad(set_to_none=True)
    tr.step += 1
    # index_fill_ hands True to the kernel as an argument; `used[idx] = True` would first copy it from the host
    # with a blocking copy: a host-device sync every step, after which the GPU idles while the host begins the
    # next step (benchmarks/RESULTS.md shows it in a trace)
    used = torch.zeros(targets.shape[-1], dtype=torch.bool, device=targets.device)
    used.index_fill_(0, assignments.flatten(), True)
    out = {"capi_loss": capi_loss.detach(), "clustering_loss": clustering_loss.detach(), "target_entropy": entropy}
    if tr.cuda_graphs:  # these live in the graphs' pool, which the next step's replay overwrites
        out = {k: v.clone() for k, v in out.items()}
    return {**out, "used": used}


def _params(model: CAPIModel) -> list[Tensor]:
    return list(model.backbone.parameters()) + list(model.head.parameters())


# ----------------------------------------------------------------------------- the loop


class MetricsWindow:
    """Accumulates step outputs on the device; ``flush`` reduces across ranks (one host sync)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.used: Tensor | None = None
        self.n = 0
        self.t0 = time.perf_counter()
        self.images = 0

    def add(self, out: dict[str, Tensor], images: int) -> None:
        for k in ("capi_loss", "clustering_loss", "target_entropy"):
            self.sums[k] = self.sums.get(k, 0) + out[k].float()
        self.used = out["used"] if self.used is None else self.used | out["used"]
        self.n += 1
        self.images += images

    def flush(self, fabric: Fabric) -> dict[str, float]:
        means = {k: v / self.n for k, v in self.sums.items()}
        means = {k: float(fabric.all_reduce(v, reduce_op="mean")) for k, v in means.items()}
        used = fabric.all_reduce(self.used.float(), reduce_op="sum")
        dt = time.perf_counter() - self.t0
        out = {**means, "prototypes_used": int((used > 0).sum()), "images_per_s": self.images * fabric.world_size / dt}
        self.reset()
        return out


class NaNLossError(RuntimeError):
    pass


def fit(fabric: Fabric, run: RunConfig, source: Any, resume: tuple[Path, dict[str, Any]] | None = None) -> Trainer:
    """Train ``run`` on ``source``, from ``resume`` (a checkpoint's path and state) when given."""
    out_dir = Path(run.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    # the loader first: a shard set that cannot feed every reader stops here, before any model is built
    data_loader = make_loader(run, fabric, source, int(resume[1]["step"]) if resume is not None else 0)
    snap = None
    if run.snapshot_interval and fabric.global_rank == 0:
        c = run.capi
        snap = Snapshotter(out_dir, run.snapshot_images, c.image_size, c.model.patch_size, c.mask, run.seed)
    tr = build_trainer(fabric, run.capi, run.max_steps, run.compile, run.seed, run.cuda_graphs, run.sinkhorn)
    fabric.print(f"Sinkhorn-Knopp: {tr.teacher_module.sinkhorn} (--sinkhorn {run.sinkhorn})")
    last = ckpt_dir / "last.ckpt"
    if resume is not None:
        load_checkpoint(tr, resume[1])
        fabric.print(f"resuming from {resume[0]} at step {tr.step}")
    metrics_file = out_dir / "metrics.jsonl"
    if fabric.global_rank == 0:  # one line per logged step, whatever was logged after the checkpoint
        truncate_metrics(metrics_file, tr.step)
        if snap is not None:
            snap.truncate(tr.step)
    if tr.step >= run.max_steps:
        fabric.print(f"nothing to do: the checkpoint is at step {tr.step} >= --max-steps {run.max_steps}")
        return tr
    tr.data_readers = data_loader.readers
    if resume is not None and tr.data_readers != resume[1].get("data_readers", tr.data_readers):
        log.warning(
            "the checkpoint's run read its shards with %s readers (ranks x loader workers), this one with %s: the "
            "shard order differs from here on (set --num-workers so that ranks x workers is %s to continue the "
            "same stream)", resume[1]["data_readers"], tr.data_readers, resume[1]["data_readers"]
        )  # fmt: skip
    loader = DeviceBatches(iter(data_loader), fabric)
    window = MetricsWindow()
    evaluate = None
    if run.eval.every and fabric.global_rank == 0:
        from capi_lab.evaluation.during import DuringTraining

        evaluate = DuringTraining(run.eval, run.capi.image_size, run.capi.model.patch_size, run.seed)

    def snapshot() -> None:  # its numbers go to the loggers and DIR/snapshots/index.jsonl, not metrics.jsonl
        fabric.log_dict(snap(tr.teacher, tr.step, with_overview=tr.step == run.max_steps), step=tr.step)

    if snap is not None and tr.step == 0:  # what the model sees before it has learned anything
        snapshot()
    bar = tqdm(total=run.max_steps, initial=tr.step, disable=fabric.global_rank != 0, desc="train", dynamic_ncols=True)
    skipped = 0
    nan_steps: list[int] = []
    pending: tuple[int, Tensor] | None = None
    while tr.step < run.max_steps:
        batch = next(loader)
        skipped += batch.skipped
        logged = (tr.step + 1) % run.log_every == 0 or tr.step + 1 == run.max_steps
        out = train_step(tr, batch.images, batch.masks)
        window.add(out, batch.images.shape[0])
        # NaN check one step late: reading the previous loss does not stall the device queue
        if pending is not None:
            _check_nan(pending, nan_steps, ckpt_dir)
        pending = (tr.step, out["capi_loss"] + out["clustering_loss"])
        bar.update(1)
        if logged:
            m = window.flush(fabric)
            total_skipped = int(fabric.all_reduce(torch.tensor(float(skipped), device=fabric.device), reduce_op="sum"))
            row = {
                "step": tr.step,
                **m,
                "lr": tr.schedules.lr_at(tr.step - 1),
                "momentum": tr.schedules.momentum_at(tr.step - 1),
                "clustering_lr": tr.schedules.clustering_lr_at(tr.step - 1),
                "skipped_images": total_skipped,
            }
            fabric.log_dict({k: v for k, v in row.items() if k != "step"}, step=tr.step)
            if fabric.global_rank == 0:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{m['capi_loss']:.3f}", img_s=f"{m['images_per_s']:.0f}", refresh=False)
        if run.eval.every and (tr.step % run.eval.every == 0 or tr.step == run.max_steps):
            if evaluate is not None:
                scores = evaluate(tr.teacher, fabric.device)
                fabric.log_dict(scores, step=tr.step)
                with metrics_file.open("a") as f:
                    f.write(json.dumps({"step": tr.step, **scores}) + "\n")
                bar.write(f"step {tr.step}: " + ", ".join(f"{k[5:]} {v:.4g}" for k, v in scores.items()))
            fabric.barrier()
        if snap is not None and (tr.step % run.snapshot_interval == 0 or tr.step == run.max_steps):
            snapshot()
        if tr.step % run.checkpoint_interval == 0 or tr.step == run.max_steps:
            _check_nan(pending, nan_steps, ckpt_dir)
            if not nan_steps:
                save_checkpoint(tr, run, ckpt_dir)
    bar.close()
    if fabric.global_rank == 0:  # from the saved checkpoint: full tensors whatever the sharding
        teacher = load_pretrained(last)
        export = save_authors_checkpoint(teacher, out_dir / "teacher_authors.pth", include_heads=True)
        fabric.print(f"done: {tr.step} steps; checkpoint {last}; teacher in the authors' layout: {export}")
    for logger in fabric.loggers:
        logger.finalize("success")
    return tr


def _check_nan(pending: tuple[int, Tensor], nan_steps: list[int], ckpt_dir: Path) -> None:
    step, loss = pending
    if nan_steps and nan_steps[-1] == step:
        return
    if math.isfinite(float(loss)):
        nan_steps.clear()
        return
    nan_steps.append(step)
    if len(nan_steps) >= 3:
        raise NaNLossError(
            f"the loss was NaN/inf for 3 steps in a row (steps {nan_steps[0]}-{nan_steps[-1]}); stopping. "
            f"The last good checkpoint is left in place at {ckpt_dir / 'last.ckpt'}. "
            "Lower --optim.lr, add --optim.grad-clip 3.0, or train with --precision 32-true"
        )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="[capi_lab] %(levelname)s %(message)s")
    run = resolve_config(argv)
    out_dir = Path(run.output_dir)
    try:
        source = resolve_source(run.data)  # bad data, devices or checkpoints fail here, before any model is built
        check_decodable(source)
        if run.snapshot_interval:
            probe_paths(run.snapshot_images)
        check_devices(run)
        resume = find_resume_checkpoint(out_dir / "checkpoints")
        changes = check_resume(run, *resume) if resume is not None else {}
    except (DataError, ConfigError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    fabric = make_fabric(run)
    fabric.launch()
    if fabric.global_rank == 0:
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        config_file = out_dir / "config.yaml"
        if resume is None or not config_file.exists():  # written once per run: the settings it started with
            write_yaml(config_file, run.to_dict() if resume is None else resume[1]["run"])
        if resume is not None:
            record_resume(out_dir, resume[0], resume[1], changes)
        fabric.print(f"config ({config_file}):\n" + json.dumps(run.to_dict(), indent=1))
        fabric.print(f"data: {run.data} ({len(source)} images)")
    fabric.barrier()
    try:
        fit(fabric, run, source, resume)
    except (ConfigError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    except DataError as e:  # from the loader; one raised in a worker carries its traceback, the cause comes last
        cause = str(e).strip().splitlines()[-1].removeprefix("capi_lab.data.DataError: ")
        raise SystemExit(f"error: {cause}") from None
    except NaNLossError as e:
        fabric.print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
