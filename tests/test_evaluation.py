import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import capi_lab
from capi_lab import features as capi_features
from capi_lab.data import FASHION_MNIST_DIR
from capi_lab.evaluation import __main__ as capi_eval
from capi_lab.evaluation import knn_accuracy, knn_predict, linear_accuracy


def test_attentive_probe_learns_where_pooling_fails():
    from capi_lab.evaluation import attentive_accuracy

    # the class is carried by one token among many noise tokens whose mean hides it
    g = torch.Generator().manual_seed(0)
    y = torch.arange(1200) % 3
    tokens = torch.randn(1200, 16, 32, generator=g)
    tokens[torch.arange(1200), 0, :3] += 6 * torch.nn.functional.one_hot(y, 3).float()
    tokens[:, 0, 3] += 6  # the informative token is findable
    acc = attentive_accuracy(tokens[:1000], y[:1000], tokens[1000:], y[1000:], epochs=20, lr=3e-3, progress=False)
    assert acc > 0.9


def test_knn_votes_are_temperature_weighted():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.05]])  # much closer to the single class-0 point
    # sharp temperature: the one very similar neighbour outweighs two far ones
    assert knn_predict(train, labels, test, k=3, temperature=0.05).item() == 0
    # flat temperature: it is a plain majority of the three
    assert knn_predict(train, labels, test, k=3, temperature=1e3).item() == 1


def test_knn_and_linear_on_separable_and_random_labels():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5
    y = torch.arange(400) % 4
    x = centers[y] + torch.randn(400, 16, generator=g)
    assert knn_accuracy(x[:300], y[:300], x[300:], y[300:]) == 1.0
    assert linear_accuracy(x[:300], y[:300], x[300:], y[300:]) == 1.0
    shuffled = y[torch.randperm(400, generator=g)]
    assert knn_accuracy(x[:300], shuffled[:300], x[300:], shuffled[300:]) < 0.5


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for name, channel in (("red", 0), ("blue", 2)):
        (root / name).mkdir()
        for i in range(10):
            a = (rng.random((32, 32, 3)) * 80).astype("uint8")
            a[..., channel] += 150
            Image.fromarray(a).save(root / name / f"{i}.png")
    return root


def test_folder_split_is_stratified(colour_folder):
    s = capi_eval.load_labeled(str(colour_folder))
    assert len(s.train) == 16 and len(s.test) == 4 and s.classes == ["blue", "red"]
    assert sorted(s.test_labels.tolist()) == [0, 0, 1, 1]
    train_names = {s.train.describe(i) for i in range(len(s.train))}
    assert not train_names & {s.test.describe(i) for i in range(len(s.test))}


@pytest.mark.parametrize("task", ["knn", "linear"])
def test_eval_cli_prints_one_json_line(task, colour_folder, tiny_checkpoint, capsys):
    k = ["--k", "3"] if task == "knn" else []  # each task takes only its own settings
    assert capi_eval.main([task, "--checkpoint", str(tiny_checkpoint), "--dataset", str(colour_folder), *k]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["task"] == task and row["image_size"] == 28 and row["n_test"] == 4
    assert (row["top1"] * row["n_test"]).is_integer()  # an accuracy over the 4 test images
    capi_eval.main([task, "--checkpoint", "raw-pixels", "--dataset", str(colour_folder), *k])
    assert json.loads(capsys.readouterr().out.strip())["top1"] == 1.0  # colours are separable in pixels


def test_eval_bad_inputs(tmp_path, tiny_checkpoint):
    with pytest.raises(SystemExit, match="not 'fashion-mnist', a folder or a list file"):
        capi_eval.main(["knn", "--checkpoint", str(tiny_checkpoint), "--dataset", str(tmp_path / "nope")])
    (tmp_path / "only").mkdir()
    with pytest.raises(SystemExit, match="at least two class sub-folders"):
        capi_eval.main(["knn", "--checkpoint", str(tiny_checkpoint), "--dataset", str(tmp_path)])
    with pytest.raises(SystemExit, match="does not exist"):
        capi_eval.main(["knn", "--checkpoint", str(tmp_path / "x.pth"), "--dataset", "fashion-mnist"])


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_features_cli_writes_everything(suffix, colour_folder, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / f"f{suffix}"
    args = ["--checkpoint", str(tiny_checkpoint), "--images", str(colour_folder), "--out", str(out)]
    assert capi_features.main([*args, "--image-size", "32"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 20 and summary["feature_map"] == [20, 8, 8, 128]
    if suffix == ".npz":
        data = np.load(out)
        paths, g = list(data["paths"]), data["global_repr"]
    else:
        from safetensors import safe_open

        with safe_open(str(out), "pt") as f:
            paths, g = json.loads(f.metadata()["paths"]), f.get_tensor("global_repr")
    assert len(paths) == 20 and paths[0].endswith(".png") and tuple(g.shape) == (20, 128)
    # the stored features are the model's own outputs
    model = capi_lab.load_pretrained(tiny_checkpoint)
    from capi_lab.data import FileImages, eval_transform

    x = eval_transform(32)(FileImages([paths[3]]).load(0))[None]
    with torch.no_grad():
        assert torch.allclose(model(x)[0][0], torch.as_tensor(np.asarray(g[3])), atol=1e-5)


def test_features_cli_bad_out(colour_folder, tiny_checkpoint, tmp_path):
    with pytest.raises(SystemExit, match=r"\.safetensors or \.npz"):
        capi_features.main(["--checkpoint", str(tiny_checkpoint), "--images", str(colour_folder), "--out", "f.txt"])


def test_fashion_mnist_raw_pixel_knn(capsys):
    if not FASHION_MNIST_DIR.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{FASHION_MNIST_DIR} is missing: .ci/run installs dataset-fashion-mnist")
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    args = [
        "knn",
        "--checkpoint",
        "raw-pixels",
        "--dataset",
        "fashion-mnist",
        "--limit-train",
        "2000",
        "--limit-test",
        "500",
    ]
    capi_eval.main(args)
    row = json.loads(capsys.readouterr().out)
    assert row["n_train"] == 2000 and 0.65 < row["top1"] < 0.95


def test_patch_labels_and_mean_iou_by_hand():
    from capi_lab.evaluation.segmentation import mean_iou, patch_labels

    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :2, :2] = 1  # top-left patch all class 1
    labels[0, 2, 2] = 2  # one pixel of class 2 in the bottom-right patch: majority stays 0
    assert patch_labels(labels, 2, 3).tolist() == [[[1, 0], [0, 0]]]
    pred = torch.tensor([[0, 1], [1, 1]])
    target = torch.tensor([[0, 1], [0, 1]])
    miou, acc = mean_iou(pred, target, 3)  # class 0: 1/2, class 1: 2/3, class 2 absent
    assert miou == pytest.approx((1 / 2 + 2 / 3) / 2) and acc == pytest.approx(0.75)


@pytest.fixture(scope="module")
def stamps(tmp_path_factory):
    """Synthetic 'cut-outs': red discs and green bars with exact alpha masks."""
    root = tmp_path_factory.mktemp("stamps")
    yy, xx = np.mgrid[:40, :40]
    for cls, colour in (("discs", (220, 30, 30)), ("bars", (30, 200, 30))):
        (root / cls).mkdir()
        for i in range(6):
            a = np.zeros((40, 40, 4), np.uint8)
            a[..., :3] = colour
            shape = ((yy - 20) ** 2 + (xx - 20) ** 2 < (12 + i) ** 2) if cls == "discs" else (abs(xx - 20) < 4 + i)
            a[..., 3] = np.where(shape, 255, 0)
            Image.fromarray(a, "RGBA").save(root / cls / f"{i}.png")
    return root


def test_generated_segmentation_set_is_exact_and_deterministic(stamps):
    from capi_lab.data import demo_photo_paths
    from capi_lab.evaluation.segmentation import StampSegmentation

    ds = StampSegmentation(stamps, demo_photo_paths(), n_images=6, image_size=32, split="train")
    img, lab = ds[3]
    again_img, again_lab = ds[3]
    assert img.size == (32, 32) and lab.shape == (32, 32) and np.array_equal(lab, again_lab)
    assert ds.classes == ["bars", "discs"] and set(np.unique(lab)) <= {0, 1, 2} and (lab > 0).any()
    # labelled pixels carry the stamp's colour
    colour = np.asarray(img)[lab > 0].mean(0)
    assert colour.max() > 150
    test = StampSegmentation(stamps, demo_photo_paths(), n_images=6, image_size=32, split="test")
    assert not set(map(str, sum(test.stamps, []))) & set(map(str, sum(ds.stamps, [])))  # unseen stamps


class _PatchColour(torch.nn.Module):
    """A 'model' whose patch features are the patch's mean colour (the output layout of CAPIModel.forward)."""

    patch_size = 8

    def forward(self, x):
        fm = torch.nn.functional.avg_pool2d(x, self.patch_size).permute(0, 2, 3, 1)
        return None, None, fm


def test_seg_knn_finds_flat_coloured_objects_from_colour_alone(stamps):
    from capi_lab.data import demo_photo_paths
    from capi_lab.evaluation.segmentation import StampSegmentation, seg_knn_miou

    train, test = (
        StampSegmentation(stamps, demo_photo_paths(), n, 64, split) for n, split in ((40, "train"), (20, "test"))
    )
    row = seg_knn_miou(_PatchColour(), train, test, k=5, device="cpu")
    # saturated red and green objects on photos: colour finds them (and their class) far above chance
    assert row["fg_bg_miou"] > 0.65 and row["miou"] > 0.5, row


def test_seg_knn_cli(stamps, tiny_checkpoint, capsys, tmp_path):
    args = ["seg-knn", "--checkpoint", str(tiny_checkpoint), "--dataset", str(stamps), "--n-train", "12",
            "--n-test", "6", "--image-size", "32"]  # fmt: skip
    assert capi_eval.main(args) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["task"] == "seg-knn" and row["num_classes"] == 3 and row["k"] == 10  # seg-knn's own default
    assert row["n_train_images"] == 12 and row["n_test_images"] == 6
    assert row["classes"] == ["background", "bars", "discs"] and row["protocol"] == "quick"
    # an explicit --k is kept, 20 included (it was once read as "not given" and replaced by 10)
    assert capi_eval.main([*args, "--k", "20"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["k"] == 20
    with pytest.raises(SystemExit, match="fetch_demo_data.py --only tuxpaint"):
        capi_eval.main(["seg-knn", "--checkpoint", str(tiny_checkpoint), "--dataset", str(tmp_path / "none")])


def test_classification_task_reports_all_four(colour_folder, tiny_checkpoint, capsys):
    capi_eval.main(
        ["classification", "--checkpoint", str(tiny_checkpoint), "--dataset", str(colour_folder), "--k", "3"]
    )
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"knn_global", "knn_mean_patch", "linear_global", "linear_mean_patch"} <= row.keys()
    capi_eval.main(["classification", "--checkpoint", "raw-pixels", "--dataset", str(colour_folder), "--k", "3"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["knn_raw"] == 1.0 and row["linear_raw"] == 1.0
    with pytest.raises(SystemExit, match="unknown preset"):
        capi_eval.main(["knn", "--checkpoint", "random:vit_zz", "--dataset", str(colour_folder)])


def test_eval_works_with_an_authors_layout_checkpoint(colour_folder, tmp_path, capsys):
    model = capi_lab.create_model("tiny", num_prototypes=32)
    path = capi_lab.save_authors_checkpoint(model, tmp_path / "authors.pth")  # backbone only, no heads
    assert capi_eval.main(["knn", "--checkpoint", str(path), "--dataset", str(colour_folder), "--k", "3"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["image_size"] == 64  # no recorded training size: 16 patches
