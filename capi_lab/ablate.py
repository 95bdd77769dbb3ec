"""Test the paper's design choices at a scale one can afford: train `tiny` on Fashion-MNIST once per variant with
the library's own training loop, score every teacher with the same frozen-feature k-NN, and print the table with
the paper's number next to ours.

    python -m capi_lab.ablate --list                          # the studies and what each row changes
    python -m capi_lab.ablate masking                          # Table 1(b): random / block / inverse block ± roll
    python -m capi_lab.ablate balancing --steps 1000           # Table 1(i): softmax vs standard vs position-wise
    python -m capi_lab.ablate prototypes --json prototypes.json

Protocol (the same for every row of a study, and the notebooks' experiments): `python -m capi_lab.train --preset
tiny --data fashion-mnist --max-steps STEPS --batch-size BATCH --seed SEED` plus the row's flags; then the
teacher's `global_repr` (and its mean patch token) of ``--limit-train`` seeded train images (the bank) and the test
images, k-NN top-1 with k=20, T=0.07 (benchmarks/fmnist_eval.sh). ``before training`` is the same architecture
at its initialisation (the run's seed), the floor a row must rise above. A finished run folder is reused, so a
study that was stopped goes on from its first unfinished row, and a row with the same settings as a finished row of
another study under the same ``--out`` (each study has the preset itself as a row) is not trained again. The
paper's figures are from ViT-L/16 ablation models (100k iterations at 224 px; ADE20K mIoU / IN1k attentive-probe
top-1): what carries over to a 28-px, five-minute model is the ranking, if anything, not the numbers; two runs of
the same row have differed by half a point here (benchmarks/recipe_study.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parents[1] / "notebooks" / "results"
"""Where the notebooks' committed full-mode results live (``ablate_<study>.json``)."""

HEALTH = ("capi_loss", "clustering_loss", "target_entropy", "prototypes_used")
"""The training curves kept for every row (metrics.jsonl columns)."""


@dataclass(frozen=True)
class Variant:
    name: str
    flags: tuple[str, ...]  # on top of the protocol's command
    paper: str  # the paper's figure for this row, in words


@dataclass(frozen=True)
class Study:
    title: str
    reference: str  # where in the paper
    why: str
    variants: tuple[Variant, ...]


NO_ROLL = ("--mask.roll", "false")
STUDIES: dict[str, Study] = {
    "masking": Study(
        "Masking strategy",
        "Table 1(b), ADE mIoU / IN1k",
        "Which patches the student does not see decides what it must infer: scattered holes are filled from "
        "their neighbours, a large hidden region needs an understanding of the object.",
        (
            Variant("random", ("--mask.strategy", "random", *NO_ROLL), "23.6 / 76.4"),
            Variant("block", ("--mask.strategy", "block", *NO_ROLL), "25.6 / 79.9"),
            Variant("inverse block", ("--mask.strategy", "inverse_block", *NO_ROLL), "27.2 / 80.7"),
            Variant("inverse block + roll", ("--mask.strategy", "inverse_block", "--mask.roll", "true"), "29.1 / 81.4"),
        ),
    ),
    "balancing": Study(
        "Balancing the teacher's assignments",
        "Table 1(i), ADE mIoU / IN1k",
        "Without balancing, the clustering head is free to put every patch in one cluster, where its loss is "
        "lowest and the student's task is trivial: the targets collapse. Sinkhorn-Knopp spreads each batch over "
        "the prototypes; the position-wise form does it per patch position.",
        (
            Variant("softmax (no balancing)", ("--optim.sinkhorn-iters", "0"), "not run (collapses)"),
            Variant("standard Sinkhorn", ("--optim.sinkhorn-positionwise", "false"), "28.5 / 81.3"),
            Variant("position-wise Sinkhorn", ("--optim.sinkhorn-positionwise", "true"), "29.1 / 81.4"),
        ),
    ),
    "prototypes": Study(
        "Number of prototypes",
        "Figure 6, ADE mIoU at ViT-L: 1024 -> 14.9, 4096 -> 27.5, 16384 -> 29.1",
        "The prototypes are the student's vocabulary. Too few and distinct patches share a name; too many for the "
        "batch and each prototype is seen too rarely to be learned (a batch of 64 tiny images has 3136 patches).",
        (
            Variant("16", ("--model.num-prototypes", "16"), "–"),
            Variant("64 (tiny's default)", ("--model.num-prototypes", "64"), "–"),
            Variant("256", ("--model.num-prototypes", "256"), "–"),
        ),
    ),
}


@dataclass
class Protocol:
    steps: int = 600
    batch_size: int = 64
    seed: int = 0
    limit_train: int = 10000  # the k-NN bank
    limit_test: int | None = None  # None: all 10k test images
    extra_flags: tuple[str, ...] = ()  # for every row (e.g. ("--compile",))


@dataclass
class StudyResult:
    study: str
    title: str
    reference: str
    protocol: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    before_training: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        """The markdown table: ours next to the paper's."""
        head = "| variant | k-NN global | k-NN mean patch | target entropy | prototypes used | train s | paper |"
        lines = [f"{self.title} ({self.reference}); tiny on Fashion-MNIST, {self.protocol['steps']} steps x "
                 f"{self.protocol['batch_size']}, seed {self.protocol['seed']}", "", head,
                 "|---" * (head.count("|") - 1) + "|"]  # fmt: skip
        b = self.before_training
        if b:
            lines.append(f"| before training | {b['knn_global']:.1f} | {b['knn_mean_patch']:.1f} | – | – | – | – |")
        for r in self.rows:
            lines.append(
                f"| {r['name']} | {r['knn_global']:.1f} | {r['knn_mean_patch']:.1f} | {r['target_entropy']:.2f} | "
                f"{r['prototypes_used']:.0f} | {r['train_seconds']:.0f} | {r['paper']} |"
            )
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path


def load(path: str | Path) -> StudyResult:
    return StudyResult(**json.loads(Path(path).read_text()))


def cached(study: str) -> StudyResult:
    """The committed full-mode result of ``study`` (what a notebook shows in smoke mode)."""
    return load(RESULTS_DIR / f"ablate_{study}.json")


def train_command(variant: Variant, protocol: Protocol, out_dir: Path) -> list[str]:
    """The row's ``python -m capi_lab.train`` arguments."""
    p = protocol
    return ["--preset", "tiny", "--data", "fashion-mnist", "--output-dir", str(out_dir),
            "--max-steps", str(p.steps), "--batch-size", str(p.batch_size), "--seed", str(p.seed),
            "--log-every", str(max(1, p.steps // 60)), "--checkpoint-every", str(p.steps),
            "--snapshot-every", "0", *p.extra_flags, *variant.flags]  # fmt: skip


def initial_model(checkpoint: Path, seed: int):
    """The run's teacher before its first update: the student's initial backbone (``build_trainer`` seeds, then
    builds the student first; the teacher copies its backbone)."""
    import torch

    from capi_lab.config import CAPIConfig
    from capi_lab.model.capi import CAPIModel
    from capi_lab.pretrained import read_checkpoint

    cfg = CAPIConfig.from_dict(read_checkpoint(checkpoint)["config"])
    torch.manual_seed(seed)
    model = CAPIModel(cfg.model, student_head=True, clustering_head=False)
    model.image_size = cfg.image_size
    return model.eval()


def knn_scores(model, splits, linear: bool = False) -> dict[str, float]:
    """k-NN top-1 (k=20, T=0.07, %) of the global representation and of the mean patch token; with ``linear``
    also the logistic-regression probe of the global representation."""
    from capi_lab.evaluation import knn_accuracy, linear_accuracy
    from capi_lab.features import extract_features

    size = model.image_size
    tr, te = (
        extract_features(model, s, size, 256, pool_patches=True, progress=False) for s in (splits.train, splits.test)
    )
    y_tr, y_te = splits.train_labels, splits.test_labels
    out = {
        "knn_global": knn_accuracy(tr.global_repr, y_tr, te.global_repr, y_te, 20, 0.07),
        "knn_mean_patch": knn_accuracy(tr.mean_patch, y_tr, te.mean_patch, y_te, 20, 0.07),
    }
    if linear:
        out["linear_global"] = linear_accuracy(tr.global_repr, y_tr, te.global_repr, y_te)
    return {k: round(100 * v, 2) for k, v in out.items()}


def read_curves(run_dir: Path) -> dict[str, list]:
    """``step`` and the :data:`HEALTH` columns of a run's metrics.jsonl (a cut-off last line is skipped)."""
    from capi_lab.checkpoint import read_jsonl

    logged = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "capi_loss" in r]
    return {k: [r[k] for r in logged] for k in ("step", *HEALTH, "images_per_s")}


def loop_seconds(curves: dict[str, list], batch_size: int) -> float:
    """The training loop's time from the logged images/s (start-up, evaluation and checkpoints excluded)."""
    seconds, prev = 0.0, 0
    for step, rate in zip(curves["step"], curves["images_per_s"], strict=True):
        seconds += (step - prev) * batch_size / rate
        prev = step
    return round(seconds, 1)


def run_variant(variant: Variant, protocol: Protocol, out_dir: Path) -> dict[str, Any]:
    """Train one row (or reuse its finished run folder) and return its training curves and time; the trainer's
    printed output goes to ``out_dir/train.log`` (its progress bar stays on stderr)."""
    from capi_lab import train

    log = out_dir / "train.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("a") as f, contextlib.redirect_stdout(f):
        code = train.main(train_command(variant, protocol, out_dir))
    if code != 0:
        raise RuntimeError(f"{variant.name}: training stopped with exit code {code} (see {log})")
    curves = read_curves(out_dir)
    seconds = round(time.perf_counter() - t0, 1)
    return {"train_seconds": seconds, "loop_seconds": loop_seconds(curves, protocol.batch_size), "curves": curves}


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    """A run's settings as config.yaml holds them, less where it was written."""
    import yaml

    return {k: v for k, v in yaml.safe_load(yaml.safe_dump(config)).items() if k != "output_dir"}


def finished_twin(variant: Variant, protocol: Protocol, run_dir: Path, out: Path) -> Path | None:
    """A finished run folder under ``out/*/`` (any study) trained with exactly this row's settings, or None.

    The studies share rows (each has the preset's own settings as one of them: ``inverse block + roll``,
    ``position-wise Sinkhorn``, ``64 (tiny's default)``), so a row already trained for one study is reused by the
    next rather than trained again; settings are compared as resolved, not as flags."""
    from capi_lab.command_line import read_yaml
    from capi_lab.train import resolve_config

    if (run_dir / "config.yaml").exists():
        return None  # this row's own folder: resumed (or reused) as it is
    wanted = _settings(resolve_config(train_command(variant, protocol, run_dir)).to_dict())
    for cfg in sorted(out.glob("*/*/config.yaml")):
        other = cfg.parent
        if other == run_dir or not (other / "checkpoints" / "last.ckpt").exists():
            continue
        logged = read_curves(other)["step"]
        if not logged or logged[-1] != protocol.steps:
            continue
        try:
            settings = _settings(read_yaml(cfg))
        except SystemExit:  # a damaged config.yaml of another folder: not a twin, not an error
            continue
        if settings == wanted:
            return other
    return None


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def run(
    study: str, protocol: Protocol | None = None, out: str | Path = "runs/ablate", only: list[str] | None = None
) -> StudyResult:
    """Run ``study`` (a key of :data:`STUDIES`) under ``protocol``: one training run per variant under
    ``out/STUDY/``, each scored by k-NN, plus the untrained model once."""
    from capi_lab import load_pretrained
    from capi_lab.evaluation.datasets import load_labeled

    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; known: {', '.join(STUDIES)}")
    s, p = STUDIES[study], protocol or Protocol()
    variants = [v for v in s.variants if only is None or v.name in only]
    if only is not None and len(variants) != len(only):
        raise ValueError(f"unknown variant in {only}; {study} has: {', '.join(v.name for v in s.variants)}")
    splits = load_labeled("fashion-mnist", seed=0, limit_train=p.limit_train, limit_test=p.limit_test)
    root = Path(out) / study
    result = StudyResult(study, s.title, s.reference, asdict(p))
    for v in variants:
        run_dir = root / f"{slug(v.name)}_{p.steps}x{p.batch_size}_seed{p.seed}"
        twin = finished_twin(v, p, run_dir, Path(out))
        if twin is not None:
            print(f"{v.name}: same settings as the finished run {twin}; reusing it", flush=True)
            run_dir = twin
        row: dict[str, Any] = {"name": v.name, "flags": " ".join(v.flags), "paper": v.paper}
        row.update(run_variant(v, p, run_dir))
        row.update(knn_scores(load_pretrained(run_dir / "checkpoints" / "last.ckpt"), splits))
        row.update({k: row["curves"][k][-1] for k in HEALTH})
        if not result.before_training:
            result.before_training = knn_scores(initial_model(run_dir / "checkpoints" / "last.ckpt", p.seed), splits)
        print(f"{v.name}: k-NN {row['knn_global']:.1f} (mean patch {row['knn_mean_patch']:.1f}), target entropy "
              f"{row['target_entropy']:.2f}, {row['prototypes_used']:.0f} prototypes used", flush=True)  # fmt: skip
        result.rows.append(row)
    return result


def figure(result: StudyResult):
    """Plotly bars: each row's k-NN (global representation and mean patch token), the untrained model as a line,
    the paper's figure under each bar."""
    import plotly.graph_objects as go

    names = [f"{r['name']}<br><sub>paper: {r['paper']}</sub>" for r in result.rows]
    fig = go.Figure()
    for key, label in (("knn_global", "k-NN, global representation"), ("knn_mean_patch", "k-NN, mean patch token")):
        values = [r[key] for r in result.rows]
        fig.add_bar(x=names, y=values, name=label, text=[f"{v:.1f}" for v in values], textposition="outside")
    if result.before_training:
        fig.add_hline(y=result.before_training["knn_global"], line_dash="dot",
                      annotation_text="before training (global)", annotation_position="bottom right")  # fmt: skip
    lo = min([r["knn_mean_patch"] for r in result.rows] + [r["knn_global"] for r in result.rows]
             + [result.before_training.get("knn_global", 100)])  # fmt: skip
    p = result.protocol
    fig.update_layout(
        title=f"{result.title}: tiny, Fashion-MNIST, {p['steps']} x {p['batch_size']} (paper: {result.reference})",
        yaxis=dict(title="k-NN top-1 (%)", range=[max(0, lo - 5), 100 if lo > 80 else lo + 20]),
        barmode="group", height=380, legend=dict(orientation="h", y=-0.3),
    )  # fmt: skip
    return fig


def curves_figure(result: StudyResult, keys: tuple[str, ...] = ("target_entropy", "prototypes_used")):
    """Plotly: the training curves of every row side by side (by default the two collapse signals)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=[k.replace("_", " ") for k in keys])
    for i, r in enumerate(result.rows):
        for j, k in enumerate(keys):
            color = _COLORS[i % len(_COLORS)]
            fig.add_scatter(x=r["curves"]["step"], y=r["curves"][k], name=r["name"], legendgroup=r["name"],
                            showlegend=j == 0, line=dict(color=color), row=1, col=j + 1)  # fmt: skip
            fig.update_xaxes(title_text="step", row=1, col=j + 1)
    fig.update_layout(height=340, title=f"{result.title}: training curves", legend=dict(orientation="h", y=-0.3))
    return fig


_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m capi_lab.ablate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("study", nargs="?", choices=sorted(STUDIES), help="which study to run")
    ap.add_argument("--list", action="store_true", help="list the studies and their rows, and stop")
    ap.add_argument("--only", nargs="+", metavar="VARIANT", help="just these rows (their names as --list shows)")
    ap.add_argument("--steps", type=int, default=600, help="training steps per row (default 600)")
    ap.add_argument("--batch-size", type=int, default=64, help="default 64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-train", type=int, default=10000, help="k-NN bank size (default 10000)")
    ap.add_argument("--limit-test", type=int, default=None, help="test images (default: all 10000)")
    ap.add_argument("--compile", action="store_true", help="train with --compile")
    ap.add_argument("--out", default="runs/ablate", help="where the run folders go (default runs/ablate)")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    if args.list or args.study is None:
        for name, s in STUDIES.items():
            print(f"{name}: {s.title} ({s.reference})\n    {s.why}")
            for v in s.variants:
                print(f"    {v.name:26s} {' '.join(v.flags) or '(the preset)':60s} paper: {v.paper}")
        return 0
    for flag in ("steps", "batch_size", "limit_train"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    protocol = Protocol(args.steps, args.batch_size, args.seed, args.limit_train, args.limit_test,
                        ("--compile",) if args.compile else ())  # fmt: skip
    try:
        result = run(args.study, protocol, args.out, args.only)
    except ValueError as e:
        ap.error(str(e))
    print()
    print(result.table())
    if args.json:
        print(f"\nwrote {result.save(args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
