"""What the Triton kernel modules (:mod:`.fused_clustering`, :mod:`.fused_rope`) share: compiling a module's
own kernel functions, and the check that tensors can run them."""

import inspect

from torch import Tensor

try:
    import triton
except ImportError:  # CPU-only installs: the PyTorch forms are used
    triton = None


def jit(fn):
    """``triton.jit`` of ``fn`` itself: under the test suite's jaxtyping/beartype import hook a module's functions
    are wrappers, and Triton compiles a function's own source against its own globals."""
    return triton.jit(inspect.unwrap(fn))


def check_runnable(x: Tensor, what: str, otherwise: str) -> None:
    """Raise unless Triton can run ``what`` on tensors like ``x``: compiled for CUDA tensors, or, for CPU tensors,
    by Triton's interpreter, which must be switched on before Triton is imported (``TRITON_INTERPRET=1``, as the
    test suite does on machines without a GPU). ``otherwise`` says what to do instead."""
    if triton is None:
        raise RuntimeError(f"capi_lab's {what} needs Triton: pip install triton, or {otherwise}")
    if not x.is_cuda and not triton.knobs.runtime.interpret:
        raise RuntimeError(
            f"capi_lab's {what} runs on CUDA tensors; on the CPU it needs Triton's interpreter "
            f"(set TRITON_INTERPRET=1 before anything imports triton), or {otherwise}"
        )
