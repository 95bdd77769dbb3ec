"""Checks that need a CUDA GPU (deselected by default; run with `pytest -m gpu` on a GPU machine)."""

import numpy as np
import pytest
import torch
from PIL import Image

import capi_lab
from capi_lab.config import get_preset, with_overrides
from capi_lab.masking import MaskBatch, sample_masks

pytestmark = pytest.mark.gpu

SMALL = {"model.embed_dim": 128, "model.num_heads": 2, "model.depth": 2, "model.pred_depth": 1,
         "model.num_prototypes": 256, "batch_size": 16}  # fmt: skip


def _trainer(compile=False, cuda_graphs=False, **overrides):
    from lightning.fabric import Fabric

    from capi_lab.train import build_trainer

    cfg = with_overrides(get_preset("vit_b16"), image_size=64, **{**SMALL, **overrides})
    fabric = Fabric(accelerator="cuda", devices=1, precision="bf16-mixed")
    tr = build_trainer(fabric, cfg, max_steps=100, compile=compile, cuda_graphs=cuda_graphs)
    x = torch.randn(16, 3, 64, 64, device="cuda")
    m = MaskBatch(*(t.cuda() for t in sample_masks(16, 4, 4, cfg.mask.__class__(prediction_subsampling=0.5), 0)))
    return tr, x, m


def test_bf16_training_steps_are_finite_and_learn():
    from capi_lab.train import train_step

    tr, x, m = _trainer()
    losses = [float(train_step(tr, x, m)["capi_loss"]) for _ in range(30)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_compiled_cuda_step_matches_eager(no_shape_checks):
    from capi_lab.train import train_step

    out = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        tr, x, m = _trainer(compile=compiled)
        out[compiled] = [float(train_step(tr, x, m)["capi_loss"]) for _ in range(3)]
    assert out[True] == pytest.approx(out[False], rel=2e-2)


def _graph_skips() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def test_cuda_graph_steps_match_compiled_steps(no_shape_checks):
    """--cuda-graphs: the same losses as the compiled steps, read only after all steps ran (the outputs must
    outlive the next replay), and inductor did not quietly decline to build the graphs."""
    from capi_lab.train import train_step

    losses = {}
    for graphs in (False, True):
        torch._dynamo.reset()
        skips = _graph_skips()
        torch.manual_seed(0)
        tr, x, m = _trainer(compile=True, cuda_graphs=graphs, **{"model.drop_path_rate": 0.0})
        outs = [train_step(tr, x, m) for _ in range(6)]  # warm-up run, recording, then replays
        losses[graphs] = [float(o["capi_loss"]) for o in outs]
        assert tr.cuda_graphs == graphs
        assert _graph_skips() == skips
    assert losses[True] == pytest.approx(losses[False], rel=5e-3)


def test_cuda_graph_replays_redraw_stochastic_depth(no_shape_checks):
    """Stochastic depth draws a permutation in every residual branch; each replay must draw anew. With lr 0
    nothing changes between steps (same images, masks, weights; the teacher has no stochastic depth), so the
    loss can only change if the dropped samples do. Without stochastic depth it must not change at all."""
    from capi_lab.train import train_step

    for drop in (0.5, 0.0):
        torch._dynamo.reset()
        skips = _graph_skips()
        torch.manual_seed(0)
        tr, x, m = _trainer(compile=True, cuda_graphs=True, **{"model.drop_path_rate": drop, "optim.lr": 0.0})
        losses = [float(train_step(tr, x, m)["capi_loss"]) for _ in range(8)]
        assert _graph_skips() == skips and all(np.isfinite(losses))
        replayed = set(losses[3:])
        assert len(replayed) >= 4 if drop else len(replayed) == 1, (drop, losses)


@pytest.mark.parametrize(
    ("compiled", "graphs", "clip"), [(False, False, None), (False, False, 3.0), (True, False, None), (True, True, None)]
)
def test_training_step_never_waits_for_the_gpu(no_shape_checks, compiled, graphs, clip):
    """The host must be able to queue step after step: any host-device sync inside a step (a blocking copy of a
    Python scalar to the GPU, a norm read back to check it) leaves the GPU idle while the host starts the next
    one. The first steps compile and build lazy state, so only later ones are checked."""
    from capi_lab.train import train_step

    tr, x, m = _trainer(compile=compiled, cuda_graphs=graphs, **{"optim.grad_clip": clip})
    for _ in range(4):
        train_step(tr, x, m)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [train_step(tr, x, m) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(np.isfinite(float(o["capi_loss"])) for o in outs)


@pytest.mark.parametrize("traceable", [False, True])
def test_fused_rope_step_matches_pytorch_rope(monkeypatch, no_shape_checks, traceable):
    """The compiled training step with RoPE as the Triton kernel (the CUDA default; also its traceable
    registration, which Inductor launches itself) and in PyTorch: the same losses, and the kernel is what
    the first one traced."""
    from capi_lab.kernels import fused_rope
    from capi_lab.train import train_step

    monkeypatch.setattr(fused_rope, "TRACEABLE", traceable)

    traced = []
    monkeypatch.setattr(fused_rope, "rotate", lambda *a, f=fused_rope.rotate: traced.append(a) or f(*a))
    losses = {}
    for fused in (True, False):
        monkeypatch.setattr(fused_rope, "ENABLED", fused)
        torch._dynamo.reset()
        torch.manual_seed(0)
        tr, x, m = _trainer(compile=True, **{"model.drop_path_rate": 0.0})
        losses[fused] = [float(train_step(tr, x, m)["capi_loss"]) for _ in range(4)]
        if fused:
            assert len(traced) >= 2  # teacher and student encoders at least
    assert losses[True] == pytest.approx(losses[False], rel=1e-2)


def test_cuda_fp32_matches_cpu_and_bf16_is_close():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = capi_lab.create_model("vit_l14", embed_dim=256, num_heads=4, depth=4, pred_depth=2).eval()
    x = torch.randn(2, 3, 224, 168)
    with torch.no_grad():
        cpu = model(x)
        gpu = model.cuda()(x.cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = model(x.cuda())
    for a, b, c in zip(cpu, gpu, half, strict=True):
        assert (a - b.cpu()).abs().max() < 1e-4
        rel = (a - c.float().cpu()).norm() / a.norm()
        assert rel < 3e-2


def test_fused_sinkhorn_matches_pytorch_at_scale():
    """The Triton kernels against the PyTorch form on a ViT-B/16-sized slice: 32 images x 196 patches x 16384
    prototypes of bf16 logits shaped like the clustering head's (cosine scores against N(0, 1) prototypes)."""
    from capi_lab.losses import clustering_outputs

    feats = torch.nn.functional.normalize(torch.randn(32 * 196, 768, device="cuda"), dim=-1)
    logits = (feats @ torch.randn(768, 16384, device="cuda")).view(32, 196, -1).bfloat16()
    idx = torch.cat([i * 196 + torch.randperm(196, device="cuda")[:6] for i in range(32)])
    out, grads = [], []
    for fused in (False, True):
        x = logits.clone().requires_grad_()
        o = clustering_outputs(x, idx, impl="fused" if fused else "potentials")
        o.clustering_loss.backward()
        out.append(o)
        grads.append(x.grad.float())
    ref, got = out
    assert torch.allclose(got.targets, ref.targets, atol=1e-5)
    assert got.clustering_loss.item() == pytest.approx(ref.clustering_loss.item(), rel=1e-4)
    assert got.target_entropy.item() == pytest.approx(ref.target_entropy.item(), rel=1e-3, abs=1e-3)
    # argmax: with far fewer images than prototypes, Sinkhorn leaves exact fp32 ties at the top of most rows
    # (a prototype's whole column goes to one image), so check the value at the chosen prototype, not its index
    chosen = ref.targets.flatten(0, 1).gather(-1, got.assignments.flatten()[idx][:, None])[:, 0]
    assert torch.allclose(chosen, ref.targets.flatten(0, 1).amax(-1), rtol=1e-5, atol=1e-8)
    assert torch.allclose(grads[1], grads[0], atol=1e-2 * grads[0].abs().max().item())  # bf16 gradients


def test_loader_batches_are_pinned_and_copied_on_a_side_stream(tmp_path):
    """make_loader's batches arrive page-locked (so their copy is asynchronous), and the training loop's
    ``DeviceBatches``, which copies each batch on a side stream, hands out the loader's values."""
    from lightning.fabric import Fabric

    from capi_lab.loader import DeviceBatches, make_loader
    from capi_lab.train import RunConfig

    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray((rng.random((40, 50, 3)) * 255).astype("uint8")).save(tmp_path / f"{i}.png")
    cfg = with_overrides(get_preset("tiny"), batch_size=4)
    run = RunConfig(capi=cfg, num_workers=1)
    fabric = Fabric(accelerator="cuda", devices=1)
    src = capi_lab.data.resolve_source(str(tmp_path))
    first = next(iter(make_loader(run, fabric, src, 0)))
    assert first.images.is_pinned() and all(t.is_pinned() for t in first.masks)
    plain = iter(make_loader(run, fabric, src, 0))
    copied = DeviceBatches(iter(make_loader(run, fabric, src, 0)), fabric)
    for _ in range(5):
        a, b = next(plain), next(copied)
        assert b.images.is_cuda and torch.equal(a.images, b.images.cpu())
        assert all(torch.equal(x, y.cpu()) for x, y in zip(a.masks, b.masks, strict=True))


def test_train_command_on_gpu(tmp_path):
    from capi_lab.train import main

    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray((rng.random((80, 90, 3)) * 255).astype("uint8")).save(tmp_path / f"{i}.png")
    out = tmp_path / "run"
    args = ["--preset", "tiny", "--data", str(tmp_path), "--output-dir", str(out), "--max-steps", "6",
            "--log-every", "3", "--batch-size", "8", "--image-size", "32", "--num-workers", "2"]  # fmt: skip
    assert main(args) == 0
    model = capi_lab.load_pretrained(out / "checkpoints" / "last.ckpt", device="cuda")
    assert next(model.parameters()).is_cuda
