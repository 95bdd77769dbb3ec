import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import capi_lab
from capi_lab import train
from capi_lab.train import main, resolve_config

TINY = ["--preset", "tiny", "--num-workers", "0", "--batch-size", "8", "--model.num-prototypes", "64"]


def _metrics(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_writes_everything(images, tmp_path):
    out = tmp_path / "run"
    assert main([*TINY, "--data", str(images), "--output-dir", str(out), "--max-steps", "6", "--log-every", "2",
                 "--checkpoint-every", "2", "--keep-checkpoints", "2"]) == 0  # fmt: skip
    assert (out / "config.yaml").exists()
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [2, 4, 6]
    need = {
        "step",
        "capi_loss",
        "clustering_loss",
        "target_entropy",
        "lr",
        "momentum",
        "prototypes_used",
        "images_per_s",
    }
    assert need <= rows[0].keys()
    assert all(np.isfinite(r["capi_loss"]) and 0 < r["prototypes_used"] <= 64 for r in rows)
    assert 0 < rows[-1]["target_entropy"] < np.log(64)
    assert rows[0]["momentum"] < 1.0 and rows[0]["lr"] > rows[-1]["lr"]
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step_0000004.ckpt", "step_0000006.ckpt"]
    assert list((out / "csv_logs").rglob("metrics.csv"))
    # the checkpoint and the authors'-layout export both load, and agree
    a = capi_lab.load_pretrained(out / "checkpoints" / "last.ckpt")
    b = capi_lab.load_pretrained(out / "teacher_authors.pth")
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert all(torch.equal(u, v) for u, v in zip(a(x), b(x), strict=True))
    ck = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert {
        "student",
        "teacher",
        "optimizer",
        "clustering_optimizer",
        "step",
        "stream_position",
        "rng",
        "config",
    } <= ck.keys()
    assert ck["step"] == 6 and ck["stream_position"] == 48
    # the saved config reproduces the run's settings
    again = resolve_config(["--config", str(out / "config.yaml")])
    assert again.capi == resolve_config([*TINY, "--data", str(images)]).capi


def test_resume_is_exact(images, tmp_path, interrupt_and_resume):
    common = [*TINY, "--data", str(images), "--log-every", "1", "--max-steps", "8", "--checkpoint-every", "4"]
    main([*common, "--output-dir", str(tmp_path / "once")])
    # the same run interrupted after step 4 (just after its checkpoint), then the same command again
    interrupt_and_resume(main, [*common, "--output-dir", str(tmp_path / "twice")], 4)
    once, twice = _metrics(tmp_path / "once"), _metrics(tmp_path / "twice")
    assert [r["step"] for r in twice] == list(range(1, 9))
    for key in ("capi_loss", "clustering_loss", "target_entropy"):
        assert [r[key] for r in once] == [r[key] for r in twice], key


def test_the_sinkhorn_implementation_is_explicit():
    """--sinkhorn auto picks per device (eager on a CPU without compile), a name is taken as given, and an unknown
    one is refused at parse time."""
    assert (
        resolve_config([]).sinkhorn == "auto" and resolve_config(["--sinkhorn", "potentials"]).sinkhorn == "potentials"
    )
    with pytest.raises(SystemExit):
        resolve_config(["--sinkhorn", "exp"])
    cfg = capi_lab.config.with_overrides(capi_lab.config.get_preset("tiny"), batch_size=4)
    fabric = train.Fabric(accelerator="cpu", devices=1, precision="32-true")
    assert train.build_trainer(fabric, cfg, 10).teacher_module.sinkhorn == "eager"
    assert train.build_trainer(fabric, cfg, 10, sinkhorn="potentials").teacher_module.sinkhorn == "potentials"
    with pytest.raises(ValueError, match="unknown Sinkhorn implementation"):
        train.build_trainer(fabric, cfg, 10, sinkhorn="exp")


def test_resume_with_other_settings_is_refused(images, tmp_path):
    out = tmp_path / "r"
    main([*TINY, "--data", str(images), "--output-dir", str(out), "--max-steps", "2"])
    with pytest.raises(SystemExit, match="different settings.*model.embed_dim"):
        main([*TINY, "--data", str(images), "--output-dir", str(out), "--model.embed-dim", "64"])


def test_resume_keeps_a_non_default_crop_scale(images, tmp_path):
    """The settings check compares every method field: a run with its own crop scale resumes, and a different
    crop scale is refused by name."""
    out = tmp_path / "r"
    crop = ["--crop-scale", "0.1", "1.0"]
    main([*TINY, "--data", str(images), "--output-dir", str(out), "--max-steps", "2", *crop])
    main([*TINY, "--data", str(images), "--output-dir", str(out), "--max-steps", "3", *crop])
    assert [r["step"] for r in _metrics(out)][-1] == 3
    with pytest.raises(SystemExit, match="different settings.*crop_scale"):
        main([*TINY, "--data", str(images), "--output-dir", str(out), "--max-steps", "4", "--crop-scale", "0.5", "1"])


def _cmd(images, out, steps):
    return [sys.executable, "-m", "capi_lab.train", *TINY, "--data", str(images), "--output-dir", str(out),
            "--max-steps", str(steps), "--checkpoint-every", "5", "--log-every", "5"]  # fmt: skip


def test_sigkill_then_same_command_continues(images, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(images, out, 400), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # last.ckpt is copied after each periodic file: once step 15's exists, last.ckpt holds step 10 or later
    while time.time() < deadline and not (out / "checkpoints" / "step_0000015.ckpt").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    step_at_kill = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["step"]
    assert 10 <= step_at_kill < 400
    res = subprocess.run(_cmd(images, out, step_at_kill + 10), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resuming from {out / 'checkpoints' / 'last.ckpt'} at step {step_at_kill}" in res.stdout
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["step"] == step_at_kill + 10


KILL_DURING_SAVE = r"""
import os, signal, sys, torch
from lightning.fabric import Fabric
from capi_lab.config import get_preset, with_overrides
from capi_lab.checkpoint import save_checkpoint
from capi_lab.train import RunConfig, build_trainer
cfg = with_overrides(get_preset("tiny"), **{"model.num_prototypes": 16})
run = RunConfig(output_dir=sys.argv[1], capi=cfg)
fabric = Fabric(accelerator="cpu", devices=1)
tr = build_trainer(fabric, cfg, 10)
tr.step = 1
save_checkpoint(tr, run, __import__("pathlib").Path(sys.argv[1]))
def dying_save(checkpoint, path, *args, **kwargs):  # the process dies half-way through writing the file
    with open(path, "wb") as fh:
        fh.write(b"PK\x03\x04 half a checkpoint")
        fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
tr.step = 2
save_checkpoint(tr, run, __import__("pathlib").Path(sys.argv[1]))
"""


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    res = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path)], capture_output=True, timeout=120)
    assert res.returncode == -signal.SIGKILL
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the interrupted write
    ck = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ck["step"] == 1
    assert capi_lab.load_pretrained(tmp_path / "last.ckpt") is not None


def test_nan_loss_stops_and_keeps_last_good_checkpoint(images, tmp_path, monkeypatch, capsys, caplog):
    real = train.student_step
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(train, "student_step", sometimes_nan)
    out = tmp_path / "nan"
    code = main(
        [*TINY, "--data", str(images), "--output-dir", str(out), "--max-steps", "20", "--checkpoint-every", "2",
         "--snapshot-every", "1"]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "NaN/inf for 3 steps in a row (steps 5-7)" in err and "last.ckpt" in err
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["step"] == 4
    # snapshots (every step here) stop at the last finite teacher; the diverged ones are skipped, not fatal
    from capi_lab.snapshots import read_index

    steps = [r["step"] for r in read_index(out)]
    assert steps[:5] == [0, 1, 2, 3, 4] and max(steps) < 7
    assert "snapshot at step" in caplog.text and "NaN/inf" in caplog.text


def _write_bad_folder(root: Path) -> None:
    rng = np.random.default_rng(1)
    good = (rng.random((40, 40, 3)) * 255).astype("uint8")
    for i in range(6):
        Image.fromarray(np.roll(good, i, 0)).save(root / f"good_{i}.jpg")
    Image.fromarray(good).save(root / "full.jpg")
    data = (root / "full.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "full.jpg").unlink()
    (root / "zero.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("this is a text file with an image extension")
    Image.fromarray(good).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray((rng.random((30, 30)) * 65535).astype(np.uint16)).save(root / "sixteen.png")
    assert Image.open(root / "sixteen.png").mode.startswith("I")
    Image.fromarray(np.dstack([good, np.full((40, 40), 128, np.uint8)])).save(root / "rgba.png")
    Image.fromarray(good[:1, :1]).save(root / "one_pixel.png")


def test_bad_images_are_skipped_and_counted(tmp_path, caplog):
    folder = tmp_path / "bad"
    folder.mkdir()
    _write_bad_folder(folder)
    out = tmp_path / "run"
    args = [*TINY, "--data", str(folder), "--output-dir", str(out), "--max-steps", "6", "--log-every", "3"]
    with caplog.at_level("WARNING", logger="capi_lab.data"):
        assert main(args) == 0
    warned = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert sorted(Path(m.split()[1].rstrip(":")).name for m in warned) == ["notes.jpg", "truncated.jpg", "zero.jpg"]
    rows = _metrics(out)
    assert rows[-1]["skipped_images"] >= 3 and np.isfinite(rows[-1]["capi_loss"])


def test_sixteen_bit_and_cmyk_are_converted_not_clipped(tmp_path):
    from capi_lab.data import FileImages

    _write_bad_folder(tmp_path)
    src = FileImages([tmp_path / "sixteen.png", tmp_path / "cmyk.jpg", tmp_path / "rgba.png"])
    sixteen = np.asarray(src.load(0))
    assert sixteen.dtype == np.uint8 and 60 < sixteen.mean() < 200 and sixteen.std() > 30  # not all white
    assert all(src.load(i).mode == "RGB" for i in range(3))


@pytest.mark.parametrize("spec,message", [("MISSING", "no such file or folder"), ("EMPTY", "holds no image files")])
def test_bad_data_spec_fails_before_any_model(tmp_path, monkeypatch, spec, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    data = {"MISSING": str(tmp_path / "nope"), "EMPTY": str(tmp_path / "empty")}[spec]
    monkeypatch.setattr(train, "build_trainer", lambda *a, **k: pytest.fail("built a model"))
    with pytest.raises(SystemExit, match=message):
        main([*TINY, "--data", data, "--output-dir", str(tmp_path / "o")])


def test_list_file_and_cli_overrides(images, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in sorted(images.rglob("*.png"))[:5]) + "\n")
    yaml_cfg = tmp_path / "c.yaml"
    yaml_cfg.write_text("preset: tiny\noptim:\n  lr: 2.0e-3\nmask:\n  strategy: block\nbatch_size: 16\n")
    run = resolve_config(["--config", str(yaml_cfg), "--optim.lr", "5e-4", "--data", str(listing)])
    assert run.capi.optim.lr == 5e-4  # flag beats file
    assert run.capi.mask.strategy == "block" and run.capi.batch_size == 16  # file beats preset
    assert run.capi.model.embed_dim == 128  # preset
    with pytest.raises(SystemExit):
        resolve_config(["--mask.strategy", "diagonal"])
    with pytest.raises(SystemExit, match="image_size=30"):
        resolve_config(["--image-size", "30"])


def test_cuda_graphs_flag_is_checked_and_falls_back_off_gpu(images, tmp_path, caplog):
    """--cuda-graphs needs --compile, refuses FSDP and several processes with the fix named, and on a CPU
    trains as usual after one warning (inductor builds CUDA graphs only for CUDA tensors)."""
    with pytest.raises(SystemExit, match="add --compile"):
        resolve_config(["--cuda-graphs"])
    with pytest.raises(SystemExit, match="fsdp.*drop --cuda-graphs"):
        resolve_config(["--cuda-graphs", "--compile", "--strategy", "fsdp"])
    assert resolve_config(["--cuda-graphs", "--compile"]).cuda_graphs

    class TwoGPUs(train.Fabric):  # all that build_trainer looks at before refusing
        device, world_size = torch.device("cuda"), 2

        def __init__(self):
            pass

    with pytest.raises(ValueError, match="one process on one GPU.*has 2"):
        train.build_trainer(TwoGPUs(), capi_lab.config.get_preset("tiny"), 10, compile=True, cuda_graphs=True)
    caplog.set_level("WARNING", logger="capi_lab.train")
    tr = train.build_trainer(
        train.Fabric(accelerator="cpu", devices=1), capi_lab.config.get_preset("tiny"), 10, cuda_graphs=True
    )
    assert not tr.cuda_graphs and "running without them" in caplog.text


@pytest.mark.slow
def test_compiled_steps_give_cuda_graphs_no_reason_to_skip(monkeypatch, no_shape_checks):
    """--cuda-graphs can only be timed on a GPU, but whether Inductor will refuse a graph is decided from the
    graph: an op it cannot capture, an input it mutates that is not a parameter, an input that is not a tensor.
    Judged here on the CPU, on the GPU code path (the fused Sinkhorn and RoPE kernels, through the interpreter):
    Inductor is told that CPU nodes are fine and each graph's verdict is recorded where the graphs would be
    built. Whole graphs, without graph partitioning, which would otherwise run an offending op outside them.
    (A stray CPU tensor cannot be told apart here: tests/test_gpu.py counts the skips on a GPU.)"""
    import torch._inductor.config as inductor_config
    import torch._inductor.cudagraph_utils as cudagraph_utils
    import torch._inductor.output_code as output_code

    from capi_lab.kernels import fused_clustering, fused_rope
    from capi_lab.masking import MaskBatch, sample_masks

    verdicts = []

    def record(example_inputs, compiled_graph, cudagraphs, constants, boxed_device_index):
        static = set(compiled_graph.fx_kwargs["static_input_idxs"] or ())
        info = compiled_graph.cudagraph_info
        verdicts.append({
            "backward": compiled_graph.fx_kwargs["is_backward"],
            "disabled": compiled_graph.disabled_cudagraphs_reason,
            "fail_reasons": info.cudagraph_fail_reasons if info else "not checked",
            "mutated_inputs": [info.placeholders[i].name for i in compiled_graph.mutated_input_idxs if i not in static],
        })  # fmt: skip

    monkeypatch.setattr(cudagraph_utils, "check_multiple_devices_or_any_cpu_nodes", lambda nodes: None)
    monkeypatch.setattr(output_code, "cudagraph_post_compile", record)
    # triton.cudagraphs is what mode="reduce-overhead" sets; the verdicts are made while compiling: no caches
    inductor = {"triton.cudagraphs": True, "graph_partition": False, "fx_graph_cache": False}
    monkeypatch.setattr(fused_rope, "available", lambda *a: True)
    kernels = []  # which fused ops the graphs hold (traced through these)
    for module, name in ((fused_clustering, "teacher_outputs"), (fused_rope, "rotate")):
        monkeypatch.setattr(module, name, lambda *a, f=getattr(module, name), n=name: kernels.append(n) or f(*a))
    cfg = capi_lab.config.with_overrides(capi_lab.config.get_preset("tiny"), batch_size=8,
                                         **{"model.num_prototypes": 64, "model.drop_path_rate": 0.25})  # fmt: skip
    torch._dynamo.reset()
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    try:
        with inductor_config.patch(inductor), torch._functorch.config.patch(enable_autograd_cache=False):
            fabric = train.Fabric(accelerator="cpu", devices=1, precision="32-true")
            tr = train.build_trainer(fabric, cfg, 10, compile=True, sinkhorn="fused")
            masks = MaskBatch(*sample_masks(8, 7, 7, cfg.mask, rng=0))
            out = train.train_step(tr, torch.randn(8, 3, 28, 28), masks)
    finally:
        torch._dynamo.reset()
    assert torch.isfinite(out["capi_loss"]) and set(kernels) == {"teacher_outputs", "rotate"}
    skipped = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] - skips
    assert skipped == 0, f"Inductor declined {skipped} graph(s) while compiling (an op it cannot capture?)"
    assert sorted(v["backward"] for v in verdicts) == [False, False, True, True]  # teacher and student steps
    for v in verdicts:
        assert v == {"backward": v["backward"], "disabled": None, "fail_reasons": [], "mutated_inputs": []}


def test_gradient_clipping_clips_and_never_reads_the_norm_back(monkeypatch):
    """--optim.grad-clip: the student's gradients are clipped to the norm before AdamW sees them, and a
    non-finite norm is not checked on the host (a sync every step on a GPU); the NaN-loss check handles it."""
    from capi_lab.masking import MaskBatch, sample_masks

    cfg = capi_lab.config.with_overrides(
        capi_lab.config.get_preset("tiny"), batch_size=4, **{"optim.grad_clip": 1e-3, "model.num_prototypes": 64}
    )
    tr = train.build_trainer(train.Fabric(accelerator="cpu", devices=1, precision="32-true"), cfg, 10)
    real, seen = torch.nn.utils.clip_grad_norm_, []

    def spy(parameters, max_norm, *args, error_if_nonfinite=True, **kw):
        parameters = list(parameters)
        total = real(parameters, max_norm, *args, error_if_nonfinite=error_if_nonfinite, **kw)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        seen.append((float(total), float(after), max_norm, error_if_nonfinite))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    s = cfg.image_size // cfg.model.patch_size
    masks = MaskBatch(*sample_masks(4, s, s, cfg.mask, 0))
    train.train_step(tr, torch.randn(4, 3, cfg.image_size, cfg.image_size), masks)
    assert len(seen) == 1
    total, after, max_norm, check = seen[0]
    assert max_norm == 1e-3 and not check
    assert total > max_norm and after == pytest.approx(max_norm, rel=1e-3)


def test_training_step_has_no_op_that_would_wait_for_a_gpu():
    """The CPU stand-in for tests/test_gpu.py's sync check: run a step under a dispatch mode and look for the ops
    that make a host wait for a GPU when given device tensors: reading a value back (``.item()``, ``float()``,
    ``bool()``), data-dependent shapes, and a Python number written by indexing (``t[idx] = True``, which
    copies the number to the device with a blocking copy). The optimizer's step counters are host tensors on a
    GPU as well, so reading them is allowed."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from capi_lab.masking import MaskBatch, sample_masks

    cfg = capi_lab.config.with_overrides(
        capi_lab.config.get_preset("tiny"), batch_size=4, **{"optim.grad_clip": 1.0, "model.num_prototypes": 64}
    )
    tr = train.build_trainer(train.Fabric(accelerator="cpu", devices=1, precision="32-true"), cfg, 10)
    s = cfg.image_size // cfg.model.patch_size
    masks = MaskBatch(*sample_masks(4, s, s, cfg.mask, 0))
    x = torch.randn(4, 3, cfg.image_size, cfg.image_size)
    train.train_step(tr, x, masks)  # optimizer state exists from here on
    counters = {id(st["step"]) for opt in (tr.optimizer, tr.clustering_optimizer) for st in opt.state.values()}
    waits = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name == "_local_scalar_dense" and id(args[0]) not in counters:
                waits.append(name)
            if name in ("nonzero", "masked_select", "_unique2", "unique_dim", "bincount"):
                waits.append(name)
            if name in ("index_put_", "index_put", "_index_put_impl_") and args[2].dim() == 0:
                waits.append(f"{name} of a scalar")
            return func(*args, **(kwargs or {}))

    with Record():
        train.train_step(tr, x, masks)
    assert not waits


def _two_process(images, out, strategy, steps):
    cmd = [sys.executable, "-m", "capi_lab.train", *TINY, "--data", str(images), "--output-dir", str(out),
           "--max-steps", str(steps), "--log-every", "1", "--checkpoint-every", "2", "--accelerator", "cpu",
           "--devices", "2", "--strategy", strategy]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
def test_two_process_ddp_and_fsdp_on_cpu_train_alike_and_resume(images, tmp_path):
    _two_process(images, tmp_path / "ddp", "ddp", 4)
    _two_process(images, tmp_path / "fsdp", "fsdp", 4)
    ddp, fsdp = _metrics(tmp_path / "ddp"), _metrics(tmp_path / "fsdp")
    assert [r["step"] for r in ddp] == [1, 2, 3, 4] and np.isfinite(ddp[-1]["capi_loss"])
    # sharded (FSDP2) and replicated (DDP) training are the same computation
    assert [r["capi_loss"] for r in fsdp] == pytest.approx([r["capi_loss"] for r in ddp], abs=1e-5)
    ck = torch.load(tmp_path / "fsdp" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["stream_position"] == 4 * 8 * 2  # two ranks, batch 8 each
    # the FSDP checkpoint holds full tensors: it loads as a plain model and matches the DDP teacher
    a = capi_lab.load_pretrained(tmp_path / "fsdp" / "checkpoints" / "last.ckpt")
    b = capi_lab.load_pretrained(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert max((u - v).abs().max().item() for u, v in zip(a(x), b(x), strict=True)) < 1e-4
    out = _two_process(images, tmp_path / "fsdp", "fsdp", 6)  # resumes the sharded run
    assert "at step 4" in out and [r["step"] for r in _metrics(tmp_path / "fsdp")][-2:] == [5, 6]


@pytest.mark.slow
def test_loss_goes_down_on_real_photos(tmp_path, monkeypatch):
    # the 16 photos the installed packages ship, whatever scripts/fetch_demo_data.py put in the cache (its 379
    # photos, many of them PNGs decoded at full size, would make this a data-loading benchmark)
    monkeypatch.setenv("CAPI_LAB_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "photos"
    args = ["--preset", "tiny", "--num-workers", "0", "--data", "demo-photos", "--output-dir", str(out),
            "--max-steps", "100", "--log-every", "10", "--batch-size", "32", "--image-size", "32"]  # fmt: skip
    assert main(args) == 0
    losses = [r["capi_loss"] for r in _metrics(out)]
    assert np.mean(losses[-3:]) < np.mean(losses[:2]) - 0.1
