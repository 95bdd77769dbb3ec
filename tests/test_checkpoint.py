"""capi_lab.checkpoint's resume check, for every preset, against the checkpoint's own config (saving, loading,
fallback and exact resume are tested by running training in test_train.py and test_faults.py)."""

from pathlib import Path

import pytest

from capi_lab.checkpoint import check_resume, resume_changes
from capi_lab.config import PRESETS, ConfigError
from capi_lab.train import resolve_config


def _saved(argv, step=3):
    """What a checkpoint of the run ``argv`` holds for the check: its method config and run settings."""
    run = resolve_config(argv)
    return {"config": run.capi.to_dict(), "run": run.to_dict(), "step": step}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_same_command_resumes_and_a_method_flag_is_refused(tmp_path, preset):
    argv = ["--preset", preset, "--output-dir", str(tmp_path), "--max-steps", "3"]
    ck = _saved(argv)
    path = Path("step_0000003.ckpt")
    assert check_resume(resolve_config(argv), path, ck) == {}  # the whole method config round-trips
    # run settings may change (a longer run is a schedule change: allowed, warned about, recorded)
    assert check_resume(resolve_config([*argv[:-1], "10", "--log-every", "1"]), path, ck) == {"max_steps": (3, 10)}
    for flag, value, field in [
        ("--crop-scale", "0.35 1.0", "crop_scale"),
        ("--mask.ratio", "0.5", "mask.ratio"),
        ("--optim.momentum-peak", "0.9", "optim.momentum_peak"),
        ("--model.num-prototypes", "32", "model.num_prototypes"),
        ("--seed", "4", "seed"),
        ("--data", "fashion-mnist", "data"),
    ]:
        changed = resolve_config([*argv, flag, *value.split()])
        with pytest.raises(ConfigError, match=rf"different settings \({field}: "):
            check_resume(changed, path, ck)
        allowed = resolve_config([*argv, flag, *value.split(), "--resume-with-changes"])
        assert list(check_resume(allowed, path, ck)) == [field]


def test_changes_are_read_from_the_checkpoint_not_from_config_yaml(tmp_path):
    """With config.yaml gone (or rewritten), the checkpoint's own config still decides."""
    argv = ["--output-dir", str(tmp_path), "--max-steps", "3"]
    ck = _saved(argv)
    assert not (tmp_path / "config.yaml").exists()
    assert resume_changes(resolve_config([*argv, "--mask.ratio", "0.5"]), ck) == {"mask.ratio": (0.65, 0.5)}
