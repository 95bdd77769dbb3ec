import copy

import pytest
import torch

import capi_lab
from capi_lab.config import PRESETS, ConfigError, MaskConfig
from capi_lab.losses import student_step, teacher_step
from capi_lab.masking import sample_masks
from capi_lab.optim import ema_update_

SMALL = dict(embed_dim=32, depth=2, num_heads=2, pred_depth=1, num_registers=4, num_prototypes=16)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_forward_backward_at_reduced_size(preset):
    model = capi_lab.create_model(preset, **SMALL)
    p = model.patch_size
    x = torch.randn(2, 3, 4 * p, 3 * p)
    g, r, f = model(x)
    assert g.shape == (2, 32) and r.shape == (2, 4, 32) and f.shape == (2, 4, 3, 32)
    (g.sum() + f.sum()).backward()
    grads = [q.grad for q in model.backbone.parameters() if q.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)


def test_tiny_preset_geometry():
    cfg = capi_lab.get_preset("tiny")
    assert cfg.image_size % cfg.model.patch_size == 0
    l14 = capi_lab.get_preset("vit_l14")
    m = l14.model
    assert (m.depth, m.pred_depth, m.embed_dim, m.num_heads, m.patch_size, m.num_prototypes) == (
        24,
        12,
        1024,
        16,
        14,
        16384,
    )
    assert m.drop_path_rate == 0.2 and m.num_registers == 16
    assert l14.mask.strategy == "inverse_block" and l14.mask.roll and l14.mask.ratio == 0.65


def test_unknown_preset_and_bad_override():
    with pytest.raises(ConfigError, match="unknown preset 'vit_h99'.*tiny"):
        capi_lab.create_model("vit_h99")
    with pytest.raises(ConfigError, match="not divisible"):
        capi_lab.create_model("tiny", embed_dim=130)
    with pytest.raises(ConfigError, match="unknown config field"):
        capi_lab.create_model("tiny", embedding_size=3)


def test_bad_images_are_named():
    model = capi_lab.create_model("tiny", **SMALL)
    with pytest.raises(
        ValueError, match="height 30 is not a multiple of the patch size 4; resize or crop it to 28 or 32"
    ):
        model(torch.randn(1, 3, 30, 28))
    with pytest.raises(ValueError, match=r"shape \[B, 3, H, W\], got shape \[1, 1, 28, 28\]"):
        model(torch.randn(1, 1, 28, 28))
    with pytest.raises(ValueError, match="add a batch axis"):
        model(torch.randn(3, 28, 28))
    with pytest.raises(ValueError, match="float images"):
        model(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))


def test_non_square_feature_map_matches_patches():
    model = capi_lab.create_model("tiny", **SMALL).eval()
    x = torch.randn(1, 3, 12, 40)
    _, _, f = model(x)
    assert f.shape[1:3] == (3, 10)
    # a patch's feature depends on its content: changing one patch changes its own token most
    x2 = x.clone()
    x2[..., 4:8, 16:20] += 3
    _, _, f2 = model(x2)
    diff = (f2 - f).norm(dim=-1)[0]
    assert diff.argmax().item() == 1 * 10 + 4


def test_visible_only_encoding_equals_gathering_when_everything_is_visible():
    model = capi_lab.create_model("tiny", **SMALL).eval()
    x = torch.randn(2, 3, 16, 16)
    full = model.backbone.encode(x)
    idx = torch.arange(2 * 16)
    part = model.backbone.encode(x, idx)
    assert torch.allclose(full.tokens, part.tokens, atol=1e-6)


def test_predictor_queries_are_independent():
    model = capi_lab.create_model("tiny", **SMALL).eval()
    x = torch.randn(1, 3, 16, 16)
    ctx = model.backbone.encode(x, torch.arange(0, 8))
    all_pred = model.backbone.predict(ctx, torch.arange(8, 16))
    one = model.backbone.predict(ctx, torch.tensor([11]))
    assert torch.allclose(all_pred[0, 3], one[0, 0], atol=1e-6)


def _setup():
    student = capi_lab.create_model("tiny", **SMALL)
    teacher = copy.deepcopy(student)
    x = torch.randn(4, 3, 16, 16)
    masks = sample_masks(4, 4, 4, MaskConfig(prediction_subsampling=0.5), rng=0)
    return student, teacher, x, masks


def test_student_loss_reaches_student_only():
    student, teacher, x, masks = _setup()
    out = teacher_step(teacher.backbone, teacher.clustering_head, x, masks.predict_indices)
    loss = student_step(student.backbone, student.head, x, masks, out.targets)
    loss.backward()
    assert all(p.grad is None for p in teacher.backbone.parameters())
    assert all(p.grad is None for p in teacher.clustering_head.parameters())
    assert student.head.last_layer.weight_v.grad.abs().sum() > 0
    assert student.backbone.mask_token.grad.abs().sum() > 0
    assert student.backbone.patch_embed.weight.grad.abs().sum() > 0
    assert not out.targets.requires_grad


def test_clustering_loss_reaches_only_the_clustering_head():
    student, teacher, x, _ = _setup()
    out = teacher_step(teacher.backbone, teacher.clustering_head, x)
    out.clustering_loss.backward()
    assert teacher.clustering_head.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.backbone.parameters())
    assert all(p.grad is None for p in student.parameters())


def test_ema_momentum_one_is_a_no_op_and_zero_copies():
    student, teacher, _, _ = _setup()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.parameters()]
    ema_update_(teacher.parameters(), student.parameters(), 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    ema_update_(teacher.parameters(), student.parameters(), 0.9)
    for a, b, s in zip(before, teacher.parameters(), student.parameters(), strict=True):
        assert torch.allclose(b, 0.9 * a + 0.1 * s, atol=1e-6)
    ema_update_(teacher.parameters(), student.parameters(), 0.0)
    assert all(torch.equal(b, s) for b, s in zip(teacher.parameters(), student.parameters(), strict=True))


def test_stochastic_depth_drops_whole_samples_and_is_off_in_eval():
    model = capi_lab.create_model("tiny", **{**SMALL, "drop_path_rate": 0.5})
    block = model.backbone.encoder.blocks[0]
    x = torch.randn(8, 5, 32)
    coords = torch.rand(8, 5, 2)
    block.train()
    torch.manual_seed(0)
    y = block.residual1(x, coords=coords)
    unchanged = [(y[i] == x[i]).all().item() for i in range(8)]
    assert sum(unchanged) == 4  # int(8 * (1 - 0.5)) samples keep the branch, the rest skip it
    kept = [i for i in range(8) if not unchanged[i]]
    block.eval()
    ref = block.residual1(x, coords=coords)
    for i in kept:  # kept samples get the branch scaled by b / keep = 2
        assert torch.allclose(y[i] - x[i], 2 * (ref[i] - x[i]), atol=1e-5)
    assert torch.equal(block.residual1(x, coords=coords), ref)


def test_given_permutation_decides_the_kept_samples():
    """A block's branch keeps exactly the head of the permutation it is handed (what a stack draws once)."""
    model = capi_lab.create_model("tiny", **{**SMALL, "drop_path_rate": 0.5}).train()
    block = model.backbone.encoder.blocks[0]
    x, coords = torch.randn(8, 5, 32), torch.rand(8, 5, 2)
    perm = torch.tensor([[5, 2, 7, 0, 1, 3, 4, 6], [2, 0, 7, 5, 6, 4, 3, 1]])
    inv = torch.argsort(perm, dim=1)
    y = block.residual1(x, (perm[0], inv[0]), coords=coords)
    assert [i for i in range(8) if not torch.equal(y[i], x[i])] == [0, 2, 5, 7]
    # the whole block: both branches keep {0, 2, 5, 7} (perm[1] orders them differently); the rest pass unchanged
    z = block(x, coords, drops=(perm, inv))
    assert [i for i in range(8) if torch.equal(z[i], x[i])] == [1, 3, 4, 6]


def test_random_permutations_are_uniform_and_inverted():
    from capi_lab.model.block import draw_drops, random_permutations

    torch.manual_seed(0)
    perm, inv = random_permutations(4000, 8)
    assert torch.equal(perm.sort(dim=1).values, torch.arange(8).expand(4000, 8))
    assert torch.equal(perm.gather(1, inv), torch.arange(8).expand(4000, 8))
    kept = torch.zeros(8)
    kept.scatter_add_(0, perm[:, :3].flatten(), torch.ones(3 * 4000))
    assert torch.allclose(kept / 4000, torch.full((8,), 3 / 8), atol=0.04)  # every sample kept 3/8 of the time
    first = torch.bincount(perm[:, 0], minlength=8) / 4000
    assert torch.allclose(first, torch.full((8,), 1 / 8), atol=0.03)
    # a stack draws one permutation pair per block, different across blocks, and none in eval or without drop
    model = capi_lab.create_model("tiny", **{**SMALL, "drop_path_rate": 0.5}).train()
    drops = draw_drops(model.backbone.encoder.blocks, 64, torch.device("cpu"))
    assert len(drops) == len(model.backbone.encoder.blocks) and not torch.equal(drops[0][0], drops[1][0])
    assert draw_drops(model.eval().backbone.encoder.blocks, 64, torch.device("cpu"))[0] is None
    no_drop = capi_lab.create_model("tiny", **SMALL).train()
    assert draw_drops(no_drop.backbone.encoder.blocks, 64, torch.device("cpu"))[0] is None


def test_no_biases_except_patch_embed_and_clustering_head():
    model = capi_lab.create_model("tiny", **SMALL)
    biases = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert biases == ["backbone.patch_embed.bias", "clustering_head.linear.bias"]


def test_no_nans_in_training_mode_bf16_autocast():
    model = capi_lab.create_model("tiny", **SMALL)
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g, r, f = model(x)
    assert all(torch.isfinite(t.float()).all() for t in (g, r, f))


def test_teacher_step_outputs_agree_with_full_targets():
    from capi_lab.sinkhorn import teacher_targets

    _, teacher, x, masks = _setup()
    full = teacher_step(teacher.backbone, teacher.clustering_head, x)
    part = teacher_step(teacher.backbone, teacher.clustering_head, x, masks.predict_indices)
    q = full.targets
    assert q.shape == (4, 16, 16) and torch.allclose(q.sum(-1), torch.ones(4, 16), atol=1e-5)
    feats = teacher.patch_features(x)
    assert torch.allclose(q, teacher_targets(teacher.clustering_head(feats)), atol=1e-6)
    assert torch.equal(part.targets, q.flatten(0, 1)[masks.predict_indices].view(4, -1, 16))
    assert torch.equal(full.assignments, q.argmax(-1))
    assert torch.allclose(full.target_entropy, -(q * q.log()).sum(-1).mean(), atol=1e-5)
    logp = torch.log_softmax(teacher.clustering_head(feats) / 0.12, -1)
    assert torch.allclose(full.clustering_loss, -(q * logp).sum(-1).mean(), atol=1e-5)
