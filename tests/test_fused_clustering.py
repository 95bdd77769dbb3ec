"""The fused Triton Sinkhorn / clustering-loss kernels against the PyTorch forms they replace.

On a machine without a GPU the kernels run through Triton's interpreter (tests/conftest.py switches it on),
so the same kernel code the GPU compiles is checked here, on odd shapes that exercise every mask.
"""

import sys

import pytest
import torch
import torch.nn.functional as F

import capi_lab.kernels.fused_clustering as fc  # noqa: E402

if fc.triton is None:
    if sys.platform.startswith("linux"):  # the dev extra installs triton there: its absence is a broken set-up
        pytest.fail("triton is not installed: pip install -e '.[dev]'", pytrace=False)
    pytest.skip("Triton has no wheels for this platform; the kernels only run on Linux + CUDA", allow_module_level=True)

from capi_lab.sinkhorn import teacher_targets  # noqa: E402

# masked-out lanes compute exp(-inf) * -inf and the like before being discarded; numpy warns in the interpreter
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(logits, predict_indices, positionwise, n_iter=3, grad_scale=1.0):
    """What teacher_step computes without the kernels, and the gradient of ``grad_scale * loss``."""
    logits = logits.detach().clone().requires_grad_()
    q = teacher_targets(logits.detach(), 0.06, n_iter, positionwise)
    loss = -(q * F.log_softmax(logits.float() / 0.12, -1)).sum(-1).mean()
    (grad_scale * loss).backward()
    b, _, k = q.shape
    targets = q if predict_indices is None else q.flatten(0, 1)[predict_indices].view(b, -1, k)
    entropy = -torch.special.xlogy(q, q).sum(-1).mean()
    return q, targets, loss.detach(), entropy, logits.grad


def _predict_indices(b, n, per_image, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([i * n + torch.randperm(n, generator=g)[:per_image] for i in range(b)])


@pytest.mark.parametrize(
    "b, n, k, positionwise, n_iter",
    [
        (6, 5, 37, True, 3),  # fewer images than a tile, K not a power of two
        (6, 5, 37, False, 3),  # standard variant: 30 tokens on one axis
        (70, 2, 19, True, 3),  # image axis split across programs
        (9, 10, 64, False, 1),  # standard, split, one iteration
        (5, 3, 1500, True, 2),  # K over one block of the row kernels
    ],
)
def test_fused_matches_pytorch(b, n, k, positionwise, n_iter):
    torch.manual_seed(b * n + k)
    logits = (torch.randn(b, n, k) * 3).to(DEVICE)
    idx = _predict_indices(b, n, 2).to(DEVICE)
    q, targets, loss, entropy, grad = _reference(logits, idx, positionwise, n_iter, grad_scale=2.5)

    x = logits.clone().requires_grad_()
    got_t, got_loss, got_arg, got_ent = fc.teacher_outputs(x, idx, 0.06, 0.12, n_iter, positionwise)
    (2.5 * got_loss).backward()

    assert got_t.shape == targets.shape and got_t.dtype == torch.float32
    assert torch.allclose(got_t, targets, atol=2e-6)
    assert got_loss.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-5)
    assert got_ent.item() == pytest.approx(entropy.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(x.grad, grad, atol=1e-5, rtol=1e-4)
    # argmax: the chosen prototype holds the row's largest assignment (balancing with few images makes
    # exact and near ties common, and either side of a tie is right)
    assert got_arg.shape == (b, n) and got_arg.dtype == torch.long
    chosen = q.gather(-1, got_arg[..., None])[..., 0]
    assert torch.allclose(chosen, q.amax(-1), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_all_rows_when_no_indices_and_half_precision_logits(dtype):
    torch.manual_seed(1)
    logits = (torch.randn(4, 6, 50) * 4).to(DEVICE, dtype)
    q, *_ = _reference(logits, None, True)
    x = logits.clone().requires_grad_()
    targets, loss, _, _ = fc.teacher_outputs(x, None)
    loss.backward()
    assert targets.shape == (4, 6, 50)
    assert torch.allclose(targets, q, atol=2e-6)
    assert x.grad.dtype == dtype  # the gradient comes back in the logits' dtype
    assert torch.allclose(targets.sum(-1), torch.ones(4, 6, device=DEVICE), atol=1e-5)


def test_extreme_logits_stay_exact():
    """Logits spread far past fp32's exp range: the online log-sum-exps keep everything finite and exact."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 3, 64, generator=g) * 60
    z[3] -= 600
    z[:, :, 7] -= 600
    ref = z.double()
    for _ in range(3):
        ref = ref - torch.logsumexp(ref, 0, keepdim=True)
        ref = ref - torch.logsumexp(ref, 2, keepdim=True)
    targets, loss, _, entropy = fc.teacher_outputs(z.to(DEVICE) * 0.06, None)  # teacher_outputs divides by 0.06
    assert torch.isfinite(targets).all() and torch.isfinite(loss) and torch.isfinite(entropy)
    assert torch.allclose(targets.double().cpu(), ref.exp(), atol=5e-5)


def test_teacher_step_fused_and_pytorch_agree():
    """The whole teacher step both ways: same outputs, same gradient into the clustering head."""
    from capi_lab.config import ModelConfig
    from capi_lab.losses import teacher_step
    from capi_lab.model.capi import CAPIBackbone
    from capi_lab.model.heads import ClusteringHead

    torch.manual_seed(0)
    cfg = ModelConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2, pred_depth=1, num_registers=4)
    teacher = CAPIBackbone(cfg).to(DEVICE)
    head = ClusteringHead(32, 48).to(DEVICE)
    images = torch.randn(6, 3, 16, 16, device=DEVICE)
    idx = _predict_indices(6, 16, 3).to(DEVICE)
    outs, grads = [], []
    for fused in (False, True):
        head.zero_grad()
        out = teacher_step(teacher, head, images, idx, impl="fused" if fused else "eager")
        out.clustering_loss.backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in head.parameters()])
    a, b = outs
    assert torch.allclose(a.targets, b.targets, atol=2e-6)
    assert a.clustering_loss.item() == pytest.approx(b.clustering_loss.item(), rel=1e-5)
    assert a.target_entropy.item() == pytest.approx(b.target_entropy.item(), rel=1e-5)
    for ga, gb in zip(*grads, strict=True):
        assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-4)


def test_compiles_as_one_custom_op(no_shape_checks):
    """torch.compile traces the op through its fake implementation and matches the eager call."""
    torch.manual_seed(2)
    logits = (torch.randn(6, 4, 40) * 3).to(DEVICE)
    idx = _predict_indices(6, 4, 1).to(DEVICE)

    def forward(x):
        return fc.teacher_outputs(x * 1.0, idx)

    results = []
    for fn in (forward, torch.compile(forward, fullgraph=True)):
        x = logits.clone().requires_grad_()
        t, loss, arg, ent = fn(x)
        loss.backward()  # through the op's registered backward, as the trainer does after a compiled step
        results.append((t, loss.detach(), arg, ent, x.grad))
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="n_iter"):
        fc.teacher_outputs(torch.randn(2, 2, 4, device=DEVICE), None, n_iter=0)


def test_triton_gets_the_kernels_own_functions():
    """Triton compiles a kernel's source against its function's globals: it must get the module's own
    function, not the shape-checking wrapper the test suite's import hook puts around it (a GPU-only
    failure: the interpreter would run the wrapper without complaint)."""
    for name in ("_col_lse", "_row_lse", "_final", "_grad"):
        fn = fc._jit(name).fn
        assert fn.__globals__ is vars(fc), name
        assert "tl" in fn.__globals__
    for helper in (fc._program_tokens, fc._tile):  # the Triton functions the kernels call
        assert helper.fn.__globals__ is vars(fc)


@pytest.mark.parametrize("positionwise", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_the_spec_form(positionwise, dtype):
    """The kernels' targets against capi_lab.sinkhorn.sinkhorn_reference, the spec's loop, on large scores."""
    from capi_lab.losses import clustering_outputs
    from capi_lab.sinkhorn import sinkhorn_reference

    logits = (torch.randn(10, 6, 45) * 1.2).to(dtype)
    z = logits.float() / 0.06
    b, n, k = z.shape
    want = sinkhorn_reference(z.transpose(0, 1) if positionwise else z.reshape(1, b * n, k), 3)
    want = want.transpose(0, 1) if positionwise else want.reshape(b, n, k)
    out = clustering_outputs(logits.to(DEVICE), None, positionwise=positionwise, impl="fused")
    assert torch.allclose(out.targets.float().cpu(), want, atol=1e-5, rtol=1e-4)
