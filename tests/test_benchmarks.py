"""The benchmarks as they run on a CPU: the GPU-gap analysis of a profiler trace, the RoPE kernel's
interpreter run, the training-step throughput."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.trace_gaps import gpu_gaps, load_events


def _run_on_cpu(script, *args):
    """``python SCRIPT ARGS`` from the repository root as a newcomer runs it, with no GPU visible."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU run, on a GPU machine too
    root = Path(__file__).parents[1]
    cmd = [sys.executable, script, *args]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300, env=env)


def _x(cat, name, ts, dur, tid=1, corr=None):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 0,
            "args": {} if corr is None else {"correlation": corr}}  # fmt: skip


def _trace():
    return [
        # host: a step annotation holding two operators; launches inside them
        _x("user_annotation", "step", 0, 200),
        _x("cpu_op", "aten::mm", 25, 10),
        _x("cpu_op", "aten::add", 12, 5),
        _x("cuda_runtime", "cudaLaunchKernel", 1, 1, corr=1),
        _x("cuda_runtime", "cudaLaunchKernel", 2, 1, corr=2),
        _x("cuda_runtime", "cudaLaunchKernel", 30, 1, corr=3),  # in aten::mm, after the GPU went idle at 20
        _x("cuda_runtime", "cudaLaunchKernel", 31, 1, corr=4),
        _x("cuda_driver", "cuLaunchKernel", 15, 1, corr=5),  # a Triton launch in aten::add, long before it ran
        _x("cpu_op", "aten::item", 80, 12),
        _x("cuda_runtime", "cudaStreamSynchronize", 81, 10),  # the host waits inside aten::item
        _x("kernel", "A", 0, 10, tid=7, corr=1),
        _x("kernel", "B", 10, 10, tid=7, corr=2),
        _x("kernel", "C", 50, 10, tid=7, corr=3),
        _x("kernel", "D", 55, 15, tid=8, corr=4),  # another stream, overlapping C
        _x("kernel", "E", 100, 10, tid=7, corr=5),
        {"ph": "i", "name": "marker", "ts": 3},  # not a complete event: ignored
    ]


def test_gaps_busy_idle_and_the_launching_operator(tmp_path):
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": _trace()}, f)
    r = gpu_gaps(load_events(path), min_gap_us=5)
    assert r["span_ms"] == pytest.approx(0.110)
    assert r["gpu_busy_ms"] == pytest.approx(0.050)  # 0-20, 50-70 (two streams merged), 100-110
    assert r["gpu_idle_ms"] == pytest.approx(0.060)
    assert r["kernels"] == 5 and r["gaps"] == 2
    first, second = sorted(r["longest"], key=lambda g: g["at_us"])
    assert (first["before"], first["after"], first["launched_by"], first["host_bound"]) == ("B", "C", "aten::mm", True)
    assert (second["before"], second["after"], second["launched_by"]) == ("D", "E", "aten::add")
    assert second["host_bound"] is False and second["gap_us"] == 30
    assert r["host_bound_ms"] == pytest.approx(0.030)
    assert r["idle_by_launching_op_ms"] == {"aten::mm": 0.03, "aten::add": 0.03}
    assert r["host_waits"] == {"cudaStreamSynchronize in aten::item": 1}


def test_short_gaps_are_idle_but_not_listed_and_cpu_traces_are_refused(tmp_path):
    r = gpu_gaps([e for e in _trace() if e.get("ph") == "X"], min_gap_us=31)
    assert r["gaps"] == 0 and r["gpu_idle_ms"] == pytest.approx(0.060)
    with pytest.raises(ValueError, match="no GPU kernels"):
        gpu_gaps([e for e in _trace() if e.get("cat") != "kernel"])


def test_rope_kernel_benchmark_runs_and_agrees():
    """benchmarks/rope_kernel.py as a newcomer runs it on a machine without a GPU: through Triton's
    interpreter on small shapes, one JSON line per shape, the kernel agreeing with the PyTorch form."""
    out = _run_on_cpu("benchmarks/rope_kernel.py")
    assert out.returncode == 0, out.stderr[-2000:]
    *rows, best = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["shape"] for r in rows] == ["teacher", "student"]
    assert best["best_rope_blocks"] == rows[0]["blocks"]  # no sweep: the default tiles
    for r in rows:
        assert r["max_abs_diff"] < 1e-5 and r["fused_ms"] > 0
    assert rows[1]["grad_max_abs_diff"] < 1e-5


def test_train_throughput_prints_one_json_line_with_every_round():
    out = _run_on_cpu("benchmarks/train_throughput.py", "--preset", "tiny", "--batch-size", "8", "--device", "cpu",
                      "--steps", "3", "--warmup", "1", "--rounds", "2")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    (line,) = out.stdout.splitlines()
    r = json.loads(line)
    assert (r["preset"], r["batch_size"], r["image_size"]) == ("tiny", 8, 28) and r["device"].startswith("cpu")
    assert len(r["images_per_s_rounds"]) == 2 and all(x > 0 for x in r["images_per_s_rounds"])
    assert r["step_ms_p10"] <= r["step_ms_median"] <= r["step_ms_p90"]
    assert r["images_per_s"] == pytest.approx(8 / r["step_ms_median"] * 1e3, rel=1e-2)
    assert r["tflop_per_step"] > 0 and r["loss_finite"] and r["cuda_graphs"] is False
    bad = _run_on_cpu("benchmarks/train_throughput.py", "--preset", "tiny", "--device", "cpu", "--steps", "1")
    assert bad.returncode != 0 and "--steps must be at least 2" in bad.stderr


def test_gpu_run_script_parses_and_every_documented_step_exists():
    """benchmarks/gpu_run.sh runs on a GPU machine with minutes to spare: a typo in a step name or a syntax error
    would cost a device run, so its header, its default list and its cases must agree, and bash must parse it."""
    import re

    path = Path(__file__).parents[1] / "benchmarks" / "gpu_run.sh"
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    text = path.read_text()
    documented = re.findall(r"^#   (\w+) ", text, flags=re.M)
    cases = set(re.findall(r"^  (\w+)\)", text, flags=re.M))
    (default,) = re.findall(r'"\$\{@:-([\w ]+)\}"', text)
    assert len(documented) >= 10 and set(documented) == cases
    assert set(default.split()) <= cases


@pytest.mark.slow
def test_gpu_run_script_dry_run_on_the_cpu(tmp_path):
    """GPU_RUN_DRY=1 runs the script's plumbing on the CPU with the tiny model: the Sinkhorn and RoPE tile
    sweeps hand their best tiles to the later steps, every benchmark step appends its JSON line, none fails;
    a wrong step name stops the script with status 2."""
    root = Path(__file__).parents[1]
    # its own Inductor cache: a compile running elsewhere on the machine cannot hand it a half-written library
    env = {**os.environ, "GPU_RUN_DRY": "1", "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": "",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    # one compiled step (b16: after the sweeps, so it gets both tile files, and it writes a trace); b16rope and
    # b16cg would compile the same tiny step again on a CPU
    run = subprocess.run(["bash", "benchmarks/gpu_run.sh", "sweep", "rope", "b16", "loop", "snap"], cwd=root,
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0 and "FAILED" not in run.stdout and "skipped" not in run.stdout, run.stdout[-3000:]
    *lines, loop, snap = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert [(r["preset"], r["compile"], len(r["images_per_s_rounds"])) for r in lines] == [("tiny", True, 2)]
    assert loop["preset"] == "tiny" and loop["loader_images_per_s"] > 0 and loop["loop_images_per_s"] > 0
    assert snap["max_steps"] == 100000 and snap["interval"] == 5000 and snap["snapshot_s_median"] > 0
    sweep = [json.loads(line) for line in (tmp_path / "kernels.jsonl").read_text().splitlines()]
    assert "best_rope_blocks" in sweep[-1] and (tmp_path / "trace_b16.json.gz").stat().st_size > 0
    assert set(json.loads((tmp_path / "blocks.json").read_text())) == {"col", "row"}
    wrong = subprocess.run(["bash", "benchmarks/gpu_run.sh", "b16x"], cwd=root, env=env, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert wrong.returncode == 2 and "unknown step: b16x" in wrong.stdout


def test_eval_scale_benchmark_prints_its_extrapolations():
    r = _run_on_cpu("benchmarks/eval_scale.py", "--bank", "2000", "--queries", "100", "--repeats", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    first = json.loads(lines[0])
    assert first["what"] == "knn classification" and first["seconds"] > 0
    tail = json.loads("\n".join(lines[3:]))
    # the sizes follow from the datasets, not from this machine
    assert tail["in1k_knn"]["memory_gb"]["bank_fp32"] == 5.2
    assert tail["ade20k_seg_knn"]["memory_gb"]["train_val_features_fp32"] == 21.2


def test_loop_throughput_reads_the_same_images_as_shards_and_as_a_folder(tmp_path):
    common = ["benchmarks/loop_throughput.py", "--preset", "tiny", "--image-size", "32", "--batch-size", "8",
              "--images", "48", "--image-px", "64", "--max-steps", "4", "--repeats", "2", "--accelerator", "cpu",
              "--num-workers", "0", "--workdir", str(tmp_path), "--loader-only"]  # fmt: skip
    rows = []
    for extra in ([], ["--shards", "--shard-size", "40KB"]):
        res = _run_on_cpu(*common, *extra)
        assert res.returncode == 0, res.stderr[-2000:]
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    assert [r["format"] for r in rows] == ["folder", "shards"]
    assert all(r["loader_images_per_s"] > 0 and len(r["loader_images_per_s_runs"]) == 2 for r in rows)
    manifest = json.loads((tmp_path / "shards_jpegs" / "shards.json").read_text())
    assert manifest["images"] == 48 and len(manifest["shardlist"]) > 1  # the same 48 JPEGs, in several shards


def test_snapshot_cost_prints_the_share_of_the_run():
    r = _run_on_cpu("benchmarks/snapshot_cost.py", "--steps", "3", "--snapshots", "2", "--max-steps", "40")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["interval"] == 50 and row["snapshots"] == 2  # the default for 40 steps: step 0 and the end
    assert row["step_s_median"] > 0 and row["snapshot_s_median"] > 0 and row["probe_images"] == 7
    assert row["overview_s"] >= 0  # the last snapshot's overview.png, counted once
    share = (row["snapshots"] * row["snapshot_s_median"] + row["overview_s"]) / (40 * row["step_s_median"])
    assert abs(row["snapshot_share_of_run"] - share) < 1e-3


def test_seg_knn_trend_reads_a_runs_checkpoints_in_step_order(tmp_path):
    from benchmarks.seg_knn_default import run_checkpoints

    (tmp_path / "checkpoints").mkdir()
    for step in (1000, 250, 5000):
        (tmp_path / "checkpoints" / f"step_{step:07d}.ckpt").write_bytes(b"")
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert [s for s, _ in run_checkpoints(tmp_path)] == [250, 1000, 5000]
    with pytest.raises(SystemExit, match="no checkpoints/step_"):
        run_checkpoints(tmp_path / "elsewhere")


def _study_row(name, steps, batch, seed, knn, base_flags="", flags="", linear=None):
    row = {"name": name, "what": name, "base": "tiny", "base_flags": base_flags, "flags": flags, "steps": steps,
           "batch_size": batch, "seed": seed, "loop_seconds": 1.0, "knn_global": knn, "knn_mean_patch": knn,
           "init_knn_global": 60.0, "gain_knn_global": knn - 60.0, "target_entropy": 0.5,
           "prototypes_used": 64}  # fmt: skip
    return row if linear is None else {**row, "linear_global": linear}


def test_recipe_study_groups_seeds_by_recipe_and_reads_each_runs_momentum(tmp_path):
    from benchmarks.recipe_study import momentum, seed_groups, seed_table
    from capi_lab.config import get_preset

    rows = [
        _study_row("short", 600, 64, 0, 67.0),  # the CLI's default length: not in the seed table
        _study_row("k64", 7600, 64, 0, 82.0, base_flags="--optim.momentum-peak 0.99", linear=85.0),
        _study_row("k64", 7600, 64, 1, 79.0, base_flags="--optim.momentum-peak 0.99", linear=84.0),
        _study_row("k64", 7600, 64, 2, 80.0, base_flags="--optim.momentum-peak 0.99", linear=84.5),
        _study_row("k64", 3800, 128, 0, 80.3, base_flags="--optim.momentum-peak 0.99"),  # another length
        _study_row("m", 7600, 64, 0, 81.0, base_flags="--optim.momentum-peak 0.99", flags="--optim.momentum-peak 0.9"),
    ]
    groups = seed_groups(rows)
    assert [len(g) for g in groups.values()] == [1, 3, 1, 1]
    assert momentum(rows[1]) == "0.99" and momentum(rows[-1]) == "0.9"  # the row's flag overrides its base's
    assert momentum(rows[0]) == str(get_preset("tiny").optim.momentum_peak)
    path = tmp_path / "study.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = seed_table(path).splitlines()
    assert len(lines) == 2 + 3 and not any("short" in line for line in lines)
    three = next(line for line in lines if "| 3 |" in line)
    assert "82.0 / 79.0 / 80.0 | 80.0 |" in three and "85.0 / 84.0 / 84.5 | 84.5 |" in three  # medians
    assert "| 3800 × 128 | 0.99 | 1 | 80.3 | 80.3 | – | – |" in seed_table(path)
    r = _run_on_cpu("benchmarks/recipe_study.py", "--results", str(path), "--plot", str(tmp_path / "study.png"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_recipe_study_row_is_a_training_command_the_cli_accepts():
    from benchmarks.recipe_study import BASES, STUDIES
    from capi_lab.train import resolve_config

    for base in BASES.values():
        for name, (flags, _) in STUDIES.items():
            optim = resolve_config(["--preset", "tiny", *base, *flags]).capi.optim
            if "--optim.truncate" in flags:
                assert optim.truncate == float(flags[flags.index("--optim.truncate") + 1]), name
    with pytest.raises(SystemExit):  # a misspelt flag is refused, so the loop above can fail
        resolve_config(["--preset", "tiny", "--optim.truncation", "1.0"])


def _documented_command(text: str, start: str) -> list[str]:
    """The command in ``text`` that begins with ``start``: in markdown up to the closing backquote, in a shell
    script's comment up to the first line that does not end in a backslash."""
    from shlex import split

    at = text.index(start)
    if text[at - 1] == "`":
        return split(text[at : text.index("`", at)])
    lines = []
    for line in text[at:].splitlines():
        line = line.lstrip("# ").rstrip()
        lines.append(line.removesuffix("\\"))
        if not line.endswith("\\"):
            return split(" ".join(lines))
    raise AssertionError(f"{start!r} does not end")


def test_the_documented_20_minute_recipe_is_the_study_row_it_quotes():
    """README and fmnist_eval.sh give the command a user types for the 20-minute run; it must train what the study
    measured (`--base tiny --only m0.99+pred1.0` at 7600 x 64), so a change to one is seen in the others."""
    from benchmarks.recipe_study import BASES, STUDIES
    from capi_lab.train import resolve_config

    root = Path(__file__).parents[1]
    study = resolve_config(["--preset", "tiny", "--max-steps", "7600", *BASES["tiny"], *STUDIES["m0.99+pred1.0"][0]])
    readme = (root / "README.md").read_text()
    quoted = readme[readme.index("The 20-minute\nrecipe") :]
    for where, text in (("README.md", quoted), ("fmnist_eval.sh", (root / "benchmarks/fmnist_eval.sh").read_text())):
        cmd = _documented_command(text, "python -m capi_lab.train --preset tiny --data fashion-mnist")
        assert cmd[:3] == ["python", "-m", "capi_lab.train"], where
        run = resolve_config(cmd[3:])
        assert run.capi == study.capi, where  # batch 64 is the preset's and lives in capi
        assert run.max_steps == 7600, where
    with pytest.raises(AssertionError):  # the comparison sees a recipe that is not the study's
        assert resolve_config(["--preset", "tiny"]).capi == study.capi
