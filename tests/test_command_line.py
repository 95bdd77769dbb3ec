"""The command lines (capi_lab.command_line on jsonargparse): flags from the config dataclasses, precedence
preset < file < flags, --print_config, and one typed config per evaluation task."""

import subprocess
import sys

import pytest
import yaml

from capi_lab.command_line import normalise_argv, shorthand_flags
from capi_lab.evaluation.__main__ import parse_args as eval_args
from capi_lab.features import parse_args as features_args
from capi_lab.train import RunConfig, resolve_config


def test_normalise_argv():
    shorthands = shorthand_flags(RunConfig, flatten=frozenset({"capi"}))
    assert shorthands["--compile"] == 0 and shorthands["--crop_scale"] == 2 and shorthands["--optim.betas"] == 2
    assert shorthands["--mask.roll"] == 0 and "--max_steps" not in shorthands
    argv = ["--max-steps", "3", "--compile", "--model.num-prototypes=8", "--crop-scale", "0.2", "1", "--mask.roll",
            "false", "--config", "a.yaml", "--data", "--weird-dir--"]  # fmt: skip
    assert normalise_argv(argv, shorthands) == [
        "--config", "a.yaml", "--max_steps", "3", "--compile=true", "--model.num_prototypes=8",
        "--crop_scale=[0.2,1]", "--mask.roll", "false", "--data", "--weird_dir__",
    ]  # fmt: skip


def test_dashes_and_underscores_are_the_same_flag():
    dashed = resolve_config(["--max-steps", "7", "--model.num-prototypes", "16", "--cuda-graphs", "--compile"])
    under = resolve_config(["--max_steps", "7", "--model.num_prototypes", "16", "--cuda_graphs", "--compile"])
    assert dashed == under and dashed.max_steps == 7 and dashed.capi.model.num_prototypes == 16 and dashed.cuda_graphs


def test_precedence_is_preset_then_file_then_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"preset": "default", "max_steps": 11, "optim": {"lr": 3e-4}, "batch_size": 5}))
    for argv in (["--config", str(cfg), "--batch-size", "6"], ["--batch-size", "6", "--config", str(cfg)]):
        run = resolve_config(argv)
        assert run.preset == "default" and run.capi.model.patch_size == 8  # the file's preset
        assert run.capi.crop_scale == (0.1, 1.0)  # a preset value the file does not set
        assert run.max_steps == 11 and run.capi.optim.lr == 3e-4  # the file over the preset
        assert run.capi.batch_size == 6  # the flag over the file, wherever --config stands
    assert resolve_config(["--config", str(cfg), "--preset", "tiny"]).capi.model.patch_size == 4


def test_print_config_round_trips(tmp_path):
    argv = ["--preset", "default", "--max-steps", "9", "--mask.ratio", "0.5", "--crop-scale", "0.3", "1.0"]
    out = subprocess.run(
        [sys.executable, "-m", "capi_lab.train", *argv, "--print_config"], capture_output=True, text=True, check=True
    ).stdout
    (tmp_path / "printed.yaml").write_text(out)
    assert yaml.safe_load(out)["mask"]["ratio"] == 0.5
    assert resolve_config(["--config", str(tmp_path / "printed.yaml")]) == resolve_config(argv)


def test_help_shows_field_docstrings_and_preset_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        resolve_config(["--preset", "default", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Training steps; warmup and decay schedules are stretched to this length" in text
    assert "Area range of the RandomResizedCrop" in text
    assert "--model.num_prototypes" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-steps", "0"], "--max-steps must be >= 1"),
        (["--optim.lr", "fast"], 'optim.lr".*float'),
        (["--modle.depth", "3"], "unrecognized arguments: --modle.depth"),
        (["--mask.strategy", "diagonal"], "mask.strategy"),
        (["--preset", "vit_zz"], "unknown preset 'vit_zz'"),
        (["--strategy", "fsdp", "--devices", "auto"], "fsdp needs a number of --devices"),
    ],
)
def test_bad_train_flags_name_the_problem(argv, message):
    with pytest.raises(SystemExit, match=message):
        resolve_config(argv)


def test_each_evaluation_task_has_its_own_settings():
    base = ["--checkpoint", "default", "--dataset", "fashion-mnist"]
    task, cfg = eval_args(["knn", *base])
    assert task == "knn" and cfg.k == 20 and cfg.features == "global"
    task, cfg = eval_args(["seg-knn", "--checkpoint", "default"])
    assert task == "seg-knn" and cfg.k == 10 and cfg.dataset == "tuxpaint" and cfg.n_train == 300
    assert eval_args(["seg-knn", "--checkpoint", "default", "--k", "20"])[1].k == 20
    assert eval_args(["attentive", *base, "--limit-train", "50"])[1].limit_train == 50
    with pytest.raises(SystemExit, match="unrecognized arguments: --k"):
        eval_args(["linear", *base, "--k", "3"])  # a linear probe has no neighbours
    with pytest.raises(SystemExit, match="required: --dataset"):
        eval_args(["linear", "--checkpoint", "default"])
    with pytest.raises(SystemExit, match='key "k": Expected a <class .int.>'):
        eval_args(["seg-knn", "--checkpoint", "default", "--k", "many"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["knn", "--k", "0"], "--k must be > 0, got 0"),
        (["knn", "--temperature", "0"], "--temperature must be > 0"),
        (["knn", "--limit-train", "0"], "--limit-train must be > 0"),
        (["linear", "--batch-size", "0"], "--batch-size must be > 0"),
        (["attentive", "--epochs", "-1"], "--epochs must be > 0"),
        (["knn", "--features", "cls"], "features"),
    ],
)
def test_bad_evaluation_settings_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        eval_args([*argv, "--checkpoint", "default", "--dataset", "fashion-mnist"])


def test_features_settings():
    cfg = features_args(["--checkpoint", "default", "--images", "demo-photos", "--out", "f.npz", "--no-patches"])
    assert cfg.no_patches and cfg.batch_size == 32 and cfg.out == "f.npz"
    with pytest.raises(SystemExit, match=r"\.safetensors or \.npz"):
        features_args(["--checkpoint", "default", "--images", "demo-photos", "--out", "f.txt"])
    with pytest.raises(SystemExit, match="images"):
        features_args(["--checkpoint", "default", "--out", "f.npz"])
