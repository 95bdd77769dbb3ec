import math

import pytest
import torch

import capi_lab
from capi_lab.optim import param_groups, set_hparams
from capi_lab.schedules import Schedules, warmup_cosine


def test_warmup_cosine_known_values():
    kw = dict(total_steps=110, start=0.0, peak=1.0, end=0.0, warmup_steps=10)
    assert warmup_cosine(0, **kw) == 0.0
    assert warmup_cosine(5, **kw) == pytest.approx(0.5)
    assert warmup_cosine(10, **kw) == pytest.approx(1.0)
    # untruncated: halfway through the decay the cosine is at the midpoint, at the end it is 0
    assert warmup_cosine(60, **kw) == pytest.approx(0.5)
    assert warmup_cosine(110, **kw) == pytest.approx(0.0, abs=1e-12)
    # truncated at 0.8 of the period: ends at (1 + cos(0.8 pi)) / 2 ~ 0.0955, not 0
    assert warmup_cosine(110, **kw, truncate=0.8) == pytest.approx((1 + math.cos(0.8 * math.pi)) / 2)
    assert warmup_cosine(60, **kw, truncate=0.8) == pytest.approx((1 + math.cos(0.4 * math.pi)) / 2)


def test_schedules_follow_run_length():
    s = Schedules(total_steps=1000, lr=1e-3)
    assert s.warmup_steps == 100
    assert s.lr_at(0) == 0.0 and s.lr_at(100) == pytest.approx(1e-3)
    assert s.clustering_lr_at(100) == pytest.approx(5e-4)
    assert s.lr_at(999) == pytest.approx(1e-3 * (1 + math.cos(0.8 * math.pi * 899 / 900)) / 2)
    # teacher momentum: 1.0 -> 0.999 in warmup, then back up towards 1
    assert s.momentum_at(0) == 1.0
    assert s.momentum_at(100) == pytest.approx(0.999)
    assert s.momentum_at(50) == pytest.approx(0.9995)
    assert 0.999 < s.momentum_at(999) < 1.0
    assert s.momentum_at(999) == pytest.approx(1 - 0.001 * (1 + math.cos(0.8 * math.pi * 899 / 900)) / 2)
    short = Schedules(total_steps=20, lr=1.0)  # a short run still warms up and decays
    assert short.warmup_steps == 2 and short.lr_at(2) == 1.0 and short.lr_at(19) < 0.2


def test_param_groups_multipliers():
    model = capi_lab.create_model("tiny", embed_dim=32, num_heads=2, depth=1, pred_depth=1, num_prototypes=8)
    groups = param_groups({"backbone": model.backbone, "head": model.head})
    where = {name: (g["lr_mult"], g["wd_mult"]) for g in groups for name in g["names"]}
    assert where["backbone.patch_embed.weight"] == (0.2, 1.0)
    assert where["backbone.patch_embed.bias"] == (0.2, 0.0)
    assert where["backbone.encoder.blocks.0.residual1.fn.rope.freqs"] == (0.0, 0.0)
    assert where["backbone.encoder.blocks.0.residual1.norm.weight"] == (1.0, 0.1)
    assert where["backbone.encoder.blocks.0.residual1.fn.q_proj.weight"] == (1.0, 1.0)
    assert where["backbone.registers"] == (1.0, 1.0)
    assert where["head.last_layer.weight_v"] == (1.0, 1.0)
    assert not model.backbone.encoder.blocks[0].residual1.fn.rope.freqs.requires_grad
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(model.backbone.parameters())) + len(list(model.head.parameters()))
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups])
    set_hparams(opt, lr=1e-3, weight_decay=0.1)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_mult"]) and g["weight_decay"] == pytest.approx(0.1 * g["wd_mult"])


def test_rope_tables_stay_fixed_under_training():
    model = capi_lab.create_model("tiny", embed_dim=32, num_heads=2, depth=1, pred_depth=1, num_prototypes=8)
    groups = param_groups({"backbone": model.backbone})
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups])
    set_hparams(opt, 1e-2, 0.1)
    freqs = model.backbone.encoder.blocks[0].residual1.fn.rope.freqs.clone()
    g, _, f = model(torch.randn(2, 3, 16, 16))
    (g.sum() + f.sum()).backward()
    opt.step()
    assert torch.equal(model.backbone.encoder.blocks[0].residual1.fn.rope.freqs, freqs)
