"""Compile capi_lab's Triton kernels for a Hopper GPU (sm_90, H100/H200) on a machine without one.

The CPU test suite runs the kernels through Triton's interpreter, which executes their Python and accepts
some things the compiler rejects. This script runs the code paths that launch the kernels (fused Sinkhorn
forward and backward, fused RoPE forward and backward, in bf16 and fp32) with a recorder in place of each
kernel, then compiles every recorded launch (its argument types, constexprs and warps) to a cubin with
Triton's compiler and ptxas, for the sm_90 target. Nothing is launched, so no GPU is needed.

Run without ``TRITON_INTERPRET`` (tests/test_fused_rope.py runs it in a subprocess); prints one JSON line
per compiled kernel variant and exits non-zero if any fails.
"""

from __future__ import annotations

import json
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("run without TRITON_INTERPRET: the interpreter's kernels cannot be compiled")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from capi_lab.kernels import fused_clustering as fc  # noqa: E402
from capi_lab.kernels import fused_rope as fr  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
         torch.int64: "i64", torch.bool: "i1"}  # fmt: skip

launches: list[tuple[object, tuple, dict]] = []


class Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch instead."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append((self.fn, args, kwargs))


def _signature(fn, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    values = dict(zip(fn.arg_names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in fn.arg_names}
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    signature, constexprs = {}, {}
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + TYPES[v.dtype]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: no Triton type for argument {p.name}={v!r}")
    return signature, constexprs, options


def record() -> None:
    # compiled (cached) before the interpreter switch below, which would make triton.jit interpret them
    rope = fr._jit()
    sinkhorn = {name: fc._jit(name) for name in ("_col_lse", "_row_lse", "_final", "_grad")}
    fr._jit = lambda: Recorder(rope)
    fc._jit = lambda name: Recorder(sinkhorn[name])
    triton.knobs.runtime.interpret = True  # only so that the launch wrappers take CPU tensors: nothing runs
    for dtype in (torch.bfloat16, torch.float32):
        logits = torch.randn(4, 6, 40, dtype=dtype, requires_grad=True)
        _, loss, _, _ = fc.teacher_outputs(logits, torch.tensor([1, 7, 14, 20]))
        loss.backward()
        for parts in (1, 2):
            x = torch.randn(2, 5, 4, 64, dtype=dtype, requires_grad=True)
            outs = fr.rotate(x, torch.rand(2, 5, 2), torch.rand(2, 64), parts)
            sum(o.float().sum() for o in outs).backward()
    triton.knobs.runtime.interpret = False


def main() -> int:
    record()
    seen, failures = set(), 0
    for fn, args, kwargs in launches:
        signature, constexprs, options = _signature(fn, args, kwargs)
        key = (fn.__name__, tuple(signature.items()), tuple(constexprs.items()), tuple(options.items()))
        if key in seen:
            continue
        seen.add(key)
        named = {fn.arg_names[i[0]]: v for i, v in constexprs.items()}
        pointers = sorted({t for t in signature.values() if t.startswith("*")})
        row = {"kernel": fn.__name__, "target": "sm_90", "constexprs": named, "pointers": pointers}
        try:
            source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            compiled = triton.compile(source, target=TARGET, options=options)
            row["cubin_bytes"] = len(compiled.asm["cubin"])
        except Exception as e:  # noqa: BLE001 - reported, then the script fails
            failures += 1
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
        print(json.dumps(row, default=str))
    return 1 if failures or not seen else 0


if __name__ == "__main__":
    sys.exit(main())
