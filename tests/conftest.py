"""Test-wide set-up: every function and dataclass in capi_lab gets its jaxtyping shape annotations
checked (with beartype) while the tests run."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402  (importing torch does not import triton)

if not torch.cuda.is_available():
    # capi_lab.kernels.fused_clustering's Triton kernels run through Triton's interpreter on the CPU; the switch is
    # read when triton is imported, so it is set before anything imports it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from jaxtyping import install_import_hook  # noqa: E402

# Installed before anything imports capi_lab, and never uninstalled: modules imported later are hooked too.
_hook = install_import_hook("capi_lab", "beartype.beartype")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture()
def no_shape_checks():
    """torch.compile traces through the beartype/jaxtyping wrappers; older dynamo versions (seen with torch
    2.11 on CUDA) then raise spurious shape errors, so compiled-step tests switch the checks off."""
    import jaxtyping

    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """A small folder of generated images: 24 PNGs of 44x36 px in three class sub-folders."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(24):
        sub = root / f"class_{i % 3}"
        sub.mkdir(exist_ok=True)
        a = (rng.random((36, 44, 3)) * 255).astype("uint8")
        a[: 10 + i % 7] //= 2
        Image.fromarray(a).save(sub / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised `tiny` model (32 prototypes) saved as a model-only checkpoint."""
    import torch

    import capi_lab
    from capi_lab.pretrained import model_state

    model = capi_lab.create_model("tiny", num_prototypes=32)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(model_state(model), path)
    return path


@pytest.fixture
def interrupt_and_resume(monkeypatch):
    """``run_twice(main, argv, step)``: ``main(argv)`` stopped by a KeyboardInterrupt as step ``step`` begins (just
    after a checkpoint there), then the same command again, which resumes; returns the second call's result."""
    from capi_lab import train

    def run_twice(main, argv, step):
        real = train.train_step

        def interrupted(tr, *args, **kwargs):
            if tr.step == step:
                raise KeyboardInterrupt
            return real(tr, *args, **kwargs)

        monkeypatch.setattr(train, "train_step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            main(argv)
        monkeypatch.setattr(train, "train_step", real)
        return main(argv)

    return run_twice
