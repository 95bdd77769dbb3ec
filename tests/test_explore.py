"""capi_lab.explore without a model: PCA, pictures, sizes, patch lookups (the views on a model are tested through
the app in test_app.py)."""

import numpy as np
import pytest
import torch
from PIL import Image

from capi_lab.explore import EXAMPLES_DIR, InputError, example_photos, fit_size, load_images, patch_at
from capi_lab.explore.pca import pca_basis, pca_rgb
from capi_lab.explore.render import blend, colorize, diverging, mark_patch, mosaic, palette, row, upscale


def test_pca_basis_finds_the_directions_of_largest_variance():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([10.0, 3.0, 1.0, 0.1, 0.1])
    rotation, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    x = (torch.randn(4000, 5, generator=g) * scales) @ rotation.T + 7.0
    mean, comps, ratio = pca_basis(x, k=3)
    assert torch.allclose(mean, x.mean(0), atol=1e-4)
    assert torch.allclose(comps @ comps.T, torch.eye(3), atol=1e-5)  # orthonormal
    overlap = (comps @ rotation[:, :3]).abs()  # component i is the i-th axis, up to sign
    assert torch.all(overlap.diagonal() > 0.99)
    expected = scales[:3] ** 2 / (scales**2).sum()
    assert torch.allclose(ratio, expected, rtol=0.1) and bool(torch.all(ratio[:-1] >= ratio[1:]))
    # sign-fixed: the largest-magnitude entry of each component is positive, so -x gives the same basis
    assert torch.all(comps.gather(1, comps.abs().argmax(1, keepdim=True)) > 0)
    assert torch.allclose(pca_basis(-x, k=3)[1], comps, atol=1e-5)


def test_joint_pca_gives_the_same_colour_to_the_same_feature_in_every_map():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 5, 16, generator=g), torch.randn(3, 6, 16, generator=g)
    b[1, 2] = a[0, 3]  # one feature shared by both maps
    ra, rb = pca_rgb([a, b], joint=True)
    assert ra.shape == (4, 5, 3) and rb.shape == (3, 6, 3)
    assert float(ra.min()) >= 0 and float(ra.max()) <= 1
    assert torch.allclose(ra[0, 3], rb[1, 2])
    sa, sb = pca_rgb([a, b], joint=False)  # each map on its own basis: the shared feature differs
    assert not torch.allclose(sa[0, 3], sb[1, 2])


def test_fit_size_keeps_the_aspect_on_the_patch_grid():
    for w, h, res, p in [(640, 480, 224, 16), (480, 640, 224, 14), (5000, 50, 128, 8), (33, 33, 64, 8)]:
        W, H = fit_size(w, h, res, p)
        assert W % p == 0 and H % p == 0 and p <= W and p <= H
        assert max(W, H) == res // p * p
        if min(W, H) > p:  # not clamped to one patch: the aspect is kept to within a patch
            assert abs(W / H - w / h) <= (w / h) * 2 * p / min(W, H)
    with pytest.raises(InputError, match="below the patch size"):
        fit_size(100, 100, 8, 16)


def test_patch_at_maps_pixels_to_their_patch_and_clamps():
    grid, size = (4, 6), (60, 40)  # 6 columns of 10 px, 4 rows of 10 px
    assert patch_at(grid, size, 0, 0) == (0, 0)
    assert patch_at(grid, size, 59.9, 39.9) == (3, 5)
    assert patch_at(grid, size, 25, 15) == (1, 2)
    assert patch_at(grid, size, -5, 1000) == (3, 0)


def test_pictures_have_the_sizes_and_colours_asked_for():
    grid = np.zeros((2, 3, 3))
    grid[0, 0] = 1.0
    big = upscale(grid, (30, 20))
    assert big.size == (30, 20) and big.getpixel((0, 0)) == (255, 255, 255) and big.getpixel((29, 19)) == (0, 0, 0)
    values = np.array([[0.0, 0.5], [1.0, np.nan]])
    c = colorize(values)
    assert c.dtype == np.uint8 and c.shape == (2, 2, 3) and not np.array_equal(c[0, 0], c[1, 0])
    d = diverging(np.array([[-2.0, 0.0, 2.0]]))
    assert d[0, 0, 2] > d[0, 0, 0] and d[0, 2, 0] > d[0, 2, 2] and d[0, 1].min() > 200  # blue, white, red
    colours = palette([(5, 100), (2, 50)], 8)
    assert colours.shape == (8, 3) and len({tuple(c) for c in colours}) == 8
    photo = Image.new("RGB", (30, 20), (0, 0, 0))
    mixed = blend(photo, np.ones((2, 3, 3)), alpha=0.5)
    assert abs(mixed.getpixel((5, 5))[0] - 128) <= 1
    wide = row([photo, Image.new("RGB", (10, 40))], pad=4)
    assert wide.size == (44, 40)
    assert mosaic([photo] * 5, columns=2, pad=2).size == (62, 64)
    marked = mark_patch(photo, (2, 3), 1, 2, color=(0, 255, 255))
    assert marked.getpixel((20, 10)) == (0, 255, 255) and marked.getpixel((5, 5)) == (0, 0, 0)


def test_example_photos_are_package_data_and_load(tmp_path):
    photos = example_photos()
    assert len(photos) == 7 and all(p.parent == EXAMPLES_DIR and p.is_file() for p in photos)
    loaded, problems = load_images([*photos[:2], tmp_path / "missing.jpg"])
    assert len(loaded) == 2 and len(problems) == 1 and "missing.jpg" in problems[0]
