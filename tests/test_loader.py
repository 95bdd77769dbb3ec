"""capi_lab.loader: the training loader's worker count (its batches and their device copies are tested with the
data stream in test_data.py)."""

from capi_lab.loader import default_workers


def test_default_loader_workers():
    """--num-workers -1: none for CPU training on fewer than 4 cores (the step uses them all), else up to 8 per
    process, leaving a core for each GPU's process."""
    assert default_workers("cpu", 2) == 0 and default_workers("cpu", 3) == 0
    assert default_workers("cpu", 4) == 3 and default_workers("cpu", 32) == 8
    assert default_workers("cuda", 2, gpus=1) == 1 and default_workers("cuda", 64, gpus=1) == 16
    assert default_workers("cuda", 16, gpus=1) == 15 and default_workers("cuda", 128, gpus=8) == 15
    assert default_workers("cuda", 16, local_rank=3, gpus=8) == 1
