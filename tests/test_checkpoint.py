"""capi_lab.checkpoint's resume check, for every preset (saving, loading and exact resume are tested by running
training in test_train.py)."""

import pytest

from capi_lab.checkpoint import check_resume_config
from capi_lab.command_line import write_yaml
from capi_lab.config import PRESETS
from capi_lab.train import resolve_config


def _run_folder(tmp_path, argv):
    run = resolve_config(argv)
    (tmp_path / "checkpoints").mkdir(parents=True)
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")  # the check reads config.yaml only
    write_yaml(tmp_path / "config.yaml", run.to_dict())
    return run


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_same_command_resumes_and_a_method_flag_is_refused(tmp_path, preset):
    argv = ["--preset", preset, "--output-dir", str(tmp_path), "--max-steps", "3"]
    _run_folder(tmp_path, argv)
    check_resume_config(resolve_config(argv))  # the whole resolved method config round-trips through the YAML
    check_resume_config(resolve_config([*argv[:-1], "10", "--log-every", "1"]))  # run settings may change
    for flag, value, field in [
        ("--crop-scale", "0.35 1.0", "crop_scale"),
        ("--mask.ratio", "0.5", "mask.ratio"),
        ("--optim.momentum-peak", "0.9", "optim.momentum_peak"),
        ("--model.num-prototypes", "32", "model.num_prototypes"),
    ]:
        with pytest.raises(SystemExit, match=rf"different settings \({field}\)"):
            check_resume_config(resolve_config([*argv, flag, *value.split()]))
