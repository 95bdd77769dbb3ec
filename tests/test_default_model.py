"""The embedded default model (capi_lab/weights/default.pt) and its model card."""

import numpy as np
import pytest
import torch
from PIL import Image

import capi_lab
from capi_lab import pretrained
from capi_lab.data import demo_photos, eval_transform
from capi_lab.explore.pca import pca_basis, pca_rgb

WEIGHTS = pretrained.DEFAULT_MODEL.parent


def test_default_model_loads_with_provenance():
    assert pretrained.DEFAULT_MODEL.stat().st_size <= 25 * 2**20
    model = capi_lab.load_pretrained("default")
    assert not model.training and model.head is not None and model.clustering_head is not None
    assert model.image_size == 64 and model.patch_size == 8
    for key in ("command", "train_command", "steps", "train_seconds", "hardware", "data", "final_metrics"):
        assert key in model.meta, key
    assert "--preset default" in model.meta["train_command"]


def test_default_model_card_and_pictures():
    card = (WEIGHTS / "MODEL_CARD.md").read_text()
    for needle in ("python scripts/build_default_model.py", "CC0", "Fashion-MNIST", "default_pca.png", "CPU"):
        assert needle in card, needle
    assert (WEIGHTS / "default_pca.png").stat().st_size > 10_000


def test_default_model_sees_structure_in_a_photo():
    model = capi_lab.load_pretrained("default")
    photo = next(p.path for p in demo_photos() if p.path.stem == "astronaut")
    x = eval_transform(128)(Image.open(photo).convert("RGB"))[None]
    with torch.no_grad():
        _, _, fmap = model(x)
        assignments = model.cluster_logits(x).argmax(-1)
    rgb = pca_rgb([fmap[0]])[0]
    assert rgb.shape == (16, 16, 3) and (rgb.reshape(-1, 3).std(0) > 0.05).all()
    assert assignments.unique().numel() >= 5


def test_missing_default_model_says_how_to_rebuild(monkeypatch, tmp_path):
    monkeypatch.setattr(pretrained, "DEFAULT_MODEL", tmp_path / "default.pt")
    with pytest.raises(pretrained.CheckpointError, match="build_default_model.py"):
        capi_lab.load_pretrained("default")


def test_pca_is_sign_fixed_and_joint():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g) @ torch.randn(8, 8, generator=g)
    _, comps, ratio = pca_basis(x)
    _, comps2, _ = pca_basis(x[torch.randperm(200, generator=g)])
    assert torch.allclose(comps, comps2, atol=1e-4)  # same basis whatever the row order, same signs
    assert (comps.abs().argmax(1) == comps.argmax(1)).all()  # largest loading positive
    # explained-variance ratios: the covariance's largest eigenvalues over its trace
    eig = torch.linalg.eigvalsh(torch.cov(x.double().T)).flip(0)
    assert torch.allclose(ratio.double(), eig[:3] / eig.sum(), atol=1e-5)
    a, b = torch.randn(4, 5, 8, generator=g), torch.randn(3, 6, 8, generator=g)
    ra, rb = pca_rgb([a, b])
    assert ra.shape == (4, 5, 3) and rb.shape == (3, 6, 3)
    assert float(torch.cat([ra.flatten(), rb.flatten()]).min()) >= 0 and float(ra.max()) <= 1
    assert np.allclose(pca_rgb([a, b])[0].numpy(), ra.numpy())


def test_the_build_script_measures_against_a_random_model_of_the_same_shape():
    from scripts import build_default_model as build

    model = capi_lab.load_pretrained("default")
    twin = build.random_twin(model)
    assert twin.config == model.config and twin.image_size == model.image_size
    assert not torch.equal(twin.backbone.patch_embed.weight, model.backbone.patch_embed.weight)
    photos = capi_lab.explore.example_photos()[:2]
    agreement = build.predictor_agreement(model, photos, model.image_size, masks_per_image=2)
    assert agreement["images"] == 2 and agreement["top5"] >= agreement["top1"]
    # the shipped model's predictor names its teacher's cluster far above chance, even on two photos
    assert agreement["top1"] > 3 * agreement["chance_top1"] and agreement["top5"] > 3 * agreement["chance_top5"]
    assert agreement["chance_top5"] == pytest.approx(5 / model.config.num_prototypes)
    assert build.square(Image.new("RGB", (90, 40)), 64).size == (64, 64)


def test_the_model_card_quotes_the_measured_metrics():
    """The card's evaluation figures are those of default_metrics.json (written by the build script)."""
    import json

    metrics = json.loads((WEIGHTS / "default_metrics.json").read_text())
    card = (WEIGHTS / "MODEL_CARD.md").read_text()
    seg = metrics["seg_knn"]
    for value in (
        seg["model"]["miou"],
        seg["random"]["miou"],
        metrics["agreement"]["top1"],
        metrics["agreement"]["top5"],
        metrics["fmnist_knn"]["model"],
        metrics["fmnist_knn"]["random"],
    ):
        assert f"{100 * value:.1f}" in card, value  # fmt: skip
