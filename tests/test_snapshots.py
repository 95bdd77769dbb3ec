"""Snapshots during training (capi_lab.snapshots): what is written, that the numbers match the maps, resume, bad
probe folders, and the similarity palette the maps are coloured with."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import capi_lab
from capi_lab import explore as ex
from capi_lab.config import ConfigError, MaskConfig
from capi_lab.explore import render as rd
from capi_lab.snapshots import AGREE_COLORS, MIN_SNAPSHOT_INTERVAL, Snapshotter, overview, read_index, snapshot_interval
from capi_lab.train import main

TINY = ["--preset", "tiny", "--num-workers", "0", "--batch-size", "8", "--model.num-prototypes", "64"]


def test_a_run_writes_a_snapshot_at_step_0_every_n_steps_and_at_the_end(images, tmp_path):
    out = tmp_path / "run"
    assert main([*TINY, "--data", str(images), "--output-dir", str(out), "--max-steps", "5",
                 "--snapshot-every", "2"]) == 0  # fmt: skip
    index = read_index(out)
    assert [r["step"] for r in index] == [0, 2, 4, 5]
    names = [p.stem for p in ex.example_photos()]
    assert index[0]["images"] == names
    for r in index:
        folder = out / "snapshots" / r["folder"]
        for kind in ("pca", "clusters", "predict"):
            for n in names:
                assert Image.open(folder / f"{kind}_{n}.png").size == (7, 7)  # the 28 px training grid
        # overview.png is drawn for the last snapshot only (it would double a snapshot's cost); overview() draws any
        assert (folder / "overview.png").exists() == (r["step"] == 5)
        drawn = overview(folder)
        assert drawn.height > 7 * 128 and drawn.width == 4 * 128 + 3 * 4
        if r["step"] == 5:
            assert (np.asarray(Image.open(folder / "overview.png").convert("RGB")) == np.asarray(drawn)).all()
        detail = json.loads((folder / "snapshot.json").read_text())
        assert detail["step"] == r["step"] and set(detail["per_image"]) == set(names)
    for n in names:
        assert Image.open(out / "snapshots" / "images" / f"{n}.png").size == (192, 192)
    # metrics.jsonl keeps one line per logged step; the snapshot numbers are in the loggers' CSV too
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))
    csv = next((out / "csv_logs").rglob("metrics.csv")).read_text()
    assert "snapshot/pred_top1" in csv.splitlines()[0]


def test_the_numbers_are_the_maps(images, tmp_path):
    """Every figure of a snapshot recomputes from its numbers.npz, and the PNGs show those arrays."""
    out = tmp_path / "run"
    assert main([*TINY, "--data", str(images), "--output-dir", str(out), "--max-steps", "2",
                 "--snapshot-every", "2"]) == 0  # fmt: skip
    rec = read_index(out)[-1]
    folder = out / "snapshots" / rec["folder"]
    arrays = np.load(folder / "numbers.npz", allow_pickle=False)
    detail = json.loads((folder / "snapshot.json").read_text())
    colors = arrays["prototype_colors"]
    top1 = []
    for name, d in detail["per_image"].items():
        mask, teacher, predicted = arrays[f"mask_{name}"], arrays[f"teacher_{name}"], arrays[f"predicted_{name}"]
        assert 0 < mask.sum() < mask.size and (predicted[~mask] == -1).all() and (predicted[mask] >= 0).all()
        hit = (predicted[mask] == teacher[mask]).mean()
        assert d["pred_top1"] == pytest.approx(hit) and d["pred_top5"] >= d["pred_top1"]
        assert d["clusters_used"] == np.unique(teacher).size
        top1.append(hit)
        shown = np.asarray(Image.open(folder / f"clusters_{name}.png"))
        assert (shown == colors[teacher]).all()
        agree = np.asarray(Image.open(folder / f"predict_{name}.png"))
        assert (agree[~mask] == AGREE_COLORS["visible"]).all()
        assert ((agree[mask] == AGREE_COLORS["top1"]).all(-1) == (predicted[mask] == teacher[mask])).all()
    assert rec["snapshot/pred_top1"] == pytest.approx(np.mean(top1))
    # and the teacher checkpoint of that step gives the same predictions again
    model = capi_lab.load_pretrained(out / "checkpoints" / "last.ckpt")
    snap = Snapshotter(tmp_path / "again", None, 28, 4, MaskConfig(**model_mask(out)), seed=0)
    again = snap(model, 2)
    assert again["snapshot/pred_top1"] == pytest.approx(rec["snapshot/pred_top1"])


def model_mask(out):
    from capi_lab.command_line import read_yaml

    return read_yaml(out / "config.yaml")["mask"]


def test_resume_cuts_the_index_back(images, tmp_path, interrupt_and_resume):
    out = tmp_path / "run"
    argv = [*TINY, "--data", str(images), "--output-dir", str(out), "--max-steps", "6", "--checkpoint-every", "2",
            "--snapshot-every", "3"]  # fmt: skip
    assert interrupt_and_resume(main, argv, 5) == 0  # snapshot at 3 written, checkpoint at 4: resumes from 4
    lines = (out / "snapshots" / "index.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 3, 6]


def test_snapshots_off_and_the_default_interval(images, tmp_path):
    out = tmp_path / "run"
    assert main([*TINY, "--data", str(images), "--output-dir", str(out), "--max-steps", "2",
                 "--snapshot-every", "0"]) == 0  # fmt: skip
    assert not (out / "snapshots").exists()
    # by default 20 a run, but never closer than MIN_SNAPSHOT_INTERVAL steps (a short run: step 0 and its end)
    assert MIN_SNAPSHOT_INTERVAL == 50
    assert snapshot_interval(None, 3000) == 150 and snapshot_interval(None, 300) == 50
    assert snapshot_interval(None, 7) == 50 and snapshot_interval(0, 9) == 0 and snapshot_interval(3, 9) == 3
    with pytest.raises(SystemExit, match="--snapshot-every must be >= 0"):
        main([*TINY, "--data", str(images), "--output-dir", str(out), "--snapshot-every", "-1"])


def test_probe_folder(images, tmp_path):
    probes = tmp_path / "probes"
    probes.mkdir()
    with pytest.raises(SystemExit, match="holds no image"):
        main([*TINY, "--data", str(images), "--output-dir", str(tmp_path / "a"), "--snapshot-images", str(probes)])
    assert not (tmp_path / "a").exists()  # refused before anything was written
    with pytest.raises(SystemExit, match="is not a folder"):
        main([*TINY, "--data", str(images), "--output-dir", str(tmp_path / "a"),
              "--snapshot-images", str(tmp_path / "nope")])  # fmt: skip
    (probes / "broken.jpg").write_bytes(b"not a jpeg")
    Image.fromarray((np.random.default_rng(0).random((50, 30, 3)) * 255).astype("uint8")).save(probes / "tall.png")
    out = tmp_path / "b"
    assert main([*TINY, "--data", str(images), "--output-dir", str(out), "--max-steps", "1",
                 "--snapshot-images", str(probes)]) == 0  # fmt: skip
    assert read_index(out)[0]["images"] == ["tall"]  # the broken file skipped, the tall one cropped square
    assert Image.open(out / "snapshots" / "step_0000001" / "pca_tall.png").size == (7, 7)


def test_read_index_survives_a_half_written_line(tmp_path):
    (tmp_path / "snapshots").mkdir()
    (tmp_path / "snapshots" / "index.jsonl").write_text(
        '{"step": 0, "folder": "step_0000000"}\n{"step": 5, "folder": "step_0000005"}\n{"step": 10, "fol'
    )
    assert [r["step"] for r in read_index(tmp_path)] == [0, 5]
    assert read_index(tmp_path / "missing") == []


def test_similarity_palette_gives_similar_prototypes_similar_colours():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 32, generator=g)
    protos = torch.cat(
        [centres + 0.05 * torch.randn(8, 32, generator=g), centres + 0.05 * torch.randn(8, 32, generator=g)]
    )
    colors = rd.similarity_palette(protos).astype(float)
    assert colors.shape == (16, 3) and colors.min() >= 40 and colors.max() <= 240
    twins = np.linalg.norm(colors[:8] - colors[8:], axis=1)
    others = np.linalg.norm(colors[:8, None] - colors[None, 8:], axis=-1)[~np.eye(8, dtype=bool)]
    assert twins.mean() < 0.3 * others.mean()
    assert (rd.similarity_palette(protos) == rd.similarity_palette(protos)).all()  # no randomness
    assert rd.similarity_palette(torch.randn(1, 4)).shape == (1, 3)


def test_batched_reconstruction_equals_one_image_at_a_time():
    model = capi_lab.create_model("tiny", num_prototypes=32).eval()
    images = [Image.fromarray((np.random.default_rng(i).random((28, 28, 3)) * 255).astype("uint8")) for i in range(3)]
    rng = np.random.default_rng(0)
    masks = np.stack([rng.permutation(49).reshape(7, 7) < 30 for _ in images])
    x = torch.stack([ex.prepare(im, 28, 4)[0][0] for im in images])
    batch = ex.reconstruct_batch(model, x, masks)
    for im, m, (rec, feats, _) in zip(images, masks, batch, strict=True):
        one, enc = ex.reconstruct_with_mask(model, im, 28, m)
        assert (one.predicted == rec.predicted).all() and one.top1 == pytest.approx(rec.top1)
        assert torch.allclose(enc.features, feats, atol=1e-5)
    with pytest.raises(ex.InputError, match="same number"):
        ex.reconstruct_batch(model, x[:2], np.stack([masks[0], ~masks[0]]))


def test_fsdp_refuses_explicit_snapshots():
    from capi_lab.train import resolve_config

    with pytest.raises(SystemExit, match="does not work with --strategy fsdp"):
        resolve_config(["--strategy", "fsdp", "--devices", "2", "--snapshot-every", "5"])
    assert resolve_config(["--strategy", "fsdp", "--devices", "2"]).snapshot_interval == 0


def test_snapshotter_refuses_an_empty_probe_list(tmp_path):
    with pytest.raises(ConfigError, match="holds no image"):
        Snapshotter(tmp_path, str(tmp_path), 28, 4, MaskConfig())
