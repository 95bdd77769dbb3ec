"""The evaluation protocols and dataset layouts of issue #18: fake ADE20K / VOC / pairs trees built here, the
authors' segmentation protocol (k-NN and linear) on raw-pixel features, mIoU with ignore labels, extraction
through a DataLoader and in fp32 on every device."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import capi_lab.evaluation.__main__ as capi_eval
from capi_lab.data import DataError, FileImages
from capi_lab.evaluation import segmentation as seg
from capi_lab.evaluation.segsets import SegPairs, open_segmentation

COLOURS = {1: (220, 30, 30), 2: (30, 200, 30), 3: (30, 30, 220)}
"""Flat colours of the classes of the synthetic sets (0 is left to ADE20K's "other")."""


def _cells(rng: np.random.Generator, size: int = 32, cell: int = 8, ignore: int | None = None):
    """An image of flat-coloured ``cell x cell`` squares (light noise) and its label mask; with ``ignore``, one
    square is a grey region labelled ``ignore``."""
    g = size // cell
    lab = rng.integers(1, 4, (g, g))
    if ignore is not None:
        lab[rng.integers(g), rng.integers(g)] = ignore
    mask = np.kron(lab, np.ones((cell, cell), dtype=np.int64))
    img = np.zeros((size, size, 3), np.float64)
    for c, rgb in COLOURS.items():
        img[mask == c] = rgb
    img[mask == ignore] = 128
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), mask.astype(np.uint8)


def _write(img: Image.Image, mask: np.ndarray, img_path, mask_path, mode: str = "L"):
    img_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    img.save(img_path)
    m = Image.fromarray(mask, "L")
    if mode == "P":  # VOC's palette PNGs
        m = m.convert("P")
    m.save(mask_path)


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    """A fake ``ADEChallengeData2016`` tree: 20 training and 8 validation pairs, label 0 on one cell each."""
    root = tmp_path_factory.mktemp("ade") / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    for split, n in (("training", 20), ("validation", 8)):
        for i in range(n):
            img, mask = _cells(rng, ignore=0)
            name = f"ADE_{split[:5]}_{i:08d}"
            _write(img, mask, root / "images" / split / f"{name}.jpg", root / "annotations" / split / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    """A fake ``VOCdevkit/VOC2012``: palette masks, 255 on one cell each, train.txt / val.txt."""
    root = tmp_path_factory.mktemp("voc") / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(1)
    lists = {"train": [], "val": []}
    for split, n in (("train", 16), ("val", 6)):
        for i in range(n):
            img, mask = _cells(rng, ignore=255)
            name = f"2007_{split}_{i:04d}"
            _write(img, mask, root / "JPEGImages" / f"{name}.jpg", root / "SegmentationClass" / f"{name}.png", "P")
            lists[split].append(name)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split, names in lists.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A generic pairs folder without splits: images/ and masks/ (PNG, lossless), 20 pairs."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(2)
    for i in range(20):
        img, mask = _cells(rng)
        _write(img, mask, root / "images" / f"{i:03d}.png", root / "masks" / f"{i:03d}.png")
    return root


# ----------------------------------------------------------------------------- readers


def test_ade20k_reader_pairs_images_with_their_masks(ade):
    for given in (ade, ade.parent):  # the dataset folder or the folder holding it
        data = open_segmentation(str(given))
        assert data.layout == "ade20k" and data.ignore_labels == (0, 255) and data.val is None
        assert len(data.train) == 20 and len(data.test) == 8
        assert all(i.stem == m.stem for i, m in zip(data.train.images, data.train.masks, strict=True))
        assert all("training" in str(m) for m in data.train.masks)
        img, mask = data.test[0]
        assert img.size == (32, 32) and mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 1, 2, 3}


def test_misdirected_ade20k_folders_are_errors_that_say_where_to_point(ade, tiny_checkpoint):
    with pytest.raises(DataError, match=r"annotations/ folder inside ADE20K: give its parent"):
        open_segmentation(str(ade / "annotations"), "ade20k")
    # auto: the annotations folder's training/validation are not read as classes of cut-outs
    with pytest.raises(DataError, match="holds the splits training, validation"):
        open_segmentation(str(ade / "annotations"))
    with pytest.raises(SystemExit, match="holds the splits"):
        capi_eval.main(["seg-knn", "--checkpoint", str(tiny_checkpoint), "--dataset", str(ade / "annotations")])
    # knn on images/: training and validation are splits, not classes
    with pytest.raises(SystemExit, match="images directly, with no class sub-folders .* goes to seg-knn"):
        capi_eval.main(["knn", "--checkpoint", str(tiny_checkpoint), "--dataset", str(ade / "images")])
    # class folders named like splits, with no train/val pair to read them as splits
    only = ade.parent / "only_splits"
    for name in ("training", "testing"):
        (only / name).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(only / name / "a.png")
    with pytest.raises(SystemExit, match="named like dataset splits, not classes"):
        capi_eval.main(["knn", "--checkpoint", str(tiny_checkpoint), "--dataset", str(only)])
    with pytest.raises(DataError, match=r"not laid out as ADE20K: expected ADEChallengeData2016"):
        open_segmentation(str(ade / "images" / "training"), "ade20k")


def test_ade20k_image_without_mask_is_named(tmp_path, ade):
    import shutil

    root = tmp_path / "ADEChallengeData2016"
    shutil.copytree(ade, root)
    next((root / "annotations" / "validation").iterdir()).unlink()
    with pytest.raises(DataError, match=r"1 of the 8 images .* have no mask of the same name"):
        open_segmentation(str(root))


def test_voc_reader_follows_the_split_lists(voc, tmp_path):
    data = open_segmentation(str(voc.parent))  # VOCdevkit
    assert data.layout == "voc" and data.ignore_labels == (255,) and data.classes[0] == "background"
    assert len(data.train) == 16 and len(data.test) == 6
    assert [p.stem for p in data.test.images] == (voc / "ImageSets/Segmentation/val.txt").read_text().split()
    _, mask = data.train[0]
    assert 255 in mask and set(np.unique(mask)) <= {1, 2, 3, 255}  # palette indices, not colours
    with pytest.raises(DataError, match="folder inside VOC2012: give its parent"):
        open_segmentation(str(voc / "JPEGImages"), "voc")


def test_pairs_reader_splits_seeded_and_refuses_colour_masks(pairs, tmp_path):
    a, b = open_segmentation(str(pairs), seed=0), open_segmentation(str(pairs), seed=0)
    assert a.layout == "pairs" and len(a.train) == 16 and len(a.test) == 4 and a.notes
    assert a.test.images == b.test.images and not set(a.test.images) & set(a.train.images)
    assert open_segmentation(str(pairs), seed=1).test.images != a.test.images
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    (bad / "masks").mkdir()
    for name in ("x", "y"):
        Image.new("RGB", (8, 8)).save(bad / "images" / f"{name}.png")
        Image.new("RGB", (8, 8)).save(bad / "masks" / f"{name}.png")
    with pytest.raises(DataError, match="is a RGB picture; masks must hold one class index per pixel"):
        open_segmentation(str(bad)).train[0]
    with pytest.raises(DataError, match=r"not laid out as ADE20K"):
        open_segmentation(str(pairs), "ade20k")
    with pytest.raises(DataError, match="matches no segmentation layout"):
        open_segmentation(str(tmp_path / "bad" / "images"))


def test_label_list_file_with_and_without_split_column(tmp_path, capsys, tiny_checkpoint):
    from capi_lab.evaluation.datasets import load_labeled

    lines = []
    for i in range(12):
        c = i % 2
        Image.new("RGB", (16, 16), (200 * c, 50, 200 * (1 - c))).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png {'cat' if c else 'dog'} {'val' if i >= 8 else 'train'}")
    (tmp_path / "labels.txt").write_text("# path label split\n" + "\n".join(lines) + "\n")
    s = load_labeled(str(tmp_path / "labels.txt"))
    assert len(s.train) == 8 and len(s.test) == 4 and s.classes == ["cat", "dog"]
    assert s.test_labels.tolist() == [1, 0, 1, 0]  # images 8-11: dog, cat, dog, cat; classes sorted by name
    (tmp_path / "two.txt").write_text("\n".join(line.rsplit(" ", 1)[0] for line in lines))
    s = load_labeled(str(tmp_path / "two.txt"))
    assert len(s.train) + len(s.test) == 12 and len(s.test) == 2  # stratified 80/20: one of each class
    (tmp_path / "bad.txt").write_text("0.png dog somewhere\n")
    with pytest.raises(DataError, match=r"bad.txt:1: expected 'path label'"):
        load_labeled(str(tmp_path / "bad.txt"))
    assert capi_eval.main(["knn", "--checkpoint", "raw-pixels", "--dataset", str(tmp_path / "labels.txt")]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == 1.0  # two flat colours


# ----------------------------------------------------------------------------- metrics


def test_mean_iou_equals_a_hand_computed_confusion_matrix_and_sklearn():
    from sklearn.metrics import jaccard_score

    target = torch.tensor([0, 0, 1, 1, 1, 2, 2, 255, 255])
    pred = torch.tensor([0, 1, 1, 1, 2, 2, 0, 1, 2])
    # over the 7 scored pixels: class 0 tp 1, fp 1, fn 1 -> 1/3; class 1 tp 2, fp 1, fn 1 -> 2/4; class 2: 1/3
    miou, acc = seg.mean_iou(pred, target, ignore=(255,))
    assert miou == pytest.approx((1 / 3 + 2 / 4 + 1 / 3) / 3) and acc == pytest.approx(4 / 7)
    keep = target != 255
    assert miou == pytest.approx(jaccard_score(target[keep], pred[keep], average="macro"))
    # a prediction on an ignored pixel changes nothing
    other = pred.clone()
    other[7:] = torch.tensor([0, 0])
    assert seg.mean_iou(other, target, ignore=(255,)) == (miou, acc)
    # a class only predicted counts, with IoU 0 (as sklearn's macro average)
    assert seg.mean_iou(torch.tensor([3, 1]), torch.tensor([0, 1]))[0] == pytest.approx(
        jaccard_score([0, 1], [3, 1], average="macro")
    )


def test_fit_logreg_matches_scikit_learns_objective():
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    for c in (0.01, 1.0):
        w, b, classes = seg.fit_logreg(x, y, c)
        ref = LogisticRegression(C=c, max_iter=5000, tol=1e-10).fit(x.numpy(), y.numpy())
        assert np.allclose(w.T.numpy(), ref.coef_, atol=2e-3), c
        agree = (seg.logreg_predict((w, b, classes), x).numpy() == ref.predict(x.numpy())).mean()
        assert agree > 0.99


# ----------------------------------------------------------------------------- protocols


@pytest.mark.parametrize("classifier", ["knn", "linear"])
def test_capi_protocol_on_flat_colour_classes_scores_above_0_9(pairs, classifier):
    data = open_segmentation(str(pairs))
    row = seg.evaluate_capi(seg.RawPixelPatches(8), data.train, data.test, 32, None, (classifier,), (255,),
                            device="cpu", logreg_max_iter=200)  # fmt: skip
    r = row[classifier]
    assert r["miou"] >= 0.9 and r["pixel_acc"] >= 0.9, r
    assert row["n_val_images"] == 1 and row["n_train_images"] == 15  # a seeded tenth of train (at least one)
    assert len(r["val_miou"]) == 8  # 4 k x 2 distances, or 8 values of C


def test_per_pixel_votes_beat_one_label_per_patch_on_sub_patch_detail(tmp_path):
    """Every 8x8 patch is split down the middle into two classes: the authors' per-pixel vote of the neighbours'
    pixel labels recovers both halves; one label per patch can get at most the larger half right."""
    rng = np.random.default_rng(3)
    halves = [(1, 2), (2, 3), (3, 1)]
    for i in range(18):
        mask = np.zeros((32, 32), np.uint8)
        for gy in range(4):
            for gx in range(4):
                left, right = halves[rng.integers(3)]
                mask[gy * 8 : gy * 8 + 8, gx * 8 : gx * 8 + 4] = left
                mask[gy * 8 : gy * 8 + 8, gx * 8 + 4 : gx * 8 + 8] = right
        img = np.zeros((32, 32, 3))
        for c, rgb in COLOURS.items():
            img[mask == c] = rgb
        _write(Image.fromarray(img.astype(np.uint8)), mask, tmp_path / "images" / f"{i}.png",
               tmp_path / "masks" / f"{i}.png")  # fmt: skip
    data = open_segmentation(str(tmp_path))
    model = seg.RawPixelPatches(8)
    capi = seg.evaluate_capi(model, data.train, data.test, 32, None, ("knn",), (), device="cpu")["knn"]
    quick = seg.evaluate_quick(model, data.train, data.test, 32, k=10, ignore=(), device="cpu")
    assert capi["miou"] > 0.95 and quick["pixel_acc"] <= 0.5 + 1e-6, (capi, quick)


def test_ignored_majority_patches_are_left_out_of_the_bank():
    labels = torch.tensor([[0, 0, 0, 1], [1, 1, 2, 2], [255, 255, 255, 3]])
    assert seg._keep_labelled(labels, (0, 255)).tolist() == [False, True, False]
    assert seg._keep_labelled(labels, ()).tolist() == [True, True, True]


def test_knn_segment_chunks_give_the_same_neighbours():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(500, 16, generator=g), torch.randn(70, 16, generator=g)
    labels = torch.randint(0, 5, (500, 4), generator=g).to(torch.int16)
    for dist in ("cosine", "L2"):
        whole = seg.knn_segment(bank, labels, queries, (1, 3, 10, 30), dist)
        chunked = seg.knn_segment(bank, labels, queries, (1, 3, 10, 30), dist, query_chunk=16, bank_chunk=64)
        assert all(torch.equal(whole[k], chunked[k]) for k in whole)
        # k=1: the nearest bank row's labels, found by brute force
        d = (
            torch.cdist(queries, bank)
            if dist == "L2"
            else -torch.nn.functional.normalize(queries, dim=1) @ (torch.nn.functional.normalize(bank, dim=1).T)
        )
        assert torch.equal(whole[1], labels[d.argmin(1)])
        # rows left out by `keep` are never neighbours; the result is that of the smaller bank
        keep = torch.arange(500) % 3 != 0
        kept = seg.knn_segment(bank, labels, queries, (1, 10), dist, bank_chunk=64, keep=keep)
        small = seg.knn_segment(bank[keep], labels[keep], queries, (1, 10), dist)
        assert all(torch.equal(kept[k], small[k]) for k in kept)


# ----------------------------------------------------------------------------- the command line, end to end


def test_seg_knn_capi_protocol_on_fake_ade20k_with_the_default_model(ade, capsys):
    args = ["seg-knn", "--checkpoint", "default", "--dataset", str(ade), "--protocol", "capi", "--image-size", "64"]
    assert capi_eval.main(args) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["layout"] == "ade20k" and row["protocol"] == "capi" and row["ignore_labels"] == [0, 255]
    assert row["best"]["k"] in (1, 3, 10, 30) and row["best"]["distance"] in ("cosine", "L2")
    assert row["n_val_images"] == 2 and row["n_train_images"] == 18 and row["n_test_images"] == 8
    assert row["miou"] > 0.5, row  # flat colours: even a small model's patch features separate them


def test_seg_linear_on_fake_voc_and_raw_pixels(voc, capsys):
    args = [
        "seg-linear",
        "--checkpoint",
        "raw-pixels",
        "--dataset",
        str(voc),
        "--image-size",
        "32",
        "--max-iter",
        "100",
    ]
    assert capi_eval.main(args) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["task"] == "seg-linear" and row["protocol"] == "capi" and row["layout"] == "voc"
    assert row["miou"] >= 0.9 and "C" in row["best"] and row["classes"][0] == "background"


def test_seg_linear_refuses_the_quick_protocol(voc):
    with pytest.raises(SystemExit, match="seg-linear follows the authors' protocol only"):
        capi_eval.main(["seg-linear", "--checkpoint", "raw-pixels", "--dataset", str(voc), "--protocol", "quick"])


# ----------------------------------------------------------------------------- extraction


def test_extraction_is_identical_in_process_and_through_loader_workers(tmp_path):
    import capi_lab
    from capi_lab.features import extract_features

    rng = np.random.default_rng(0)
    paths = []
    for i in range(10):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(paths[-1])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    paths.insert(4, tmp_path / "broken.png")
    torch.manual_seed(0)
    model = capi_lab.create_model("tiny").eval()
    src = FileImages(paths)
    a = extract_features(model, src, 32, batch_size=3, device="cpu", progress=False, keep_registers=True)
    b = extract_features(model, src, 32, batch_size=4, device="cpu", progress=False, keep_registers=True,
                         num_workers=2)  # fmt: skip
    assert a.index == b.index == [0, 1, 2, 3, 5, 6, 7, 8, 9, 10] and len(a.skipped) == 1
    for name in ("global_repr", "registers", "feature_map"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert extract_features(model, src, 32, device="cpu", progress=False).registers is None  # only when asked


def test_features_are_fp32_by_default_and_bf16_only_when_asked():
    import capi_lab
    from capi_lab.data import ArrayImages
    from capi_lab.features import extract_features

    torch.manual_seed(0)
    model = capi_lab.create_model("tiny").eval()
    src = ArrayImages(np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8))
    default = extract_features(model, src, 32, device="cpu", progress=False)
    from capi_lab.data import eval_transform

    x = torch.stack([eval_transform(32)(src.load(i)) for i in range(4)])
    with torch.no_grad():
        ref = model(x)[0]
    assert default.global_repr.dtype == torch.float32 and torch.allclose(default.global_repr, ref, atol=1e-6)
    bf16 = extract_features(model, src, 32, device="cpu", progress=False, dtype="bf16")
    assert not torch.equal(bf16.global_repr, default.global_repr)  # autocast did run
    assert torch.allclose(bf16.global_repr, default.global_repr, atol=0.1)


@pytest.mark.gpu
def test_cuda_and_cpu_features_agree_in_fp32():
    import capi_lab
    from capi_lab.data import ArrayImages
    from capi_lab.features import extract_features

    torch.manual_seed(0)
    model = capi_lab.create_model("tiny").eval()
    src = ArrayImages(np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8))
    cpu = extract_features(model, src, 32, device="cpu", progress=False)
    gpu = extract_features(model, src, 32, device="cuda", progress=False)
    assert torch.allclose(cpu.global_repr, gpu.global_repr, atol=1e-3)
    assert torch.allclose(cpu.feature_map, gpu.feature_map, atol=1e-3)


def test_segpairs_subset_keeps_the_pairing(pairs):
    data = open_segmentation(str(pairs))
    sub = data.train.subset([3, 1])
    assert isinstance(sub, SegPairs) and sub.images == [data.train.images[3], data.train.images[1]]
    assert sub.masks == [data.train.masks[3], data.train.masks[1]]


# ----------------------------------------------------------------------------- the authors' attentive probe


class _ColourPatches(torch.nn.Module):
    """A 'model' with CAPIModel's outputs: patch features are a fixed random map of each 8x8 patch's mean colour
    (``informative``), or the same map of a constant (every image looks alike)."""

    patch_size = 8

    def __init__(self, informative: bool):
        super().__init__()
        self.informative = informative
        self.register_buffer("proj", torch.randn(3, 64, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        colour = torch.nn.functional.avg_pool2d(x, 8).permute(0, 2, 3, 1)
        if not self.informative:
            colour = torch.ones_like(colour)
        fm = colour @ self.proj
        return fm.mean((1, 2)), fm[:, :0, 0], fm


@pytest.fixture(scope="module")
def colours3(tmp_path_factory):
    """Three classes of noisy flat-colour images, 12 each."""
    root = tmp_path_factory.mktemp("colours3")
    rng = np.random.default_rng(0)
    for c, rgb in COLOURS.items():
        (root / f"c{c}").mkdir()
        for i in range(12):
            a = np.clip(np.array(rgb) + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / f"c{c}" / f"{i}.png")
    return root


_SMALL = dict(image_size=32, global_batch=16, batch_size=8, iters=12, warmup=2, lrs=(1e-3, 1e-2), wds=(5e-4,),
              device="cpu", progress=False)  # fmt: skip


def test_attentive_capi_and_quick_probes_rank_models_alike(colours3):
    from capi_lab.evaluation.attentive import attentive_accuracy, probe_capi
    from capi_lab.evaluation.datasets import load_labeled
    from capi_lab.features import extract_features

    s = load_labeled(str(colours3))
    capi, quick = {}, {}
    for informative in (True, False):
        model = _ColourPatches(informative)
        out = probe_capi(model, s.train, s.train_labels, s.test, s.test_labels, **{**_SMALL, "iters": 40})
        capi[informative] = out["patch"]["test_top1"]
        f_tr, f_te = (extract_features(model, src, 32, device="cpu", progress=False) for src in (s.train, s.test))
        quick[informative] = attentive_accuracy(f_tr.feature_map.flatten(1, 2), s.train_labels,
                                                f_te.feature_map.flatten(1, 2), s.test_labels, epochs=5,
                                                progress=False)  # fmt: skip
        assert set(out) >= {"cls", "avg_patch", "cls_avg_patch", "patch"} and out["n_val"] == 3
    assert capi[True] > capi[False] and quick[True] > quick[False], (capi, quick)
    assert capi[True] >= 0.9 and capi[False] <= 0.5


def test_attentive_capi_probe_resumes_exactly(colours3, tmp_path, monkeypatch):
    from capi_lab.evaluation import attentive
    from capi_lab.evaluation.datasets import load_labeled

    s = load_labeled(str(colours3))
    model = _ColourPatches(True)
    args = (model, s.train, s.train_labels, s.test, s.test_labels)
    whole = attentive.probe_capi(*args, **_SMALL, output_dir=tmp_path / "a", checkpoint_every=5)
    saved = attentive._save_probe
    calls = []

    def save_then_die(path, state):  # killed right after its first checkpoint (iteration 5)
        saved(path, state)
        calls.append(state["iteration"])
        raise KeyboardInterrupt

    monkeypatch.setattr(attentive, "_save_probe", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        attentive.probe_capi(*args, **_SMALL, output_dir=tmp_path / "b", checkpoint_every=5)
    monkeypatch.setattr(attentive, "_save_probe", saved)
    assert calls == [5]
    resumed = attentive.probe_capi(*args, **_SMALL, output_dir=tmp_path / "b", checkpoint_every=5)
    a = torch.load(tmp_path / "a" / "probe_last.pt", weights_only=True)["heads"]
    b = torch.load(tmp_path / "b" / "probe_last.pt", weights_only=True)["heads"]
    assert all(torch.equal(a[k], b[k]) for k in a) and resumed == whole
    with pytest.raises(ValueError, match="a probe with other settings"):
        attentive.probe_capi(*args, **{**_SMALL, "iters": 20}, output_dir=tmp_path / "b")


def test_attention_pooling_head_and_schedule_follow_the_authors():
    from capi_lab.evaluation.attentive import AttnPoolHead, warmup_cosine

    head = AttnPoolHead(128, 5)
    assert head.num_heads == 2 and head.kv.out_features == 256 and not list(head.children())[2:]
    assert head(torch.randn(3, 7, 128)).shape == (3, 5)
    # one token: attention is the identity on values, so the output is linear(value projection)
    tok = torch.randn(1, 1, 128)
    v = head.kv(tok)[..., 128:]
    assert torch.allclose(head(tok), head.linear(v[:, 0]), atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 64"):
        AttnPoolHead(96, 3)
    s = warmup_cosine(10, 3)
    assert len(s) == 10 and s[0] == 0 and s[2] == 1 and s[3] == 1 and s[-1] == pytest.approx(0)


def test_attentive_capi_from_the_command_line(colours3, tiny_checkpoint, capsys, tmp_path):
    args = ["attentive", "--checkpoint", str(tiny_checkpoint), "--dataset", str(colours3), "--protocol", "capi",
            "--image-size", "32", "--global-batch", "16", "--batch-size", "8", "--iters", "4", "--warmup-iters", "1",
            "--lrs", "[1e-3]", "--wds", "[5e-4]", "--output-dir", str(tmp_path / "probe")]  # fmt: skip
    assert capi_eval.main(args) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["protocol"] == "capi" and row["top1"] == row["patch"]["test_top1"] and row["global_batch"] == 16
    assert (tmp_path / "probe" / "probe_last.pt").is_file()
    with pytest.raises(SystemExit, match="--global-batch 10 must be a multiple of --batch-size 8"):
        capi_eval.main([*args[:-2], "--global-batch", "10"])


# ----------------------------------------------------------------------------- evaluation during pretraining


def test_eval_during_training_writes_eval_lines_and_survives_a_resume(colours3, tmp_path, monkeypatch):
    from capi_lab import train

    args = ["--preset", "tiny", "--num-workers", "0", "--batch-size", "8", "--model.num-prototypes", "16",
            "--data", str(colours3), "--output-dir", str(tmp_path / "run"), "--max-steps", "6", "--log-every", "3",
            "--checkpoint-every", "3", "--eval.every", "3", "--eval.data", str(colours3), "--eval.limit-test", "9",
            "--image-size", "32"]  # fmt: skip
    real = train.train_step

    def interrupted(tr, *a, **kw):
        if tr.step == 4:
            raise KeyboardInterrupt
        return real(tr, *a, **kw)

    monkeypatch.setattr(train, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    monkeypatch.setattr(train, "train_step", real)
    assert train.main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/knn_top1" in r]
    assert [r["step"] for r in evals] == [3, 6]  # one per evaluation step, none twice after the resume
    assert all(r["eval/seconds"] > 0 for r in evals)
    # flat colours: even a barely trained teacher's k-NN is far above chance (1/3)
    assert evals[-1]["eval/knn_top1"] > 0.6
    assert [r["step"] for r in rows if "capi_loss" in r] == [3, 6]


def test_eval_during_training_needs_labels_and_no_fsdp(images):
    from capi_lab.train import resolve_config

    with pytest.raises(SystemExit, match="--eval.every 5 needs a labelled set"):
        resolve_config(["--data", str(images), "--eval.every", "5"])
    assert resolve_config(["--data", "fashion-mnist", "--eval.every", "5"]).eval.data == "fashion-mnist"
    with pytest.raises(SystemExit, match="--eval.limit-test must be >= 1"):
        resolve_config(["--data", "fashion-mnist", "--eval.limit-test", "0"])
    with pytest.raises(SystemExit, match="does not work with --strategy fsdp"):
        resolve_config(["--data", "fashion-mnist", "--eval.every", "5", "--strategy", "fsdp", "--devices", "2"])


def test_eval_during_training_scores_segmentation_too(pairs):
    import capi_lab
    from capi_lab.evaluation.during import DuringTraining, EvalDuringConfig

    torch.manual_seed(0)
    model = capi_lab.create_model("tiny")
    ev = DuringTraining(EvalDuringConfig(every=1, seg=str(pairs)), 32, model.patch_size)
    out = ev(model, torch.device("cpu"))
    assert set(out) == {"eval/seg_miou", "eval/seconds"}
    assert out["eval/seg_miou"] > 0.9  # flat-colour cells: even random patch features separate them
    assert model.training  # left as it was found


# ----------------------------------------------------------------------------- the authors' visualisations


def test_authors_pca_rules_signs_and_scale():
    from capi_lab.visualize import authors_pca, skew_positive

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12))
    x[:, 0] += rng.exponential(3.0, 300)  # a skewed direction
    p = authors_pca(x, 6)
    assert p.shape == (300, 6) and p[:, 0].std() == pytest.approx(1.0)
    skew = np.mean(p**3, 0) / np.mean(p**2, 0) ** 1.5
    assert (skew >= 0).all()
    # whitened: every component has the first one's spread
    assert np.allclose(p.std(0), 1.0, atol=1e-6)
    assert np.array_equal(skew_positive(-p), p)  # the sign rule undoes a flip
    assert authors_pca(-x, 6) == pytest.approx(p, abs=1e-6)  # and so does not depend on the input's sign


def test_visualize_cli_writes_the_pictures(colours3, tiny_checkpoint, tmp_path, capsys):
    from capi_lab import visualize

    out = tmp_path / "viz"
    args = ["--checkpoint", str(tiny_checkpoint), "--images", str(colours3), "--out", str(out), "--num-images", "3",
            "--resolution", "32", "--size", "64", "--dict-learning"]  # fmt: skip
    assert visualize.main(args) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row == {"out": str(out), "images": 3, "files": 12}
    index = json.loads((out / "index.json").read_text())
    assert [len(r["files"]) for r in index] == [4, 4, 4]
    sep = Image.open(out / "00000_pca_sep.png")
    assert sep.size == (8 * 64 + 7 * 10, 64)  # image, RGB, 6 heatmaps
    assert Image.open(out / "00000_pca_joint.png").size == (12 * 64 + 11 * 10, 64)  # image, RGB, 10 heatmaps
    assert Image.open(out / "00002_dict_joint.png").size == (4 * 64 + 3 * 10, 64)
    with pytest.raises(SystemExit, match="--resolution 30 is not a multiple of the patch size 4; use e.g. 32"):
        visualize.main([*args[:8], "--resolution", "30"])


def test_voc_seg_knn_and_imagefolder_attentive_end_to_end(voc, colours3, tiny_checkpoint, tmp_path, capsys):
    """The README's VOC and ImageNet-style commands, end to end on fake trees in the real layouts."""
    assert capi_eval.main(["seg-knn", "--checkpoint", str(tiny_checkpoint), "--dataset", str(voc.parent.parent),
                           "--image-size", "32"]) == 0  # fmt: skip
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["layout"] == "voc" and row["protocol"] == "capi" and row["ignore_labels"] == [255]  # auto: capi
    assert row["n_train_images"] + row["n_val_images"] == 16 and row["n_test_images"] == 6
    # an ImageFolder with train/ and val/ (ImageNet's layout)
    root = tmp_path / "imagenet"
    for split, names in (("train", range(0, 9)), ("val", range(9, 12))):
        for cls in sorted(p.name for p in colours3.iterdir()):
            (root / split / cls).mkdir(parents=True)
            for i in names:
                (root / split / cls / f"{i}.png").write_bytes((colours3 / cls / f"{i}.png").read_bytes())
    args = ["attentive", "--checkpoint", str(tiny_checkpoint), "--dataset", str(root), "--protocol", "capi",
            "--image-size", "32", "--global-batch", "16", "--batch-size", "16", "--iters", "3", "--warmup-iters", "1",
            "--lrs", "[1e-3]", "--wds", "[5e-4]"]  # fmt: skip
    assert capi_eval.main(args) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["n_test"] == 9 and row["n_train"] + row["n_val"] == 27 and row["n_val"] == 3
