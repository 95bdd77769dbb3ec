import os

import numpy as np
import pytest
import torch
from PIL import Image

from capi_lab.config import MaskConfig
from capi_lab.data import (
    FASHION_MNIST_DIR,
    DataError,
    MaskCollator,
    PretrainStream,
    StreamSampler,
    demo_photo_paths,
    resolve_source,
)


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray((rng.random((20, 24, 3)) * 255).astype("uint8")).save(tmp_path / f"{i}.png")
    return tmp_path


def _loader(source, workers, start_step=0, rank=0, world=1):
    return torch.utils.data.DataLoader(
        PretrainStream(source, 16, seed=3),
        batch_size=4,
        sampler=StreamSampler(4, rank, world, start_step),
        collate_fn=MaskCollator((4, 4), MaskConfig(prediction_subsampling=0.5), seed=3),
        num_workers=workers,
    )


def test_stream_is_a_function_of_position_whatever_the_workers(folder):
    src = resolve_source(folder)
    it0, it2 = iter(_loader(src, 0)), iter(_loader(src, 2))
    for _ in range(4):  # crosses an epoch boundary (10 images, 4 per batch)
        a, b = next(it0), next(it2)
        assert torch.equal(a.images, b.images) and torch.equal(a.masks.masks, b.masks.masks)
        assert torch.equal(a.masks.predict_indices, b.masks.predict_indices)
    # starting at step 3 gives exactly the 4th batch: resuming mid-epoch
    later = next(iter(_loader(src, 0, start_step=3)))
    assert torch.equal(later.images, a.images) and torch.equal(later.positions, a.positions)


def test_the_loader_pins_every_tensor_the_step_reads(folder, monkeypatch):
    """With ``pin_memory=True`` the DataLoader pins what has a ``pin_memory`` method; a dataclass without one
    would stay in pageable memory, and its copy to the GPU would make the host wait. Pinning needs a GPU, so
    here it is replaced by a recording clone."""
    from torch.utils.data._utils.pin_memory import pin_memory

    batch = next(iter(_loader(resolve_source(folder), 0)))
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a: pinned.append(t) or t.clone())
    out = pin_memory(batch)
    assert type(out) is type(batch) and out.skipped == batch.skipped
    steps_tensors = [batch.images, *batch.masks]
    assert len(pinned) == len(steps_tensors) and all(a is b for a, b in zip(pinned, steps_tensors, strict=True))
    assert torch.equal(out.images, batch.images) and torch.equal(out.masks.predict_indices, batch.masks.predict_indices)


def test_device_batches_are_the_loaders_batches_in_order(folder):
    """``DeviceBatches`` (the training loop's copy to the device, on a side stream on CUDA) changes nothing
    about which batches come: the same tensors in the same order as the loader, on the device."""
    from lightning.fabric import Fabric

    from capi_lab.loader import DeviceBatches

    src = resolve_source(folder)
    fabric = Fabric(accelerator="cuda" if torch.cuda.is_available() else "cpu", devices=1)
    plain, copied = iter(_loader(src, 0)), DeviceBatches(iter(_loader(src, 0)), fabric)
    for _ in range(4):
        a, b = next(plain), next(copied)
        assert b.images.device == fabric.device and b.masks.visible_indices.device == fabric.device
        assert torch.equal(a.images, b.images.cpu()) and torch.equal(a.positions, b.positions)
        assert all(torch.equal(x, y.cpu()) for x, y in zip(a.masks, b.masks, strict=True))


def test_epochs_are_permutations_and_ranks_disjoint(folder):
    src = resolve_source(folder)
    stream = PretrainStream(src, 16, seed=0)
    first = [stream._index(p) for p in range(10)]
    second = [stream._index(p) for p in range(10, 20)]
    assert sorted(first) == list(range(10)) == sorted(second) and first != second
    r0 = next(iter(_loader(src, 0, rank=0, world=2))).positions.tolist()
    r1 = next(iter(_loader(src, 0, rank=1, world=2))).positions.tolist()
    assert r0 == [0, 1, 2, 3] and r1 == [4, 5, 6, 7]


def test_demo_photos_are_real_photos():
    paths = demo_photo_paths()
    assert len(paths) >= 15
    src = resolve_source("demo-photos")
    img = src.load(0)
    assert img.mode == "RGB" and min(img.size) >= 200


def test_fashion_mnist_from_the_debian_package():
    if not FASHION_MNIST_DIR.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{FASHION_MNIST_DIR} is missing: .ci/run installs dataset-fashion-mnist")
        pytest.skip("Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
    train, test = resolve_source("fashion-mnist"), resolve_source("fashion-mnist:test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.images.shape == (60000, 28, 28) and set(np.unique(test.labels)) == set(range(10))
    assert train.load(0).size == (28, 28) and train.load(0).mode == "RGB"
    with pytest.raises(DataError, match="split"):
        resolve_source("fashion-mnist:val")


def test_list_file_relative_paths(folder):
    (folder / "list.txt").write_text("# my images\n0.png\n\n3.png\n")
    src = resolve_source(folder / "list.txt")
    assert len(src) == 2 and src.load(1).size == (24, 20)
    (folder / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(DataError, match="names no images"):
        resolve_source(folder / "empty.txt")


@pytest.mark.slow
def test_compiled_step_matches_eager(no_shape_checks):
    from lightning.fabric import Fabric

    from capi_lab.config import get_preset, with_overrides
    from capi_lab.masking import sample_masks
    from capi_lab.train import build_trainer, train_step

    cfg = with_overrides(get_preset("tiny"), batch_size=16, **{"model.num_prototypes": 64})
    fabric = Fabric(accelerator="cpu", devices=1)
    x = torch.randn(16, 3, 28, 28)
    m = sample_masks(16, 7, 7, cfg.mask, rng=0)
    losses = {}
    for compiled in (False, True):
        tr = build_trainer(fabric, cfg, 100, compile=compiled, seed=0)
        losses[compiled] = [float(train_step(tr, x, m)["capi_loss"]) for _ in range(3)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-4)


@pytest.fixture(scope="module")
def big_photo(tmp_path_factory):
    """A real photo (scikit-image's astronaut) enlarged to 1800x1350, as JPEG and as PNG."""
    from skimage import data as skdata

    root = tmp_path_factory.mktemp("big")
    img = Image.fromarray(skdata.astronaut()).resize((1800, 1350), Image.BICUBIC)
    img.save(root / "big.jpg", quality=92)
    img.save(root / "big.png")
    img.resize((800, 600), Image.BICUBIC).save(root / "small.jpg", quality=92)
    return root


def test_large_jpegs_are_decoded_at_a_reduced_scale_only_where_asked(big_photo):
    from capi_lab.data import FileImages

    src = FileImages([big_photo / "big.jpg", big_photo / "big.png", big_photo / "small.jpg"])
    reduced = src.load(0, min_side=448)
    assert reduced.size == (900, 675)  # 1/2 scale: 1/4 would leave 337 < 448 px on the shorter side
    assert src.load(0, min_side=300).size == (450, 338)  # 1/4 scale
    assert src.load(0).size == (1800, 1350)  # the cache keeps the two apart
    assert src.load(1, min_side=448).size == (1800, 1350)  # PNG: no reduced decoding
    assert src.load(2, min_side=448).size == (800, 600)  # under twice min_side: full size
    # the same relative crop from the reduced and the full decode: a fraction of an 8-bit level apart
    from torchvision.transforms.v2 import functional as F

    full = src.load(0)
    crops = [
        F.pil_to_tensor(F.resized_crop(im, int(100 * k), int(160 * k), int(1000 * k), int(1200 * k), [224, 224],
                                       interpolation=F.InterpolationMode.BICUBIC)).float()
        for im, k in ((reduced, 0.5), (full, 1.0))
    ]  # fmt: skip
    diff = (crops[0] - crops[1]).abs()
    assert diff.mean() < 1.0 and diff.max() < 40


def test_stream_asks_for_enough_pixels_and_full_decode_is_the_reference(big_photo):
    """The stream's items are the training transform of the image at the size it asks for (seeded by the
    position), and ``full_decode`` asks for the full image."""
    from capi_lab.data import FileImages, _mix, train_transform

    src = FileImages([big_photo / "big.jpg"])
    assert PretrainStream(src, 224, crop_scale=(0.6, 1.0)).min_side == 448  # twice the crop size
    assert PretrainStream(src, 224, crop_scale=(0.08, 1.0)).min_side == 915  # smallest crop still >= 224 px
    for full, size in ((True, (1800, 1350)), (False, (225, 169))):  # 64 px crops: 1/8 scale keeps >= 128 px
        stream = PretrainStream(src, 64, seed=5, full_decode=full)
        img = src.load(0, stream.min_side)
        assert img.size == size
        torch.manual_seed(_mix(5, 7, 1))
        assert torch.equal(stream[7][0], train_transform(64)(img))


def test_exif_orientation_is_applied(tmp_path, big_photo):
    """A phone photo stored sideways with an EXIF orientation tag (6: turn 90 degrees clockwise to view) is
    loaded upright, at full size and at a reduced scale."""
    from capi_lab.data import FileImages

    img = Image.open(big_photo / "big.jpg")  # 1800x1350, stored sideways below
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "turned.jpg", quality=92, exif=exif)
    src = FileImages([tmp_path / "turned.jpg"])
    upright = src.load(0)
    assert upright.size == (1350, 1800)
    assert np.array_equal(
        np.asarray(upright), np.asarray(Image.open(tmp_path / "turned.jpg").transpose(Image.ROTATE_270))
    )
    assert src.load(0, min_side=448).size == (675, 900)


@pytest.fixture()
def cutouts(tmp_path):
    """Cut-outs of two classes, each a square of one colour no other cut-out or background has (alpha: a
    centred square), and grey-level background photos."""
    root = tmp_path / "stamps"
    colours = {}
    for c, cls in enumerate(("bars", "discs")):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            rgba = np.zeros((40, 40, 4), np.uint8)
            colour = (40 + 30 * i, 250 if c else 10, 128)
            rgba[..., :3] = colour
            rgba[8:32, 8:32, 3] = 255
            Image.fromarray(rgba, "RGBA").save(root / cls / f"{i}.png")
            colours[str(root / cls / f"{i}.png")] = colour
    bgs = []
    for i in range(6):
        p = tmp_path / f"bg{i}.png"
        Image.fromarray(np.full((90, 120, 3), 20 * i, np.uint8)).save(p)
        bgs.append(p)
    return root, bgs, colours


def test_composites_use_only_the_cut_outs_and_backgrounds_seg_knn_does_not_test_on(cutouts):
    from capi_lab.data import CompositeImages, stamp_split

    root, bgs, colours = cutouts
    src = CompositeImages(root, bgs, per_background=20, paste_fraction=1.0, max_side=80)
    _, test_stamps, test_bgs = stamp_split(root, bgs, "test")
    _, train_stamps, train_bgs = stamp_split(root, bgs, "train")
    assert len(src) == 20 * len(train_bgs) and not set(train_bgs) & set(test_bgs)
    test_colours = {colours[str(p)] for s in test_stamps for p in s}
    train_colours = {colours[str(p)] for s in train_stamps for p in s}
    seen_colours, seen_bg = set(), set()
    for i in range(len(src)):
        img = np.asarray(src.load(i))
        assert img.shape[:2] == (60, 80)  # the whole background, downscaled to max_side
        values, counts = np.unique(img.reshape(-1, 3), axis=0, return_counts=True)
        seen_colours |= {tuple(int(c) for c in v) for v in values} & (train_colours | test_colours)
        seen_bg.add(tuple(int(c) for c in values[counts.argmax()]))  # most of the picture is its background
    assert seen_colours and seen_colours <= train_colours  # pasted: train cut-outs, never a held-out one
    assert {(20 * bgs.index(b),) * 3 for b in train_bgs} == seen_bg  # every train background, no test one
    assert np.array_equal(np.asarray(src.load(7)), np.asarray(src.load(7)))  # a function of (seed, i)
    plain = CompositeImages(root, bgs, paste_fraction=0.0, max_side=80)
    assert all(len({tuple(p) for p in np.asarray(plain.load(i)).reshape(-1, 3)}) == 1 for i in range(6))


def test_composite_source_from_the_cli_spec_and_its_errors(cutouts, tmp_path):
    root, _, _ = cutouts
    src = resolve_source(f"composite:{root}")
    item, _, _ = PretrainStream(src, 32, seed=1, crop_scale=(0.3, 1.0))[5]
    assert item.shape == (3, 32, 32) and torch.isfinite(item).all()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable cut-outs"):
        resolve_source(f"composite:{tmp_path / 'empty'}")
    with pytest.raises(DataError, match="does not exist: run `python scripts/fetch_demo_data.py --only tuxpaint`"):
        resolve_source(f"composite:{tmp_path / 'missing'}")


def test_the_fast_input_conversion_and_seeding_give_torchvisions_values_bit_for_bit():
    """ToInput and seeded_cpu_rng replace v2.ToImage/ToDtype/Normalize and fork_rng + torch.manual_seed in the
    loader for speed: a run must see exactly the samples it saw before (resumed runs, recorded studies)."""
    from torchvision.transforms import v2

    from capi_lab.data import IMAGENET_MEAN, IMAGENET_STD, ToInput, _mix, augment, train_transform

    rng = np.random.default_rng(0)
    reference = v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    for shape in [(28, 28, 3), (13, 40, 3), (9, 7)]:
        img = Image.fromarray((rng.random(shape) * 255).astype("uint8"))
        ours, theirs = ToInput()(img), reference(img)
        assert ours.shape == theirs.shape and torch.equal(ours, theirs.as_subclass(torch.Tensor))
    with pytest.raises(TypeError, match="8-bit"):
        ToInput()(torch.zeros(3, 4, 4))

    tf = train_transform(28)
    old = [
        v2.RandomResizedCrop(28, scale=(0.6, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
        v2.RandomHorizontalFlip(),
    ]
    img = Image.fromarray((rng.random((56, 60, 3)) * 255).astype("uint8"))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for pos in range(8):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(5, pos, 1))
            expected = reference(v2.Compose(old)(img))
        assert torch.equal(augment(tf, img, 5, pos), expected.as_subclass(torch.Tensor))
    assert torch.equal(torch.get_rng_state(), before), "augment must leave the global generator where it was"
