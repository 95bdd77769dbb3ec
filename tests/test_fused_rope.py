"""The fused RoPE kernel (capi_lab.kernels.fused_rope) against Rope's PyTorch form: forward, backward, custom-op
registration, and the attention layer using it.

On a machine without a GPU the kernel runs through Triton's interpreter (tests/conftest.py switches it on)."""

import pytest
import torch
import triton

from capi_lab.kernels import fused_rope
from capi_lab.model.block import Attention
from capi_lab.model.rope import Rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(b, t, heads, hd, dtype, layout="capi", seed=0):
    """``x`` as the q/k part of a fused q/k/v projection: a strided view of a wider tensor."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, t, (heads + heads // 2) * hd, generator=g).to(DEVICE, dtype)
    x = qkv[..., : heads * hd].unflatten(-1, (heads, hd))
    coords = torch.rand(b, t, 2, generator=g).to(DEVICE) * 1.2 - 0.1  # registers may sit outside [0, 1]
    rope = Rope(hd, layout=layout).to(DEVICE)
    return x, coords, rope


def _reference(rope, x, coords, parts):
    with torch.autocast("cuda", enabled=False):
        angle = rope.angles(coords).unsqueeze(2)
        a, b = x.float().chunk(2, dim=-1)
        out = x.float() * angle.cos() + torch.cat([-b, a], dim=-1) * angle.sin()
    return out.to(x.dtype).chunk(parts, dim=2)


@pytest.mark.parametrize("layout", ["capi", "rotation"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize("hd", [8, 12])  # 12: half a head (6) is not a power of two, so lanes are masked
def test_kernel_matches_pytorch(layout, dtype, parts, hd):
    x, coords, rope = _inputs(3, 21, 4, hd, dtype, layout)  # 21 tokens: a partial last tile
    outs = fused_rope.rotate(x, coords, rope.freqs, parts)
    ref = _reference(rope, x, coords, parts)
    assert len(outs) == parts
    for out, r in zip(outs, ref, strict=True):
        assert out.dtype == dtype and out.shape == r.shape and out.is_contiguous()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert torch.allclose(out.float(), r.float(), atol=tol, rtol=tol)
    assert not torch.equal(outs[0], x[:, :, : x.shape[2] // parts])  # it did rotate


@pytest.mark.parametrize("layout", ["capi", "rotation"])
@pytest.mark.parametrize("traceable", [False, True])
def test_backward_is_the_transposed_map(layout, traceable, monkeypatch):
    """Autograd of the PyTorch form, for both parts and when only one part is used (the other's gradient is
    then None inside the op's backward); through either registration of the ops."""
    monkeypatch.setattr(fused_rope, "TRACEABLE", traceable)
    x, coords, rope = _inputs(2, 19, 4, 8, torch.float32, layout, seed=1)
    grads = [torch.randn(2, 19, 2, 8, device=DEVICE) for _ in range(2)]
    for used in ([0, 1], [1]):
        results = []
        for fn in (lambda x: fused_rope.rotate(x, coords, rope.freqs, 2), lambda x: _reference(rope, x, coords, 2)):
            xx = x.detach().clone().requires_grad_()
            outs = fn(xx)
            sum((outs[i] * grads[i]).sum() for i in used).backward()
            results.append(xx.grad)
        assert torch.allclose(*results, atol=1e-5), used
        if used == [1]:
            assert torch.equal(results[0][:, :, :2], torch.zeros_like(results[0][:, :, :2]))


def test_custom_op_registration():
    """Schema, fake (meta) implementation and autograd registration agree with the real kernel."""
    x, coords, rope = _inputs(2, 5, 4, 8, torch.float32)
    x = x.detach().clone().requires_grad_()
    for parts in (1, 2):
        torch.library.opcheck(torch.ops.capi_lab.rope.default, (x, coords, rope.freqs, parts))


# Triton's interpreter cannot be traced, so the traceable ops compile on a GPU only
@pytest.mark.parametrize("traceable", [False, pytest.param(True, marks=pytest.mark.gpu)])
def test_compiles_as_one_custom_op(no_shape_checks, traceable, monkeypatch):
    monkeypatch.setattr(fused_rope, "TRACEABLE", traceable)
    x, coords, rope = _inputs(2, 9, 4, 8, torch.float32, seed=2)

    def forward(x):
        q, k = fused_rope.rotate(x * 1.0, coords, rope.freqs, 2)
        return (q * k).sum(-1).square().mean()

    results = []
    for fn in (forward, torch.compile(forward, fullgraph=True)):
        xx = x.detach().clone().requires_grad_()
        loss = fn(xx)
        loss.backward()
        results.append((loss.detach(), xx.grad))
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("cross", [False, True])
def test_attention_is_the_same_with_the_kernel(monkeypatch, cross):
    """The attention layer (q/k rotated together in self-attention, apart in cross-attention) gives the same
    output and gradients whether Rope uses the kernel or PyTorch."""
    torch.manual_seed(3)
    att = Attention(32, 4, kv_dim=24 if cross else None).to(DEVICE)
    x = torch.randn(2, 7, 32, device=DEVICE)
    coords = torch.rand(2, 7, 2, device=DEVICE)
    kw = dict(context=torch.randn(2, 11, 24, device=DEVICE), context_coords=torch.rand(2, 11, 2, device=DEVICE))
    calls = []
    monkeypatch.setattr(fused_rope, "rotate", lambda *a, f=fused_rope.rotate: calls.append(a) or f(*a))
    results = []
    for fused in (False, True):
        monkeypatch.setattr(fused_rope, "available", lambda *a, fused=fused: fused)
        att.zero_grad()
        out = att(x, coords, **kw) if cross else att(x, coords)
        out.square().sum().backward()
        results.append([out.detach()] + [p.grad for p in att.parameters() if p.requires_grad])
    assert len(calls) == (2 if cross else 1)  # self-attention: one call for q and k
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_used_only_where_it_gives_what_is_needed():
    x, coords, rope = _inputs(1, 3, 2, 8, torch.float32)
    assert fused_rope.available(x.cuda() if torch.cuda.is_available() else x, coords, rope.freqs) == (
        torch.cuda.is_available() and fused_rope.ENABLED
    )
    if torch.cuda.is_available():  # a trainable table or coordinates with a gradient: PyTorch's form
        assert not fused_rope.available(x, coords.requires_grad_(), rope.freqs)


def test_bad_arguments_are_named(monkeypatch):
    x, coords, rope = _inputs(1, 3, 3, 8, torch.float32)
    with pytest.raises(ValueError, match="parts must be 1 or 2 and divide the 3 heads"):
        fused_rope.rotate(x, coords, rope.freqs, 2)
    with pytest.raises(ValueError, match=r"coords of shape \(1, 3, 2\)"):
        fused_rope.rotate(x, coords[:, :2], rope.freqs, 1)
    if not torch.cuda.is_available():
        monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            fused_rope.rotate(x, coords, rope.freqs, 1)


def test_triton_gets_the_kernels_own_functions():
    """As for the Sinkhorn kernels: Triton must compile the module's own functions, not the shape-checking
    wrappers the test suite's import hook puts around them (a GPU-only failure otherwise)."""
    for fn in (fused_rope._jit().fn, fused_rope._rotate_pair.fn):
        assert fn.__globals__ is vars(fused_rope)
        assert "tl" in fn.__globals__


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_training_steps_are_the_same_with_the_kernel(monkeypatch, compiled, no_shape_checks):
    """Whole training steps of the tiny model (teacher and student encoders, cross-attention predictor,
    stochastic depth on subsets of the coordinates, EMA) give the same losses with RoPE as the kernel (here
    through the interpreter, inside the compiled steps when ``compiled``) as with PyTorch's RoPE."""
    from lightning.fabric import Fabric

    from capi_lab.config import get_preset, with_overrides
    from capi_lab.masking import MaskBatch, sample_masks
    from capi_lab.train import build_trainer, train_step

    # two blocks each in encoder and predictor: every RoPE call site, at half the compile and interpreter time
    over = {"model.drop_path_rate": 0.25, "model.depth": 2, "model.pred_depth": 2}
    cfg = with_overrides(get_preset("tiny"), batch_size=8, **over)
    x = torch.randn(8, 3, 28, 28, device=DEVICE)
    m = MaskBatch(*(t.to(DEVICE) for t in sample_masks(8, 7, 7, cfg.mask, rng=0)))
    calls = []
    monkeypatch.setattr(fused_rope, "rotate", lambda *a, f=fused_rope.rotate: calls.append(a) or f(*a))
    losses = {}
    for fused in (False, True):
        monkeypatch.setattr(fused_rope, "available", lambda *a, fused=fused: fused)
        torch._dynamo.reset()
        torch.manual_seed(0)
        fabric = Fabric(accelerator=DEVICE, devices=1, precision="32-true")
        tr = build_trainer(fabric, cfg, 10, compile=compiled)
        outs = [train_step(tr, x, m) for _ in range(3)]
        losses[fused] = [float(o[key]) for o in outs for key in ("capi_loss", "clustering_loss")]
    assert calls  # the kernel ran (or was traced)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5 if DEVICE == "cpu" else 1e-4)


def test_all_kernels_compile_for_hopper():
    """The interpreter runs a kernel's Python and accepts things Triton's compiler rejects (a GPU-only
    failure). tests/hopper_compile.py compiles every kernel variant the fused Sinkhorn and RoPE code paths
    launch, to sm_90 cubins, without a GPU."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).parents[1]
    out = subprocess.run([sys.executable, "tests/hopper_compile.py"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert out.returncode == 0, [r for r in rows if "error" in r] or out.stderr[-3000:]
    assert {r["kernel"] for r in rows} == {"_col_lse", "_row_lse", "_final", "_grad", "_rope"}
    rope = {(r["constexprs"]["PARTS"], r["constexprs"]["INVERSE"], tuple(r["pointers"])) for r in rows if
            r["kernel"] == "_rope"}  # fmt: skip
    assert len(rope) == 8  # 1 or 2 parts, forward or backward, bf16 or fp32
    assert all(r["cubin_bytes"] > 0 for r in rows)


@pytest.mark.parametrize(
    ("setting", "enabled", "traceable"), [(None, True, False), ("0", False, False), ("traceable", True, True)]
)
def test_on_by_default_and_switched_by_the_environment(setting, enabled, traceable):
    """The kernel is the CUDA default (timed on an H200: the compiled ViT-B/16 step 2.0-2.5 % faster);
    ``CAPI_LAB_FUSED_ROPE=0`` switches it off and ``traceable`` picks Inductor's launch."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "CAPI_LAB_FUSED_ROPE"}
    if setting is not None:
        env["CAPI_LAB_FUSED_ROPE"] = setting
    code = "from capi_lab.kernels import fused_rope as f; print(f.ENABLED, f.TRACEABLE)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(enabled), str(traceable)]
