import pickle

import pytest
import torch

import capi_lab
from capi_lab.pretrained import (
    CheckpointError,
    architecture_from_state_dict,
    export_authors_state_dict,
    load_pretrained,
    model_state,
    published_path,
)
from tests.reference_capi import reference_forward

SMALL = dict(embed_dim=64, depth=2, num_heads=4, pred_depth=2, num_registers=8, num_prototypes=32)


def _authors_file(tmp_path, **overrides):
    model = capi_lab.create_model("tiny", **{**SMALL, **overrides})
    sd = export_authors_state_dict(model)
    sd["head.some_authors_head.weight"] = torch.randn(3, 3)  # extra keys are ignored, as by the authors' loader
    path = tmp_path / "authors.pth"
    torch.save(sd, path)
    return model, sd, path


@pytest.mark.parametrize("size", [(28, 28), (20, 36), (36, 12)])
@pytest.mark.parametrize("layout", ["capi", "rotation"])
def test_loaded_authors_checkpoint_matches_reference(tmp_path, size, layout):
    _, sd, path = _authors_file(tmp_path, rope_layout=layout)
    model = load_pretrained(path)
    assert not model.training
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = model(images)
    ref = reference_forward(sd, images)
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape
        assert (a.double() - b).abs().max() < 1e-4


def test_parity_at_224_with_vit_shapes(tmp_path):
    # a narrow ViT/14 at 224 px, 16 registers: the published geometry at reduced width and depth
    model = capi_lab.create_model(
        "vit_l14", embed_dim=64, num_heads=4, depth=2, pred_depth=1, num_prototypes=16, drop_path_rate=0.0
    )
    path = tmp_path / "l14.pth"
    capi_lab.save_authors_checkpoint(model, path)
    loaded = load_pretrained(path)
    images = torch.randn(1, 3, 224, 224)
    ref = reference_forward(torch.load(path, weights_only=True), images)
    with torch.no_grad():
        ours = loaded(images)
    assert ours[2].shape == (1, 16, 16, 64) and ours[1].shape == (1, 16, 64)
    assert max((a.double() - b).abs().max().item() for a, b in zip(ours, ref, strict=True)) < 1e-4


def test_architecture_read_off_shapes(tmp_path):
    model, sd, _ = _authors_file(tmp_path, pred_dim=96, pred_heads=4, mlp_ratio=2.0)
    cfg = architecture_from_state_dict({k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")})
    want = model.config
    for f in ("patch_size", "embed_dim", "depth", "num_heads", "pred_depth", "num_registers", "rope_layout"):
        assert getattr(cfg, f) == getattr(want, f), f
    assert cfg.dim_pred == 96 and cfg.heads_pred == 4 and cfg.mlp_ratio == 2.0
    assert cfg.rope_max_freq == pytest.approx(7.0) and cfg.rope_min_freq == pytest.approx(7e-4, rel=1e-4)


def test_round_trip_authors_layout_is_exact(tmp_path):
    model, sd, path = _authors_file(tmp_path)
    assert all(k.startswith("backbone.") for k in sd if not k.startswith("head."))
    assert "backbone.decoder.blocks.0.residual1.fn.k_proj.weight" in sd
    assert "backbone.encoder.blocks.1.residual2.fn.fc2.weight" in sd
    loaded = load_pretrained(path)
    again = export_authors_state_dict(loaded)
    original = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    assert again.keys() == original.keys()
    assert all(torch.equal(again[k], original[k]) for k in original)


def test_heads_travel_when_asked(tmp_path):
    model = capi_lab.create_model("tiny", **SMALL)
    path = capi_lab.save_authors_checkpoint(model, tmp_path / "with_heads.pth", include_heads=True)
    loaded = load_pretrained(path)
    assert loaded.head is not None and loaded.clustering_head is not None
    assert torch.equal(loaded.clustering_head.linear.weight, model.clustering_head.linear.weight)
    assert torch.equal(loaded.head.last_layer.weight_v, model.head.last_layer.weight_v)
    # backbone-only files (the published ones) load without heads
    plain = load_pretrained(capi_lab.save_authors_checkpoint(model, tmp_path / "plain.pth"))
    assert plain.head is None and plain.clustering_head is None
    with pytest.raises(RuntimeError, match="no clustering head"):
        plain.cluster_logits(torch.randn(1, 3, 28, 28))


def test_capi_lab_model_file_round_trip(tmp_path):
    model = capi_lab.create_model("tiny", **SMALL).eval()
    path = tmp_path / "model.pt"
    torch.save(model_state(model), path)
    loaded = load_pretrained(path)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x), strict=True):
            assert torch.equal(a, b)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    _, sd, _ = _authors_file(tmp_path)
    broken = dict(sd)
    del broken["backbone.encoder.blocks.1.residual1.fn.v_proj.weight"]
    broken["backbone.encoder.blocks.0.residual1.fn.qkv.weight"] = torch.zeros(3)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \['encoder.blocks.1.residual1.fn.v_proj.weight'\]") as e:
        load_pretrained(tmp_path / "broken.pth")
    assert "encoder.blocks.0.residual1.fn.qkv.weight" in str(e.value)
    wrong = dict(sd)
    wrong["backbone.encoder.blocks.1.residual2.fn.fc1.weight"] = torch.zeros(7, 64)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_pretrained(tmp_path / "wrong.pth")


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        load_pretrained(tmp_path / "empty.pth")
    (tmp_path / "text.pth").write_text("hello, I am not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_pretrained(tmp_path / "text.pth")
    _, _, path = _authors_file(tmp_path)
    data = path.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_pretrained(tmp_path / "truncated.pth")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="neither an authors' CAPI state dict"):
        load_pretrained(tmp_path / "other.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_pretrained(tmp_path / "list.pth")


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_loading_never_executes_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"backbone.x": _Evil()}, f)
    torch.save({"backbone.registers": _Evil()}, tmp_path / "evil2.pth")
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(CheckpointError):
            load_pretrained(tmp_path / name)
    assert not (tmp_path / "PWNED").exists()


def test_published_name_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(CheckpointError) as e:
        load_pretrained("capi_vitl14_in1k")
    msg = str(e.value)
    assert str(published_path("capi_vitl14_in1k")) in msg and "capi_vitl14_in1k.pth" in msg
    assert str(tmp_path / "torch_home") in msg


def test_published_name_uses_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    model = capi_lab.create_model("tiny", **SMALL)
    dst = published_path("capi_vitl14_lvd")
    dst.parent.mkdir(parents=True)
    capi_lab.save_authors_checkpoint(model, dst)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not download"))
    loaded = load_pretrained("capi_vitl14_lvd")
    assert torch.equal(loaded.backbone.registers, model.backbone.registers)
