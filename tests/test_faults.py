"""A tester's list of faults and bad input, as a table of cases (issue #17): nothing lost, nothing silently wrong.

Each case names what was done to capi_lab and what it must do: resume from the newest checkpoint that reads,
keep one metrics line per step, keep the run's identity, skip and count bad images in features and evaluation,
refuse bad values and malformed checkpoints with one clear line, refuse bad training input before any model is
built, and keep the app's temporary files and cache bounded. The next tester's list starts where this one ends.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import capi_lab
from capi_lab import features as features_cli
from capi_lab import train
from capi_lab.config import ConfigError, get_preset, with_overrides
from capi_lab.data import DataError, FileImages, check_decodable, resolve_source
from capi_lab.evaluation import __main__ as eval_cli
from capi_lab.launch import check_devices
from capi_lab.model.capi import CAPIModel
from capi_lab.pretrained import CheckpointError, load_pretrained, model_state
from capi_lab.train import RunConfig, main, resolve_config

TINY = ["--preset", "tiny", "--num-workers", "0", "--batch-size", "8", "--model.num-prototypes", "16"]


@pytest.fixture()
def with_a_bad_image(images, tmp_path):
    """A copy of ``images`` with one file that is not an image."""
    root = tmp_path / "with_bad"
    for p in images.rglob("*.png"):
        (root / p.parent.name).mkdir(parents=True, exist_ok=True)
        (root / p.parent.name / p.name).write_bytes(p.read_bytes())
    (root / "class_0" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def _run(images, out, *extra):
    return main([*TINY, "--data", str(images), "--output-dir", str(out), "--log-every", "1", *extra])


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ---------------------------------------------------------------------------------------- 1. damaged checkpoints


def test_1_a_damaged_last_ckpt_falls_back_to_the_newest_checkpoint_that_reads(images, tmp_path, caplog, capsys):
    out = tmp_path / "run"
    _run(images, out, "--max-steps", "6", "--checkpoint-every", "2")
    ckpts = out / "checkpoints"
    # last.ckpt is a file of its own, not a second name of the newest periodic checkpoint
    assert os.stat(ckpts / "last.ckpt").st_nlink == 1
    assert os.stat(ckpts / "last.ckpt").st_ino != os.stat(ckpts / "step_0000006.ckpt").st_ino
    _truncate(ckpts / "last.ckpt")
    assert torch.load(ckpts / "step_0000006.ckpt", weights_only=True)["step"] == 6  # damage to one is not to both
    _truncate(ckpts / "step_0000006.ckpt")
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="capi_lab.train"):
        assert _run(images, out, "--max-steps", "8", "--checkpoint-every", "2") == 0
    warned = caplog.text
    assert "cannot resume from" in warned and "last.ckpt" in warned and "step_0000006.ckpt" in warned
    assert f"resuming from {ckpts / 'step_0000004.ckpt'} at step 4" in capsys.readouterr().out
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["step"] == 8
    assert _steps(out) == list(range(1, 9))


def test_1_no_checkpoint_that_reads_is_one_clear_error(images, tmp_path):
    out = tmp_path / "run"
    _run(images, out, "--max-steps", "2", "--checkpoint-every", "1")
    for p in (out / "checkpoints").glob("*.ckpt"):
        _truncate(p)
    with pytest.raises(SystemExit, match=r"none of the 3 checkpoints in .* can be read .*choose a new --output-dir"):
        _run(images, out, "--max-steps", "4")


# ---------------------------------------------------------------------------- 2. checkpoint interval and metrics


@pytest.mark.parametrize(("steps", "every", "interval"), [(3, None, 1), (20, None, 2), (1900, None, 190),
                                                          (100000, None, 500), (20, 7, 7)])  # fmt: skip
def test_2_the_checkpoint_interval_scales_with_the_run(steps, every, interval):
    assert RunConfig(max_steps=steps, checkpoint_every=every).checkpoint_interval == interval


def test_2_a_killed_short_run_resumes_near_the_kill_with_one_metrics_line_per_step(images, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = train.train_step

    def killed_at_11(tr, *args, **kwargs):
        if tr.step == 11:
            raise KeyboardInterrupt
        return real(tr, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", killed_at_11)
    with pytest.raises(KeyboardInterrupt):
        _run(images, out, "--max-steps", "20")  # default interval: every 2 steps
    assert _steps(out) == list(range(1, 12))  # logged up to the kill, past the checkpoint at 10
    monkeypatch.setattr(train, "train_step", real)
    _run(images, out, "--max-steps", "20")
    assert _steps(out) == list(range(1, 21))  # step 11 once, not twice


def test_2_a_new_run_in_a_folder_without_checkpoint_starts_its_metrics_afresh(images, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "capi_lo')  # a run killed early
    _run(images, out, "--max-steps", "2")
    assert _steps(out) == [1, 2]


# ------------------------------------------------------------------------------------ 3. the run's identity


def test_3_seed_and_data_are_checked_against_the_checkpoint_and_config_yaml_is_written_once(images, tmp_path, caplog):
    out = tmp_path / "run"
    _run(images, out, "--max-steps", "2", "--seed", "3")
    with pytest.raises(SystemExit, match=r"different settings \(seed: 3 -> 4;.*--resume-with-changes"):
        _run(images, out, "--max-steps", "3", "--seed", "4")
    with pytest.raises(SystemExit, match=r"different settings \(data: "):
        main([*TINY, "--data", "fashion-mnist", "--output-dir", str(out), "--max-steps", "3", "--seed", "3"])
    with caplog.at_level(logging.WARNING, logger="capi_lab.train"):
        assert _run(images, out, "--max-steps", "3", "--seed", "4", "--resume-with-changes") == 0
    assert "changed settings" in caplog.text and "seed: 3 -> 4" in caplog.text
    assert "stretches the schedules" in caplog.text  # --max-steps 2 -> 3
    saved = capi_lab.command_line.read_yaml(out / "config.yaml")
    assert saved["seed"] == 3 and saved["max_steps"] == 2  # what the run started with
    (record,) = [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()]
    assert record["step"] == 2 and record["changes"] == {"seed": [3, 4], "max_steps": [2, 3]}


def test_3_without_config_yaml_the_checkpoint_still_decides(images, tmp_path):
    out = tmp_path / "run"
    _run(images, out, "--max-steps", "2")
    (out / "config.yaml").unlink()
    with pytest.raises(SystemExit, match=r"different settings \(mask.ratio: 0.65 -> 0.5"):
        _run(images, out, "--max-steps", "3", "--mask.ratio", "0.5")
    _run(images, out, "--max-steps", "3")
    assert capi_lab.command_line.read_yaml(out / "config.yaml")["max_steps"] == 2  # restored from the checkpoint


def test_3_a_longer_run_warns_with_the_learning_rate_jump(images, tmp_path, caplog):
    out = tmp_path / "run"
    _run(images, out, "--max-steps", "4")
    with caplog.at_level(logging.WARNING, logger="capi_lab.train"):
        _run(images, out, "--max-steps", "12")
    assert "--max-steps 4 -> 12 stretches the schedules" in caplog.text and "the lr goes from" in caplog.text


# ------------------------------------------------------------------------------ 4. bad images in features and eval


def test_4_features_skip_and_count_a_bad_image(with_a_bad_image, tmp_path, capsys, caplog):
    out = tmp_path / "f.npz"
    with caplog.at_level(logging.WARNING, logger="capi_lab.features"):
        assert features_cli.main(["--checkpoint", "default", "--images",
                                  str(with_a_bad_image), "--out", str(out), "--image-size", "32",
                                  "--no-patches"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 24 and len(summary["skipped"]) == 1 and "broken.png" in summary["skipped"][0]
    saved = np.load(out)
    assert len(saved["paths"]) == 24 and not any("broken" in p for p in saved["paths"])
    assert saved["global_repr"].shape[0] == 24
    assert "broken.png" in caplog.text


def test_4_an_unwritable_output_fails_before_the_extraction(images, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")

    def never(*a, **k):
        raise AssertionError("the extraction ran before the output path was checked")

    monkeypatch.setattr(features_cli, "extract_features", never)
    with pytest.raises(SystemExit, match="cannot write --out"):
        features_cli.main(["--checkpoint", "default", "--images", str(images), "--out", str(blocker / "f.npz")])
    with pytest.raises(SystemExit, match="is a folder"):
        (tmp_path / "d.npz").mkdir()
        features_cli.main(["--checkpoint", "default", "--images", str(images), "--out", str(tmp_path / "d.npz")])


def test_4_evaluation_skips_and_counts_a_bad_image(with_a_bad_image, capsys):
    argv = ["knn", "--checkpoint", "raw-pixels", "--dataset", str(with_a_bad_image), "--k", "3"]
    assert eval_cli.main(argv) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["skipped_images"] == 1 and row["n_train"] + row["n_test"] == 24


# -------------------------------------------------------------------------------------- 5. evaluation values


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--k", "0"], "--k must be > 0"),
        (["--k", "-3"], "--k must be > 0"),
        (["--temperature", "0"], "--temperature must be > 0"),
        (["--limit-train", "0"], "--limit-train must be > 0"),
        (["--limit-train", "-5"], "--limit-train must be > 0"),
        (["--batch-size", "0"], "--batch-size must be > 0"),
    ],
)
def test_5_bad_evaluation_values_are_refused_by_name(images, flags, message):
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["knn", "--checkpoint", "raw-pixels", "--dataset", str(images), *flags])
    assert str(e.value).startswith("error: ") and message in str(e.value)


def test_5_k_larger_than_the_bank_is_reported_as_used(images, capsys):
    assert eval_cli.main(["knn", "--checkpoint", "raw-pixels", "--dataset", str(images), "--k", "1000"]) == 0
    captured = capsys.readouterr()
    row = json.loads(captured.out)
    assert row["k"] == row["n_train"] < 1000
    assert f"using k = {row['n_train']}" in captured.err


# -------------------------------------------------------------------------------------- 6. malformed checkpoints


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def _model_file(**changes):
    model = CAPIModel(with_overrides(get_preset("tiny"), **{"model.num_prototypes": 16}).model)
    obj = model_state(model)
    obj.update(changes)
    return obj


def _authors_2d_patch_embed():
    sd = capi_lab.pretrained.export_authors_state_dict(CAPIModel(get_preset("tiny").model))
    sd["backbone.patch_embed.weight"] = sd["backbone.patch_embed.weight"].flatten(1)
    return sd


MALFORMED = {
    "no config": (lambda: {k: v for k, v in _model_file().items() if k != "config"}, "has no config"),
    "non-tensor values": (lambda: _model_file(model={"patch_embed.weight": [1, 2]}), "not tensors"),
    "a 2-D patch embedding": (_authors_2d_patch_embed, "patch_embed.weight has shape"),
    "an invalid config value": (
        lambda: _model_file(config={**_model_file()["config"], "image_size": "big"}),
        "config is invalid: image_size must be an integer",
    ),
    "a pickle that runs code": (lambda: {"x": _RunsCode()}, r"Python object \(print\) that would run code"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_6_a_malformed_checkpoint_is_one_clear_error_naming_the_file(case, tmp_path, capsys):
    build, message = MALFORMED[case]
    path = tmp_path / "bad.pt"
    torch.save(build(), path)
    with pytest.raises(CheckpointError, match=message) as e:
        load_pretrained(path)
    assert str(path) in str(e.value)
    assert "this must never run" not in capsys.readouterr().out
    # the command lines say it in one line too
    for cli, argv in [
        (features_cli.main, ["--checkpoint", str(path), "--images", "demo-photos", "--out", str(tmp_path / "f.npz")]),
        (eval_cli.main, ["knn", "--checkpoint", str(path), "--dataset", str(tmp_path)]),
    ]:
        with pytest.raises(SystemExit, match=r"^error: "):
            cli(argv)
    import app.main as app

    with pytest.raises(SystemExit):  # argparse's error: usage, then one line, exit status 2
        app.main(["--checkpoint", str(path)])
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err


def test_6_the_pickle_refusal_is_a_whole_sentence(tmp_path):
    path = tmp_path / "code.pt"
    torch.save({"x": _RunsCode()}, path)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path)
    assert str(e.value).endswith("load it yourself with weights_only=False and save its state_dict() again")


def test_6_a_folder_is_named_as_a_folder_with_the_file_inside(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"is a folder, not a checkpoint file; did you mean .*last.ckpt"):
        load_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------ 7. training input


@pytest.fixture()
def no_model(monkeypatch):
    """Fails the test if training gets as far as building a model."""

    def never(*a, **k):
        raise AssertionError("a model was built before the bad input was refused")

    monkeypatch.setattr(train, "build_trainer", never)


def _undecodable_folder(tmp_path):
    d = tmp_path / "junk"
    d.mkdir()
    for i in range(5):
        (d / f"{i}.jpg").write_bytes(b"not a jpeg at all")
    return d


def _missing_list(tmp_path):
    f = tmp_path / "list.txt"
    f.write_text("gone/a.png\ngone/b.png\n")
    return f


def _image_as_data(tmp_path):
    f = tmp_path / "photo.png"
    Image.new("RGB", (20, 20)).save(f)
    return f


def _binary_as_list(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(bytes(range(256)) * 4)
    return f


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_undecodable_folder, "none of the 5 images tried .* can be decoded"),
        (_binary_as_list, r"is not a text file \(binary content\)"),
        (_missing_list, r"none of the 2 paths it lists exists \(first: .*a.png"),
        (_image_as_data, "is an image file; give the folder that holds it"),
    ],
)
def test_7_bad_training_data_is_refused_before_any_model(make, message, tmp_path, no_model):
    with pytest.raises(SystemExit, match=message):
        main([*TINY, "--data", str(make(tmp_path)), "--output-dir", str(tmp_path / "run"), "--max-steps", "2"])


def test_7_a_list_file_with_some_missing_paths_keeps_the_rest(images, tmp_path, caplog):
    listed = sorted(images.rglob("*.png"))[:3]
    f = tmp_path / "list.txt"
    f.write_text("\n".join([*map(str, listed), "missing.png"]))
    with caplog.at_level(logging.WARNING, logger="capi_lab.data"):
        source = resolve_source(f)
    assert isinstance(source, FileImages) and source.paths == listed
    assert "1 of 4 listed paths do not exist" in caplog.text
    check_decodable(source)  # the rest decodes


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--image-size", "-8"], "image_size must be at least model.patch_size=4, got -8"),
        (["--log-every", "0"], "--log-every must be >= 1, got 0"),
        (["--checkpoint-every", "0"], "--checkpoint-every must be >= 1, got 0"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1, got 0"),
        (["--devices", "abc"], "--devices must be a number >= 1, 'auto'"),
        (["--devices", "0"], "--devices must be a number >= 1, 'auto'"),
        (["--num-workers", "-2"], "--num-workers must be >= -1"),
        (["--seed", "-1"], "--seed must be >= 0"),
    ],
)
def test_7_bad_run_values_are_refused_by_name(flags, message):
    with pytest.raises(SystemExit) as e:
        resolve_config(flags)
    assert str(e.value).startswith("error: ") and message in str(e.value)


def test_7_an_accelerator_the_machine_lacks_is_refused_before_anything_starts(images, tmp_path, monkeypatch, no_model):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--accelerator cuda: no CUDA GPU is visible.*--accelerator cpu"):
        main([*TINY, "--data", str(images), "--output-dir", str(tmp_path), "--accelerator", "cuda"])


def test_7_more_cpu_processes_than_cores_is_said(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with caplog.at_level(logging.WARNING, logger="capi_lab.train"):
        check_devices(RunConfig(devices="3", accelerator="cpu"))
    assert "--devices 3 on the CPU starts 3 training processes on 2 cores" in caplog.text
    with pytest.raises(ConfigError, match="--devices 2: this machine has 0 CUDA GPU"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
        check_devices(RunConfig(devices="2", accelerator="cuda"))


def test_7_an_empty_source_is_refused():
    class Empty(FileImages):
        pass

    with pytest.raises(DataError, match="holds no images"):
        check_decodable(Empty([]))


# ----------------------------------------------------------------------------------------------------- 8. the app


def test_8_the_app_deletes_its_temporary_files_and_caps_its_cache_in_bytes():
    import app.main as app
    from capi_lab import explore as ex

    model = CAPIModel(with_overrides(get_preset("tiny"), **{"model.num_prototypes": 16}).model)
    demo = app.build_demo(model)
    assert demo.delete_cache == app.DELETE_CACHE and app.DELETE_CACHE[1] <= 24 * 3600
    photos = [ex.LoadedImage(f"p{i}", Image.new("RGB", (40, 40), (i * 40, 0, 0))) for i in range(5)]
    one = app.encoded_bytes(app.Workbench(model).encode(photos[:1], 32)[0])
    wb = app.Workbench(model, cache_bytes=int(2.5 * one))
    wb.encode(photos, 32)
    assert 0 < wb.cached_bytes <= wb.cache_bytes and len(wb._cache) == 2  # the two most recent
    assert wb.cached_bytes == sum(app.encoded_bytes(e) for e in wb._cache.values())
    small = app.Workbench(model, cache_bytes=one - 1)
    small.encode(photos[:1], 32)
    assert small.cached_bytes == 0  # an entry larger than the whole cache is not kept


def test_8_a_bad_port_is_refused_by_name(capsys):
    import app.main as app

    with pytest.raises(SystemExit):
        app.main(["--port", "70000"])
    assert "--port must be in 1..65535, got 70000" in capsys.readouterr().err


def test_7_an_image_size_the_model_cannot_take_is_one_line(images, tmp_path):
    """The default model has 8 px patches: --image-size 30 is refused naming a size that works."""
    with pytest.raises(SystemExit, match=r"^error: --image-size 30 is not a multiple of the model's patch size 8"):
        features_cli.main(["--checkpoint", "default", "--images", str(images), "--out", str(tmp_path / "f.npz"),
                           "--image-size", "30"])  # fmt: skip
    with pytest.raises(SystemExit, match=r"^error: --image-size 30 .* use e.g. 32"):
        eval_cli.main(["knn", "--checkpoint", "default", "--dataset", str(images), "--image-size", "30"])
