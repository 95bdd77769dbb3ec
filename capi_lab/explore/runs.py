"""Reading a run folder while it trains: metrics, health signals, snapshots and checkpoints (the app's Runs view).

Nothing here locks or writes anything: a line cut in half by the running writer is skipped, a missing file is
an empty list, and every problem becomes a note for the viewer rather than an exception.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from capi_lab.checkpoint import read_jsonl
from capi_lab.command_line import read_yaml
from capi_lab.explore import render as rd
from capi_lab.snapshots import read_index

CURVES = {
    "capi_loss": "CAPI loss (student vs teacher clusters)",
    "clustering_loss": "clustering loss",
    "target_entropy": "target entropy (nats)",
    "prototypes_used": "prototypes used",
    "lr": "learning rate",
    "momentum": "teacher momentum",
    "images_per_s": "images / s",
}
"""The loop's metrics in the order they are plotted, with their titles; any other key is plotted after them."""
LIVE_SECONDS = 120
"""A run whose metrics changed this recently is shown as still training."""
MAP_KINDS = {"joint PCA": "pca", "teacher clusters": "clusters", "predictor hits": "predict"}


def list_runs(root: str | Path) -> list[Path]:
    """Run folders under ``root`` (itself included), newest first: folders with a ``metrics.jsonl``, a
    ``snapshots/index.jsonl`` or a ``checkpoints/`` folder, at most two levels down."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in [root, *root.glob("*"), *root.glob("*/*")]:
        if d.is_dir() and any((d / m).exists() for m in ("metrics.jsonl", "snapshots/index.jsonl", "checkpoints")):
            found.append(d)
    return sorted(set(found), key=lambda d: _mtime(d), reverse=True)


def _mtime(d: Path) -> float:
    times = [p.stat().st_mtime for p in (d / "metrics.jsonl", d / "snapshots" / "index.jsonl") if p.exists()]
    return max(times, default=d.stat().st_mtime)


@dataclass
class Run:
    """What a run folder holds right now."""

    path: Path
    metrics: list[dict] = field(default_factory=list)  # the loop's lines (eval lines included)
    snapshots: list[dict] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)  # newest first, last.ckpt first of all
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def num_prototypes(self) -> int | None:
        return (self.config.get("model") or {}).get("num_prototypes")

    @property
    def max_steps(self) -> int | None:
        return self.config.get("max_steps")

    @property
    def last_step(self) -> int:
        return max((r["step"] for r in self.metrics), default=0)


def open_run(path: str | Path) -> Run:
    """Read a run folder as it is now (never raises for what the folder holds)."""
    path = Path(path)
    run = Run(path)
    if not path.is_dir():
        run.notes.append(f"{path} is not a folder; pick a run folder (one written by `python -m capi_lab.train`)")
        return run
    run.metrics = read_jsonl(path / "metrics.jsonl")
    run.snapshots = read_index(path)
    ck = path / "checkpoints"
    if ck.is_dir():
        periodic = sorted(ck.glob("step_*.ckpt"), reverse=True)
        run.checkpoints = [p for p in [ck / "last.ckpt", *periodic] if p.exists()]
    cfg = path / "config.yaml"
    if cfg.exists():
        try:
            run.config = read_yaml(cfg) or {}
        except (Exception, SystemExit) as e:  # noqa: BLE001 - a half-written or hand-edited file is a note
            why = str(e) or type(e).__name__
            run.notes.append(f"config.yaml does not read ({why}); the run's settings are unknown")
    if not run.metrics:
        run.notes.append("no metrics yet (metrics.jsonl is missing or empty): the run has not logged a step")
    if not run.snapshots:
        run.notes.append("no snapshots (train with --snapshot-every N; they are on by default)")
    return run


def health(run: Run) -> list[str]:
    """The run's state and health signals, as short Markdown lines."""
    lines = []
    loop = [r for r in run.metrics if "capi_loss" in r]
    total = f" of {run.max_steps}" if run.max_steps else ""
    if loop:
        last = loop[-1]
        live = time.time() - _mtime(run.path) < LIVE_SECONDS and (run.max_steps is None or last["step"] < run.max_steps)
        lines.append(f"**Step {last['step']}{total}** — {'still training' if live else 'not training now'}")
        losses = ("capi_loss", "clustering_loss")
        bad = [r["step"] for r in loop if not all(math.isfinite(r.get(k, 0.0)) for k in losses)]
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            lines.append(f"🛑 **NaN/inf loss** at step {bad[0]}{more}: the run stops after 3 in a row")
        k = run.num_prototypes
        ent = last.get("target_entropy")
        if ent is not None and k:
            bound = math.log(k)
            flag = "⚠️ near uniform: the targets say little" if ent > 0.8 * bound else "ok"
            lines.append(f"target entropy {ent:.2f} nats (uniform: ln {k} = {bound:.2f}) — {flag}")
        used = last.get("prototypes_used")
        if used is not None and k:
            flag = "⚠️ few prototypes in use: collapse?" if used < 0.25 * k else "ok"
            lines.append(f"prototypes used {used} of {k} — {flag}")
    if run.snapshots:
        s = run.snapshots[-1]
        lines.append(
            f"last snapshot at step {s['step']}: predictor top-1 {s.get('snapshot/pred_top1', float('nan')):.1%}, "
            f"top-5 {s.get('snapshot/pred_top5', float('nan')):.1%} on the probe images"
        )
    return lines + [f"ℹ️ {n}" for n in run.notes]


def curves(run: Run):
    """A plotly figure of every logged metric (one panel each), the snapshot numbers and evaluations included,
    with the health signals drawn: uniform and healthy entropy, the prototype count, NaN steps."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    series: dict[str, tuple[list[int], list[float]]] = {}
    for r in [*run.metrics, *run.snapshots]:
        for key, v in r.items():
            if key in ("step", "seconds", "resolution", "num_prototypes") or isinstance(v, (bool, str, list, dict)):
                continue
            if isinstance(v, (int, float)):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(r["step"])
                ys.append(float(v))
    keys = [k for k in CURVES if k in series] + sorted(k for k in series if k not in CURVES)
    if not keys:
        fig = go.Figure()
        fig.update_layout(title="no metrics yet", height=200)
        return fig
    cols = 3
    rows = -(-len(keys) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[CURVES.get(k, k) for k in keys])
    nan_steps = [r["step"] for r in run.metrics if "capi_loss" in r and not math.isfinite(r["capi_loss"])]
    for i, key in enumerate(keys):
        row, col = i // cols + 1, i % cols + 1
        xs, ys = series[key]
        order = np.argsort(xs, kind="stable")
        xs, ys = [xs[j] for j in order], [ys[j] if math.isfinite(ys[j]) else None for j in order]
        fig.add_scatter(x=xs, y=ys, mode="lines+markers" if len(xs) < 30 else "lines", name=key, row=row, col=col,
                        showlegend=False)  # fmt: skip
        if key == "target_entropy" and run.num_prototypes:
            fig.add_hline(y=math.log(run.num_prototypes), line_dash="dot", line_color="red", row=row, col=col,
                          annotation_text="uniform", annotation_position="bottom right")  # fmt: skip
        if key == "prototypes_used" and run.num_prototypes:
            fig.add_hline(y=run.num_prototypes, line_dash="dot", line_color="green", row=row, col=col,
                          annotation_text="all", annotation_position="bottom right")  # fmt: skip
        if key == "capi_loss" and nan_steps:
            fig.add_scatter(x=nan_steps, y=[0] * len(nan_steps), mode="markers", marker_symbol="x",
                            marker_color="red", marker_size=10, name="NaN", row=row, col=col)  # fmt: skip
    fig.update_layout(height=260 * rows, margin=dict(l=40, r=10, t=40, b=30), title=f"{run.path.name}")
    return fig


def snapshot_views(
    run: Run, index: int, kind: str = "clusters", opacity: float = 0.7, side: int = 384
) -> tuple[list[tuple[Image.Image, str]], str]:
    """The maps of snapshot ``index`` (of :attr:`Run.snapshots`) over each probe photo at ``side`` px, with a
    caption, and a line saying which step it is; a missing file is a note, not an error."""
    if not run.snapshots:
        return [], "no snapshots in this run yet"
    index = min(max(int(index), 0), len(run.snapshots) - 1)
    snap = run.snapshots[index]
    folder = run.path / "snapshots" / snap["folder"]
    out, missing = [], []
    detail = {}
    with contextlib.suppress(OSError, ValueError, AttributeError):  # an unfinished snapshot: no per-image numbers
        detail = json.loads((folder / "snapshot.json").read_text()).get("per_image", {})
    for name in snap.get("images", []):
        try:
            photo = Image.open(run.path / "snapshots" / "images" / f"{name}.png").convert("RGB")
            grid = Image.open(folder / f"{kind}_{name}.png").convert("RGB")
        except OSError:
            missing.append(name)
            continue
        photo = photo.resize((side, side), Image.Resampling.BICUBIC)
        pic = rd.blend(photo, grid.resize((side, side), Image.Resampling.NEAREST), float(opacity))
        d = detail.get(name, {})
        extra = f" · predictor top-1 {d['pred_top1']:.0%}, top-5 {d['pred_top5']:.0%}" if "pred_top1" in d else ""
        out.append((pic, f"{name} · step {snap['step']}{extra}"))
    text = f"snapshot {index + 1} of {len(run.snapshots)}: **step {snap['step']}**"
    if missing:
        text += f" — ⚠️ missing pictures for {', '.join(missing)} (the folder is incomplete)"
    return out, text
