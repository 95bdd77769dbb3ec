"""capi_lab.launch: the Fabric a run's settings ask for."""

import pytest

from capi_lab.config import get_preset
from capi_lab.launch import make_fabric
from capi_lab.train import RunConfig


def test_cpu_run_gets_full_precision_and_both_loggers(tmp_path):
    fabric = make_fabric(RunConfig(accelerator="cpu", output_dir=str(tmp_path), capi=get_preset("tiny")))
    assert fabric.device.type == "cpu" and type(fabric.strategy.precision).__name__ == "Precision"  # 32-true
    assert {type(lg).__name__ for lg in fabric.loggers} >= {"CSVLogger", "TensorBoardLogger"}
    bf16 = make_fabric(
        RunConfig(accelerator="cpu", precision="bf16-mixed", output_dir=str(tmp_path), capi=get_preset("tiny"))
    )
    assert bf16.strategy.precision.precision == "bf16-mixed"


def test_fsdp_settings_are_checked_before_fabric():
    with pytest.raises(ValueError, match="fsdp needs a number of --devices"):
        RunConfig(strategy="fsdp", devices="auto", capi=get_preset("tiny"))
