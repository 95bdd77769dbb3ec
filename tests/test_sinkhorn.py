import pytest
import torch

from capi_lab.sinkhorn import sinkhorn_knopp, sinkhorn_standard, teacher_targets


def test_positionwise_marginals():
    n, b, k = 5, 16, 8
    q = sinkhorn_knopp(torch.randn(n, b, k) * 3, n_iter=30)
    assert torch.allclose(q.sum(-1), torch.ones(n, b), atol=1e-5)  # each token sums to 1
    # per position, every prototype gets the same mass b/k across the batch
    assert torch.allclose(q.sum(1), torch.full((n, k), b / k), atol=1e-3)


def test_three_iterations_already_balance_roughly_and_tokens_sum_to_one():
    q = sinkhorn_knopp(torch.randn(4, 32, 16) * 2, n_iter=3)
    assert torch.allclose(q.sum(-1), torch.ones(4, 32), atol=1e-5)
    usage = q.sum(1) / (32 / 16)
    raw = torch.softmax(torch.randn(4, 32, 16) * 2, -1).sum(1) / 2
    assert (usage - 1).abs().max() < (raw - 1).abs().max()


def test_hand_computed_two_by_two():
    # one position, 2 images, 2 prototypes; one iteration by hand
    logits = torch.log(torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]))  # exp -> [[1,2],[3,4]]
    q = sinkhorn_knopp(logits, n_iter=1)
    # divide by column (image-axis) sums [4, 6]: [[1/4, 2/6], [3/4, 4/6]]; then rows to 1
    r0 = torch.tensor([1 / 4, 2 / 6])
    r1 = torch.tensor([3 / 4, 4 / 6])
    expected = torch.stack([r0 / r0.sum(), r1 / r1.sum()])[None]
    assert torch.allclose(q, expected, atol=1e-6)


def test_standard_balances_over_all_tokens_not_per_position():
    t, k = 64, 8
    logits = torch.randn(t, k) * 2
    q = sinkhorn_standard(logits, n_iter=50)
    assert torch.allclose(q.sum(-1), torch.ones(t), atol=1e-5)
    assert torch.allclose(q.sum(0), torch.full((k,), t / k), atol=1e-3)
    # differs from the position-wise variant on the same scores
    b, n = 8, 8
    z = logits.view(b, n, k)
    pw = teacher_targets(z, temperature=1.0, n_iter=3, positionwise=True)
    st = teacher_targets(z, temperature=1.0, n_iter=3, positionwise=False)
    assert not torch.allclose(pw, st, atol=1e-3)
    assert torch.allclose(st, sinkhorn_standard(z.reshape(-1, k), 3).view(b, n, k))


def test_stable_with_huge_logits_and_bf16():
    logits = torch.randn(3, 8, 10) * 1e4  # spreads of ~1e4 after temperature: exp(x - max + 50) underflows
    q = sinkhorn_knopp(logits)
    assert torch.isfinite(q).all()
    assert torch.allclose(q.sum(-1), torch.ones(3, 8), atol=1e-5)
    qb = sinkhorn_knopp(torch.randn(3, 8, 10).bfloat16() * 50)
    assert qb.dtype == torch.float32 and torch.isfinite(qb).all()
    assert torch.allclose(qb.sum(-1), torch.ones(3, 8), atol=1e-5)


def test_collapsed_logits_are_spread_out():
    # every token prefers prototype 0: softmax would collapse, balancing puts the others to use
    logits = torch.randn(16, 2, 4) * 0.5
    logits[..., 0] += 5.0
    assert torch.softmax(logits, -1).argmax(-1).unique().numel() == 1
    q = teacher_targets(logits, temperature=1.0, n_iter=3)
    assert q.argmax(-1).unique().numel() == 4


@pytest.mark.parametrize("positionwise", [True, False])
def test_teacher_targets_shape_and_temperature(positionwise):
    logits = torch.randn(4, 6, 12)
    q = teacher_targets(logits, temperature=0.06, positionwise=positionwise)
    assert q.shape == logits.shape
    sharp = teacher_targets(logits, temperature=0.01, positionwise=positionwise)
    ent = lambda p: -(p * p.clamp_min(1e-12).log()).sum(-1).mean()  # noqa: E731
    assert ent(sharp) < ent(q)


def test_potentials_and_eager_forms_agree():
    from capi_lab.sinkhorn import sinkhorn_eager, sinkhorn_potentials

    z = torch.randn(6, 5, 12) * 4
    log_u, log_v = sinkhorn_potentials(z, 3)
    assert torch.allclose(torch.exp(z + log_u + log_v), sinkhorn_eager(z, 3), atol=1e-6)
    # both equal the spec's plain alternating normalisation of exp(z - max + 50)
    q = torch.exp(z - z.amax(0, keepdim=True) + 50)
    for _ in range(3):
        q = q / q.sum(0, keepdim=True)
        q = q / q.sum(2, keepdim=True)
    assert torch.allclose(sinkhorn_eager(z, 3), q, atol=1e-6)


@pytest.mark.parametrize("n_iter", [1, 2, 3, 5])
def test_potentials_stay_exact_and_finite_on_extreme_logits(n_iter):
    """The single-pass later iterations (previous scalings as stabiliser) against float64 log-space
    Sinkhorn with a max in every step, on logits spread far past where exp(z - max + 50) breaks."""
    from capi_lab.sinkhorn import sinkhorn_potentials

    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 3, 64, generator=g) * 60
    z[3] -= 600  # an image dominated in every prototype column
    z[:, :, 7] -= 600  # a prototype nobody wants
    log_u, log_v = sinkhorn_potentials(z, n_iter)
    q = torch.exp(z + log_u + log_v)
    ref = z.double()
    for _ in range(n_iter):
        ref = ref - torch.logsumexp(ref, 0, keepdim=True)
        ref = ref - torch.logsumexp(ref, 2, keepdim=True)
    assert torch.isfinite(q).all()
    assert torch.allclose(q.double(), ref.exp(), atol=5e-5)  # fp32 rounding of logits ~600
    assert torch.allclose(q.sum(2), torch.ones(16, 3), atol=1e-4)


@pytest.mark.parametrize("chunk", [7, 1 << 19])
def test_eager_form_in_blocks_is_exact_on_extreme_logits_and_leaves_its_input(monkeypatch, chunk):
    """The eager form (in place, its log-sum-exp over images a block of images at a time) against float64
    log-space Sinkhorn, on the logits that break exp(z - max + 50), with blocks of one image and with none;
    the caller's logits are left as they were and the result carries no gradient."""
    import capi_lab.sinkhorn as sk

    monkeypatch.setattr(sk, "CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 3, 64, generator=g) * 60
    z[3] -= 600
    z[:, :, 7] -= 600
    z.requires_grad_()
    before = z.detach().clone()
    q = sk.sinkhorn_eager(z, 3)
    ref = z.detach().double()
    for _ in range(3):
        ref = ref - torch.logsumexp(ref, 0, keepdim=True)
        ref = ref - torch.logsumexp(ref, 2, keepdim=True)
    assert torch.isfinite(q).all() and not q.requires_grad
    assert torch.allclose(q.double(), ref.exp(), atol=5e-5)
    assert torch.equal(z.detach(), before)
    flat = sk.teacher_targets(z.detach() * 0.06, 0.06, positionwise=False)  # one position: blocks of tokens
    ref = z.detach().double().reshape(48, 1, 64)
    for _ in range(3):
        ref = ref - torch.logsumexp(ref, 0, keepdim=True)
        ref = ref - torch.logsumexp(ref, 2, keepdim=True)
    assert torch.allclose(flat.double(), ref.exp().view(16, 3, 64), atol=5e-5)
    assert not sk.teacher_targets(z, 1.0).requires_grad and z.grad is None


@pytest.mark.parametrize("chunk", [5, 1 << 19])
def test_eager_clustering_outputs_equal_the_autograd_form(monkeypatch, chunk):
    """Eager steps compute the clustering loss and entropy in blocks of rows with a hand-written gradient;
    loss, entropy and the gradient into the logits equal the plain autograd form (float64: gradcheck too),
    and bf16 logits get a bf16 gradient."""
    import torch.nn.functional as F

    import capi_lab.sinkhorn as sk
    from capi_lab.losses import _EagerClusteringLoss, clustering_outputs

    monkeypatch.setattr(sk, "CHUNK", chunk)
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, 6, 32, generator=g, dtype=torch.float64) * 3).requires_grad_()
    out = clustering_outputs(logits, None, 0.06, 0.12)
    q = out.targets
    ref_loss = -(q * F.log_softmax(logits / 0.12, dim=-1)).sum(-1).mean()
    assert torch.allclose(out.clustering_loss, ref_loss, rtol=1e-12)
    assert torch.allclose(out.target_entropy, -torch.special.xlogy(q, q).sum(-1).mean(), rtol=1e-6)
    (grad,) = torch.autograd.grad(out.clustering_loss * 3, logits)
    (ref_grad,) = torch.autograd.grad(ref_loss * 3, logits)
    assert torch.allclose(grad, ref_grad, rtol=1e-10, atol=1e-14)
    assert torch.autograd.gradcheck(lambda x: _EagerClusteringLoss.apply(x, q, 0.12), (logits,))
    half = logits.detach().bfloat16().requires_grad_()
    loss = _EagerClusteringLoss.apply(half, q.float(), 0.12)
    loss.backward()
    assert half.grad.dtype == torch.bfloat16 and torch.isfinite(half.grad).all()


def _spec_layout(z, positionwise):
    """``[images, positions, K]`` -> the reference's ``[positions, images, K]`` (the standard variant: one axis)."""
    b, n, k = z.shape
    return z.transpose(0, 1) if positionwise else z.reshape(1, b * n, k)


def _from_spec_layout(q, shape, positionwise):
    return q.transpose(0, 1) if positionwise else q.reshape(shape)


@pytest.mark.parametrize("impl", ["eager", "potentials"])
@pytest.mark.parametrize("positionwise", [True, False])
@pytest.mark.parametrize("case", ["usual", "large", "bf16"])
def test_every_implementation_matches_the_spec_form(impl, positionwise, case):
    """Each implementation against sinkhorn_reference (the spec's loop): usual scores, large ones (spreads of ~120
    after the temperature, as the clustering head's cosine scores / 0.06 give) and bf16 logits."""
    from capi_lab.sinkhorn import sinkhorn_reference

    scale = {"usual": 0.2, "large": 1.2, "bf16": 0.2}[case]
    logits = torch.randn(12, 7, 33) * scale
    if case == "bf16":
        logits = logits.bfloat16()
    want = sinkhorn_reference(_spec_layout(logits.float() / 0.06, positionwise), 3)
    want = _from_spec_layout(want, logits.shape, positionwise)
    got = teacher_targets(logits, 0.06, 3, positionwise, impl=impl)
    assert got.dtype == torch.float32 and torch.isfinite(want).all()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()


def test_implementations_are_chosen_explicitly():
    from capi_lab.kernels import fused_clustering
    from capi_lab.sinkhorn import IMPLS, default_impl

    assert default_impl("cpu", compiled=False) == "eager" and default_impl("cpu", compiled=True) == "potentials"
    assert default_impl("cuda", compiled=False) == ("fused" if fused_clustering.ENABLED else "eager")
    assert set(IMPLS) == {"eager", "potentials", "fused"}
    with pytest.raises(ValueError, match="unknown Sinkhorn implementation 'exp'"):
        teacher_targets(torch.randn(2, 3, 4), impl="exp")
    with pytest.raises(ValueError, match="clustering_outputs"):
        teacher_targets(torch.randn(2, 3, 4), impl="fused")


@pytest.mark.parametrize("impl", ["eager", "potentials", "fused"])
def test_zero_iterations_is_the_unbalanced_softmax(impl):
    """``sinkhorn_iters=0`` (the collapse ablation): the targets are the head's softmax at the target temperature,
    whatever the implementation asked for (the fused kernels hand it to the eager form)."""
    from capi_lab.losses import clustering_outputs

    logits = torch.randn(3, 5, 8)
    logits[..., 0] += 2.0  # one favoured prototype, which balancing would have pushed back
    out = clustering_outputs(logits, None, 0.06, 0.12, 0, True, impl)
    torch.testing.assert_close(out.targets, torch.softmax(logits / 0.06, -1))
    balanced = clustering_outputs(logits, None, 0.06, 0.12, 3, True, "eager" if impl == "fused" else impl)
    assert out.targets[..., 0].mean() > 2 * balanced.targets[..., 0].mean()
