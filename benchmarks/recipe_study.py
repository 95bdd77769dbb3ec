"""The small-scale recipe study (benchmarks/recipe_study.md): train `tiny` on Fashion-MNIST with the library's
own CLI, one knob changed at a time from a fixed base, and score every run with the same frozen-feature k-NN.

    python benchmarks/recipe_study.py                      # every study in STUDIES not yet in the results file
    python benchmarks/recipe_study.py --only base k256     # just these
    python benchmarks/recipe_study.py --table --plot       # the markdown table and the figure from the results

Protocol (fixed for every row): `python -m capi_lab.train --preset tiny --data fashion-mnist --max-steps STEPS
--batch-size BATCH --seed SEED` plus the base's (--base, BASES) and the row's flags, on the CPU; then the
teacher's `global_repr` (and the mean patch token) of 10k seeded train images (the bank) and all 10k test images,
k-NN top-1 with k=20, T=0.07 (the protocol of benchmarks/fmnist_eval.sh). `init` is the same run's model before
its first update (the `1-step checkpoint`: the learning rate is 0 at step 0 and the teacher momentum 1). One JSON
line per run is appended to --results; a row already there is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASES: dict[str, list[str]] = {
    "old": ["--model.num-prototypes", "1024", "--optim.momentum-peak", "0.99"],
    "tiny": [],
}
"""Where a row starts (``--base``). ``old`` is `tiny` as it was before this study (1024 prototypes, teacher momentum
peak 0.99), so the first rows stay reproducible whatever the preset becomes; ``tiny`` is the preset as it is now
(the ``old`` base's `k64+m0.95` row). A row's flags come after the base's and override them."""

RECIPE_20MIN = ["--optim.momentum-peak", "0.99", "--mask.prediction-subsampling", "1.0"]
"""The best 20-minute recipe found (on the ``tiny`` base, 7600 x 64; README and fmnist_eval.sh give it), and the
start of the rows that vary it."""
RECIPE_20MIN_WHAT = "momentum peak 0.99, every masked patch predicted"


def around_recipe(what: str, *flags: str) -> tuple[list[str], str]:
    """A row that adds ``flags`` to the 20-minute recipe (``what`` says what they change)."""
    return [*RECIPE_20MIN, *flags], f"{RECIPE_20MIN_WHAT}, {what}"


# name -> (flags on top of the base, what the row tests)
STUDIES: dict[str, tuple[list[str], str]] = {
    "base": ([], "tiny before the study (the CLI defaults then)"),
    "k64": (["--model.num-prototypes", "64"], "prototypes 64"),
    "k256": (["--model.num-prototypes", "256"], "prototypes 256"),
    "m0.95": (["--optim.momentum-peak", "0.95"], "teacher momentum peak 0.95"),
    "lr5e-3": (["--optim.lr", "5e-3"], "lr 5e-3"),
    "lr1e-3": (["--optim.lr", "1e-3"], "lr 1e-3"),
    "pred1.0": (["--mask.prediction-subsampling", "1.0"], "predict every masked patch"),
    "cl2.0": (["--optim.clustering-lr-ratio", "2.0"], "clustering lr 2x the backbone's"),
    "ratio0.5": (["--mask.ratio", "0.5"], "mask ratio 0.5"),
    "random": (["--mask.strategy", "random", "--mask.roll", "false"], "random masking"),
    "crop0.3": (["--crop-scale", "0.3", "1.0"], "crop scale 0.3-1"),
    "pdepth1": (["--model.pred-depth", "1"], "predictor depth 1"),
    "patch7": (["--model.patch-size", "7"], "patch 7 (4x4 grid)"),
    "m0.9": (["--optim.momentum-peak", "0.9"], "teacher momentum peak 0.9"),
    "m0.98": (["--optim.momentum-peak", "0.98"], "teacher momentum peak 0.98"),
    "m0.99": (["--optim.momentum-peak", "0.99"], "teacher momentum peak 0.99"),
    "m0.995": (["--optim.momentum-peak", "0.995"], "teacher momentum peak 0.995"),
    "m0.99+pred1.0": (RECIPE_20MIN, RECIPE_20MIN_WHAT),
    "m0.99+pred1.0+random": around_recipe("random masking", "--mask.strategy", "random", "--mask.roll", "false"),
    "m0.99+pred1.0+lr1e-3": around_recipe("lr 1e-3", "--optim.lr", "1e-3"),
    "m0.99+pred1.0+lr3e-3": around_recipe("lr 3e-3", "--optim.lr", "3e-3"),
    "m0.99+pred1.0+crop0.3": around_recipe("crop scale 0.3-1", "--crop-scale", "0.3", "1.0"),
    "m0.99+pred1.0+pdepth3": around_recipe("predictor depth 3", "--model.pred-depth", "3"),
    "m0.99+pred1.0+k128": around_recipe("128 prototypes", "--model.num-prototypes", "128"),
    "m0.99+pred1.0+ratio0.75": around_recipe("mask ratio 0.75", "--mask.ratio", "0.75"),
    "m0.99+pred1.0+cl2.0": around_recipe("clustering lr 2x the backbone's", "--optim.clustering-lr-ratio", "2.0"),
    "m0.99+pred1.0+block": around_recipe("block masking", "--mask.strategy", "block"),
    "m0.99+pred1.0+pe1.0": around_recipe(
        "patch embedding at the backbone's lr (the paper: 0.2x)", "--optim.patch-embed-lr-mult", "1.0"
    ),
    "m0.99+pred1.0+wd0.1": around_recipe("weight decay 0.1 (the paper's; tiny: 0.05)", "--optim.weight-decay", "0.1"),
    "m0.99+pred1.0+patch7": around_recipe("patch 7 (4x4 grid)", "--model.patch-size", "7"),
    "m0.99+pred1.0+ratio0.55": around_recipe("mask ratio 0.55", "--mask.ratio", "0.55"),
    "m0.99+cos1.0": (
        ["--optim.momentum-peak", "0.99", "--optim.truncate", "1.0"],
        "momentum peak 0.99, the whole cosine (lr to 0, teacher momentum to 1 at the end; the paper cuts it at 0.8)",
    ),
    "lr4e-3": (["--optim.lr", "4e-3"], "lr 4e-3"),
    "k128": (["--model.num-prototypes", "128"], "prototypes 128"),
    "ratio0.8": (["--mask.ratio", "0.8"], "mask ratio 0.8"),
    "block": (["--mask.strategy", "block"], "block masking"),
    "wide": (["--model.embed-dim", "192", "--model.num-heads", "6"], "width 192 (6 heads)"),
    "deep": (["--model.depth", "6"], "depth 6"),
    "best4": (
        [
            "--mask.prediction-subsampling",
            "1.0",
            "--crop-scale",
            "0.3",
            "1.0",
            "--mask.strategy",
            "random",
            "--mask.roll",
            "false",
            "--optim.momentum-peak",
            "0.9",
        ],
        "the four best 600-step knobs together (pred 1.0, crop 0.3-1, random masking, momentum 0.9)",
    ),
    "k64+m0.95": (
        ["--model.num-prototypes", "64", "--optim.momentum-peak", "0.95"],
        "prototypes 64, momentum 0.95 (tiny now)",
    ),
    "k256+m0.95": (
        ["--model.num-prototypes", "256", "--optim.momentum-peak", "0.95"],
        "prototypes 256, momentum 0.95 (one prototype per image at batch 256)",
    ),
}


def train(name: str, flags: list[str], args: argparse.Namespace) -> tuple[Path, float]:
    prefix = "" if args.base == "old" else f"{args.base}-"
    out = Path(args.runs) / f"{prefix}{name}_{args.steps}x{args.batch_size}_seed{args.seed}"  # one per protocol
    cmd = [sys.executable, "-m", "capi_lab.train", "--preset", "tiny", "--data", "fashion-mnist",
           "--output-dir", str(out), "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--seed", str(args.seed), "--log-every", "50", "--checkpoint-every", str(args.steps),
           *BASES[args.base], *flags, *(["--compile"] if args.compile else [])]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out, time.perf_counter() - t0


def final_metrics(run_dir: Path, batch_size: int) -> dict[str, float]:
    """The last logged training metrics, and the loop's time from the logged images/s (startup excluded)."""
    from capi_lab.ablate import loop_seconds, read_curves

    curves = read_curves(run_dir)
    out = {k: round(curves[k][-1], 3) for k in ("capi_loss", "clustering_loss", "target_entropy", "prototypes_used")}
    return {**out, "loop_seconds": loop_seconds(curves, batch_size)}


def run_study(args: argparse.Namespace) -> None:
    import torch

    from capi_lab import load_pretrained
    from capi_lab.ablate import initial_model, knn_scores
    from capi_lab.evaluation.datasets import load_labeled

    torch.set_num_threads(os.cpu_count() or 1)
    results = Path(args.results)
    done = set()
    if results.exists():
        done = {key(r) for r in map(json.loads, results.open())}
    splits = load_labeled("fashion-mnist", seed=0, limit_train=10000)
    for name in args.only or list(STUDIES):
        if name not in STUDIES:
            raise SystemExit(f"error: unknown study {name!r}; known: {', '.join(STUDIES)}")
        if key({"name": name, "base_flags": " ".join(BASES[args.base]), **vars(args)}) in done:
            print(f"{name}: already in {results}, skipped")
            continue
        flags, what = STUDIES[name]
        if name == "base" and args.base != "old":
            what = f"`{args.base}` as it is now (the base itself)"
        run_dir, seconds = train(name, flags, args)
        row = {"name": name, "what": what, "base": args.base, "base_flags": " ".join(BASES[args.base]),
               "flags": " ".join(flags), "steps": args.steps,
               "batch_size": args.batch_size, "seed": args.seed, "compile": args.compile,
               "command_seconds": round(seconds, 1)}  # fmt: skip
        last = run_dir / "checkpoints" / "last.ckpt"
        row.update(knn_scores(load_pretrained(last), splits, args.linear))
        row.update({f"init_{k}": v for k, v in knn_scores(initial_model(last, args.seed), splits).items()})
        row.update(final_metrics(run_dir, args.batch_size))
        row["gain_knn_global"] = round(row["knn_global"] - row["init_knn_global"], 2)
        print(json.dumps(row), flush=True)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")


def key(row: dict) -> tuple:
    """What makes two rows the same run: the row, its base, steps, batch and seed."""
    return row["name"], row["base_flags"], row["steps"], row["batch_size"], row["seed"]


def label(row: dict, seed: bool = True) -> str:
    """The row's name, prefixed by its base when that is not the first rows' ``old`` base, and its seed when not 0
    (unless ``seed=False``: the recipe's name, the same for all its seeds)."""
    base = row.get("base", "old")
    name = row["name"] if base == "old" else f"{base}+{row['name']}"
    return name if row["seed"] == 0 or not seed else f"{name} (seed {row['seed']})"


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(path: Path) -> str:
    head = (
        "| row | what | steps × batch | loop s | k-NN global | k-NN mean patch | linear global | init k-NN | gain "
        "| entropy | used |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows(path):
        lines.append(
            f"| `{label(r)}` | {r['what']} | {r['steps']} × {r['batch_size']} | {r['loop_seconds']:.0f} | "
            f"{r['knn_global']:.1f} | {r['knn_mean_patch']:.1f} | "
            f"{format(r['linear_global'], '.1f') if 'linear_global' in r else '–'} | {r['init_knn_global']:.1f} | "
            f"{r['gain_knn_global']:+.1f} | {r['target_entropy']:.2f} | {r['prototypes_used']} |"
        )
    return "\n".join(lines)


def momentum(row: dict) -> str:
    """The run's teacher momentum peak, as the training CLI resolves the run's flags (``tiny``, then its base's
    flags, then its row's)."""
    from capi_lab.train import resolve_config

    argv = ["--preset", "tiny", *row["base_flags"].split(), *row["flags"].split()]
    return str(resolve_config(argv).capi.optim.momentum_peak)


SHORT = 600 * 64
"""Images of the CLI's default run; the plot's first panel has the runs of at most this many images."""


def seed_groups(data: list[dict]) -> dict[tuple, list[dict]]:
    """The rows grouped by recipe and length (row, base, steps, batch): one list of seeds each, in file order."""
    groups: dict[tuple, list[dict]] = {}
    for r in data:
        groups.setdefault(key(r)[:-1], []).append(r)  # the run's key less its seed
    return groups


def seed_table(path: Path) -> str:
    """The runs longer than the CLI's default, one line per recipe and length: each seed, and the medians."""
    lines = [
        "| row | steps × batch | momentum | seeds | k-NN global, each seed | median | linear, each seed | median |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (_, _, steps, batch), ms in seed_groups(
        [r for r in rows(path) if r["steps"] * r["batch_size"] > SHORT]
    ).items():
        ms = sorted(ms, key=lambda r: r["seed"])  # each seed in seed order, whatever order they ran in
        knn = [r["knn_global"] for r in ms]
        lin = [r["linear_global"] for r in ms if "linear_global" in r]
        lines.append(
            f"| `{label(ms[0], seed=False)}` | {steps} × {batch} | {momentum(ms[0])} | {len(ms)} | "
            f"{' / '.join(f'{v:.1f}' for v in knn)} | {statistics.median(knn):.1f} | "
            f"{' / '.join(f'{v:.1f}' for v in lin) or '–'} | {format(statistics.median(lin), '.1f') if lin else '–'} |"
        )
    return "\n".join(lines)


def plot(path: Path, out: Path) -> None:
    """Two panels: the 600 x 64 rows (one knob at a time, one bar pair each) and the longer runs (one bar per
    recipe and length at the median over its seeds, each seed a dot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = rows(path)
    short = [r for r in data if r["steps"] * r["batch_size"] <= SHORT]
    groups = seed_groups([r for r in data if r["steps"] * r["batch_size"] > SHORT])
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(8, 0.42 * len(short) + 1, 0.7 * len(groups) + 1), 8.5))
    x = range(len(short))
    ax.bar([i - 0.2 for i in x], [r["knn_global"] for r in short], 0.4, label="trained, global_repr")
    ax.bar([i + 0.2 for i in x], [r["knn_mean_patch"] for r in short], 0.4, label="trained, mean patch")
    ax.scatter(list(x), [r["init_knn_global"] for r in short], color="k", marker="_", s=200, zorder=3,
               label="same model at init")  # fmt: skip
    ax.set_xticks(list(x), [label(r) for r in short], fontsize=7, rotation=45, ha="right")
    ax.set_ylim(58, 75)
    ax.set_title("600 steps x 64 (the CLI's defaults): one knob at a time", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_ylabel("Fashion-MNIST k-NN top-1 (%)")
    for i, ((_, _, steps, batch), members) in enumerate(groups.items()):
        scores = [r["knn_global"] for r in members]
        median = statistics.median(scores)
        ax2.bar(i, median, 0.6, color="C2" if steps * batch == 1900 * 256 else "C0", alpha=0.8)
        ax2.scatter([i] * len(scores), scores, color="k", s=12, zorder=3)
        ax2.text(i, 70.3, f"{median:.1f}", ha="center", fontsize=7, color="white")  # clear of the dots
    ax2.axhline(81.7, color="grey", ls="--", lw=1, label="raw pixels = the 20-minute target (81.7)")

    def wrap(name: str) -> str:  # a long recipe name on one line runs into its neighbours
        return name.replace("+", "+\n") if len(name) > 8 else name

    names = [f"{wrap(label(ms[0], seed=False))}\n{k[2]}x{k[3]}\nm {momentum(ms[0])}" for k, ms in groups.items()]
    ax2.set_xticks(range(len(groups)), names, fontsize=7)
    ax2.set_ylim(70, 85)
    ax2.set_title("longer runs (bar: median over seeds, dot: one seed; m: teacher momentum peak); "
                  "green: the 20-minute protocol's 486k images", fontsize=9)  # fmt: skip
    ax2.set_ylabel("Fashion-MNIST k-NN top-1 (%)")
    ax2.legend(fontsize=7, loc="upper left")
    fig.suptitle("tiny on Fashion-MNIST, frozen teacher, k-NN (k=20, 10k bank, 10k test)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="run only these rows of STUDIES")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", choices=sorted(BASES), default="old", help="where the rows start (see BASES)")
    ap.add_argument("--linear", action="store_true", help="also the logistic-regression probe (slower)")
    ap.add_argument("--compile", action="store_true", help="train with --compile (the 20-CPU-minute protocol)")
    ap.add_argument("--runs", default="runs/recipe_study", help="where the run folders go")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "recipe_study.jsonl"))
    ap.add_argument(
        "--table",
        action="store_true",
        help="print the markdown tables of the results (every row; the longer runs by seed) and stop",
    )
    ap.add_argument("--plot", default=None, help="draw the results into this PNG and stop")
    args = ap.parse_args()
    if args.table or args.plot:
        if args.table:
            print(table(Path(args.results)))
            print()
            print(seed_table(Path(args.results)))
        if args.plot:
            plot(Path(args.results), Path(args.plot))
        return 0
    run_study(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
