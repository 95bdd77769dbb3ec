"""The Gradio app: every view at handler level, every bad input, concurrent API clients, a real browser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import app.main as app
import capi_lab
from app import browser_check
from capi_lab import explore as ex
from capi_lab.explore import render as rd

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


PHOTOS = [str(p) for p in app.EXAMPLES]


@pytest.fixture(scope="module")
def wb():
    return app.Workbench(capi_lab.load_pretrained("default"), "default")


def _is_picture(x) -> bool:
    return isinstance(x, Image.Image) and x.mode == "RGB" and min(x.size) > 0


def test_importing_the_app_loads_nothing_and_builds_in_a_function():
    src = (ROOT / "app" / "main.py").read_text()
    assert 'if __name__ == "__main__":' in src
    assert not hasattr(app, "demo")  # nothing built or launched at import


def test_pca_view(wb):
    maps, comps, fig, status = app.pca_view(wb, PHOTOS[:3], 64, 3)
    assert len(maps) == 6 and len(comps) == 3  # own and joint PCA per image
    pic, caption = maps[1]
    assert _is_picture(pic) and "joint PCA" in caption and "own PCA" in maps[0][1]
    assert max(pic.size) == app.DISPLAY_SIDE  # readable: shown at 384 px, not at the model's 64
    assert comps[0][0].size == (2 * 192 + 4, 2 * 192 + 4)  # 3 components in a 2 x 2 grid, 192 px each
    assert "components 1–3, row by row" in comps[0][1]
    ev = fig.data[0].y
    assert len(ev) >= 3 and np.all(np.diff(ev) <= 1e-6) and 0 < sum(ev) <= 1 + 1e-6
    assert "3 image(s) at 64 px" in status


def test_joint_pca_colours_agree_across_images(wb):
    """The same image twice gets identical joint-PCA colours; per-image PCA is sign-fixed and repeatable."""
    enc = wb.encode(ex.load_images([PHOTOS[0], PHOTOS[0]])[0], 64)
    res = ex.pca_maps(enc)
    assert np.allclose(res.joint[0], res.joint[1])
    again = ex.pca_maps(enc)
    assert np.array_equal(res.per_image[0], again.per_image[0])


def test_clusters_view_with_and_without_balancing(wb):
    maps, ents, gallery, legend, status = app.clusters_view(wb, PHOTOS[:2], 64, False, 5)
    assert len(maps) == 2 and len(ents) == 2 and 1 <= len(gallery) <= 5
    assert all(_is_picture(p) for p, _ in maps + ents + gallery) and _is_picture(legend)
    assert all(max(p.size) >= app.DISPLAY_SIDE for p, _ in maps + ents)
    assert "prototype similarity" in status
    assert "clustering head" in status and "softmax" in status
    *_, status_b = app.clusters_view(wb, PHOTOS[:2], 64, True, 5)
    assert "Sinkhorn-balanced" in status_b
    enc = wb.encode(ex.load_images(PHOTOS[:2])[0], 64)
    plain, balanced = ex.cluster_maps(enc, balance=False), ex.cluster_maps(enc, balance=True)
    # balancing spreads the patches over more clusters
    assert len(balanced.usage) > len(plain.usage)
    assert max(c for _, c in balanced.usage) < max(c for _, c in plain.usage)


def test_clusters_fall_back_to_kmeans_without_clustering_head(wb):
    backbone_only = capi_lab.CAPIModel(wb.model.config, student_head=False, clustering_head=False)
    backbone_only.load_state_dict(wb.model.state_dict(), strict=False)
    bare = app.Workbench(backbone_only, "authors-style backbone")
    maps, _, gallery, _, status = app.clusters_view(bare, PHOTOS[:2], 64)
    assert "k-means" in status and "no clustering head" in status
    assert len(maps) == 2 and gallery
    with pytest.raises(ex.InputError, match="no student head"):
        app.reconstruct_view(bare, PHOTOS[:1])
    assert "backbone only" in bare.describe()


@pytest.mark.parametrize("strategy", app.STRATEGIES)
def test_reconstruct_view(wb, strategy):
    pics, legend, status = app.reconstruct_view(wb, PHOTOS[:2], 1, 64, strategy, 0.5, False, 3)
    assert len(pics) == 5 and all(_is_picture(p) for p, _ in pics)
    assert PHOTOS[1].endswith(status.split("**")[1])  # the chosen image
    rec, _ = ex.reconstruct(wb.model, ex.load_images(PHOTOS[1:2])[0][0].image, 64, strategy, 0.5, False, 3)
    assert rec.mask.sum() == 32  # half of the 8x8 patches
    assert (rec.predicted[rec.mask] >= 0).all() and (rec.predicted[~rec.mask] == -1).all()
    # the scores are what the maps show: agreement over the masked patches, top-5 including top-1
    assert rec.top1 == pytest.approx((rec.predicted == rec.teacher)[rec.mask].mean())
    assert rec.top5 == pytest.approx(rec.in_top5[rec.mask].mean()) and rec.top5 >= rec.top1
    assert f"{rec.top1:.1%}" in status


def test_reconstruction_beats_chance(wb):
    """The default model's predictor names the teacher's cluster far above chance (1/K at top-1, 5/K at top-5):
    its model card measures 21x and 9x on held-out photos."""
    imgs = ex.load_images(PHOTOS)[0]
    recs = [ex.reconstruct(wb.model, li.image, 64, seed=s)[0] for li in imgs for s in range(2)]
    k = wb.model.config.num_prototypes
    assert np.mean([r.top1 for r in recs]) > 5 / k and np.mean([r.top5 for r in recs]) > 3 * 5 / k


def test_reconstruct_rejects_bad_settings(wb):
    with pytest.raises(ex.InputError, match="strategy"):
        app.reconstruct_view(wb, PHOTOS[:1], 0, 64, "checkerboard")
    with pytest.raises(ex.InputError, match="out of range"):
        app.reconstruct_view(wb, PHOTOS[:1], 3, 64)
    with pytest.raises(ex.InputError, match="0 masked"):
        app.reconstruct_view(wb, PHOTOS[:1], 0, 16, "random", 0.1)  # 2x2 patches: nothing to mask


def test_similarity_view_and_click_mapping(wb):
    out, legend, status = app.similarity_view(wb, PHOTOS[:3], 1, 2, 5, 64)
    assert _is_picture(legend) and "cosine" in status
    assert len(out) == 3 and "(query image)" in out[1][1]
    enc = wb.encode(ex.load_images(PHOTOS[:3])[0], 64)
    sims = ex.similarity_maps(enc, 1, 2, 5)
    assert sims[1][2, 5] == pytest.approx(1.0, abs=1e-5)  # a patch is most similar to itself
    assert all(s.max() <= 1 + 1e-5 and s.min() >= -1 - 1e-5 for s in sims)
    assert ex.patch_at((8, 8), (64, 64), 63.9, 0.0) == (0, 7)
    assert ex.patch_at((8, 8), (64, 64), 20, 41) == (5, 2)
    with pytest.raises(ex.InputError, match="outside"):
        app.similarity_view(wb, PHOTOS[:1], 0, 8, 0, 64)


def test_model_panel(wb):
    text = wb.describe()
    for part in ("Source", "encoder 6 blocks × 192", "patch 8", "Parameters", "Training", "MODEL_CARD"):
        assert part in text


# ------------------------------------------------------------------------------------ side by side
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, images):
    """A run trained here: 6 steps of a small `tiny` with a snapshot every 2 steps, in runs/fmnist-like layout."""
    from capi_lab.train import main

    out = tmp_path_factory.mktemp("runs") / "tiny_run"
    argv = ["--preset", "tiny", "--num-workers", "0", "--batch-size", "8", "--data", str(images), "--output-dir",
            str(out), "--max-steps", "6", "--snapshot-every", "2", "--checkpoint-every", "2"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_side_by_side_views_show_both_models_on_the_same_images(wb, trained_run):
    models = app.Models(wb)
    other = models.get(str(trained_run / "checkpoints" / "last.ckpt"))
    assert other is models.get(str(trained_run / "checkpoints" / "last.ckpt"))  # loaded once
    assert models.get("") is wb and models.get("default") is wb
    maps, comps, fig, status = app.pca_view(wb, PHOTOS[:2], 64, 3, 1.0, other)
    assert len(maps) == 2 * 4 and [c.split(" · ")[0] for _, c in maps[:2]] == ["A", "B"]
    assert "(8×8 patches)" in maps[0][1] and "(16×16 patches)" in maps[1][1]  # same image, each model's grid
    assert maps[0][1].split(":")[0][4:] == maps[1][1].split(":")[0][4:] == "astronaut.jpg"
    assert "A = `default`" in status and len(fig.data) == 4
    cl_maps, ents, _, _, status = app.clusters_view(wb, PHOTOS[:2], 64, False, 5, 0.7, other)
    assert len(cl_maps) == 4 and len(ents) == 4 and "B: " in status
    # each side is the model's own view: B's map is what B alone shows
    alone = app.clusters_view(other, PHOTOS[:2], 64, False, 5, 0.7)[0]
    assert np.array_equal(np.asarray(cl_maps[1][0]), np.asarray(alone[0][0]))
    items, _, status = app.reconstruct_view(wb, PHOTOS[:1], 0, 64, "block", 0.5, True, 0, other)
    assert len(items) == 10 and "B: top-1" in status
    sims, _, _ = app.similarity_view(wb, PHOTOS[:2], 0, 1, 1, 64, 0.7, other)
    assert len(sims) == 4
    with pytest.raises(capi_lab.pretrained.CheckpointError, match="does not exist"):
        models.get(str(trained_run / "nope.ckpt"))


def test_cluster_colours_follow_prototype_similarity(wb):
    """Two prototypes that point the same way get the same colour in the maps, whatever their index."""
    model = capi_lab.create_model("tiny", num_prototypes=16)
    with torch.no_grad():
        w = model.clustering_head.linear.weight
        w[9] = w[2] * 3.0  # same direction, another length and index
    colors = rd.similarity_palette(ex.prototypes(model))
    assert (colors[9] == colors[2]).all()
    assert np.abs(colors.astype(int) - colors[2].astype(int)).sum(1).tolist().count(0) == 2


# ------------------------------------------------------------------------------------------ runs view
def test_runs_view_reads_a_run_while_it_is_written(trained_run, tmp_path):
    assert str(trained_run) in app.run_choices(trained_run.parent)
    status, fig = app.run_view(str(trained_run))
    assert "Step 6 of 6" in status and "prototypes used" in status and "last snapshot at step 6" in status
    titles = {a.text for a in fig.layout.annotations}
    assert {"CAPI loss (student vs teacher clusters)", "target entropy (nats)", "snapshot/pred_top1"} <= titles
    items, text = app.snapshot_view(str(trained_run), 0, "predictor hits", 1.0)
    assert "step 0" in text and len(items) == len(PHOTOS) and max(items[0][0].size) == app.DISPLAY_SIDE
    last, _ = app.snapshot_view(str(trained_run), -1, "predictor hits", 1.0)
    assert "step 6" in last[0][1]
    # the step slider changes the picture: the clusters at step 0 and step 6 differ
    a, _ = app.snapshot_view(str(trained_run), 0, "teacher clusters", 1.0)
    b, _ = app.snapshot_view(str(trained_run), 3, "teacher clusters", 1.0)
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(b[0][0]))
    # a copy being written: a half line in both logs, a snapshot folder not there yet, no config
    import shutil

    live = tmp_path / "live"
    shutil.copytree(trained_run, live)
    (live / "config.yaml").unlink()
    with (live / "metrics.jsonl").open("a") as f:
        f.write('{"step": 8, "capi_loss": 4.')
    with (live / "snapshots" / "index.jsonl").open("a") as f:
        f.write('{"step": 8, "folder": "step_0000008", "images": ["astronaut"]}\n')
    status, _ = app.run_view(str(live))
    assert "Step 6" in status
    items, text = app.snapshot_view(str(live), -1)
    assert items == [] and "missing pictures for astronaut" in text


def test_runs_view_notes_instead_of_errors(tmp_path):
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    status, fig = app.run_view(str(empty))
    assert "no metrics yet" in status and "no snapshots" in status and fig.layout.title.text == "no metrics yet"
    assert "is not a folder" in app.run_view(str(tmp_path / "nope"))[0]
    assert app.snapshot_view(str(empty), 0)[1] == "no snapshots in this run yet"
    nan = tmp_path / "nan_run"
    nan.mkdir()
    lines = [{"step": s, "capi_loss": v, "clustering_loss": 1.0, "target_entropy": 0.5, "prototypes_used": 3}
             for s, v in ((1, 4.0), (2, float("nan")), (3, float("nan")))]  # fmt: skip
    (nan / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (nan / "config.yaml").write_text("max_steps: 10\nmodel:\n  num_prototypes: 64\n")
    status, fig = app.run_view(str(nan))
    assert "NaN/inf loss** at step 2" in status and "few prototypes in use" in status
    assert any(t.name == "NaN" for t in fig.data)
    with pytest.raises(ex.InputError, match="unknown map"):
        app.snapshot_view(str(nan), 0, "edges")


# ----------------------------------------------------------------------------------------- bad input
def _bad_files(tmp: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    f = {}
    f["text"] = tmp / "notes.jpg"
    f["text"].write_text("this is not an image")
    full = tmp / "full.jpg"
    photo.save(full)
    f["truncated"] = tmp / "truncated.jpg"
    f["truncated"].write_bytes(full.read_bytes()[:300])
    f["empty"] = tmp / "empty.png"
    f["empty"].write_bytes(b"")
    f["tiny"] = tmp / "one_pixel.png"
    Image.new("RGB", (1, 1), (255, 0, 0)).save(f["tiny"])
    return f


def test_bad_files_are_named_and_skipped(wb, tmp_path):
    bad = _bad_files(tmp_path)
    maps, _, _, status = app.pca_view(wb, [PHOTOS[0], *map(str, bad.values())], 64)
    assert len(maps) == 2  # the good photo still gets its pictures (own and joint PCA)
    assert "notes.jpg: not an image" in status
    assert "truncated.jpg: a corrupt or truncated image" in status
    assert "empty.png: the file is empty" in status
    assert "one_pixel.png: 1x1 px is too small" in status
    with pytest.raises(ex.InputError, match="none of the files could be used"):
        app.pca_view(wb, [str(bad["text"])], 64)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "I;16", "P"])
def test_other_image_modes_are_converted(wb, tmp_path, mode):
    rng = np.random.default_rng(1)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (50, 60), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / ("x.jpg" if mode in ("L", "CMYK") else "x.png")
    img.save(path)
    images, notes = ex.load_images([path])
    assert images[0].image.mode == "RGB" and images[0].image.size == (60, 50)
    assert any("converted to 8-bit RGB" in n for n in notes)
    if mode == "I;16":  # rescaled, not clipped to white
        assert np.asarray(images[0].image).std() > 20
    maps, *_ , status = app.pca_view(wb, [str(path)], 64)  # fmt: skip
    assert len(maps) == 2 and "converted" in status


def test_huge_image_is_downscaled(wb, tmp_path):
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (12000, 9000), (30, 120, 200)).save(path, quality=50)
    images, notes = ex.load_images([path])
    assert max(images[0].image.size) <= ex.MAX_INPUT_SIDE
    assert "12000x9000 px downscaled" in notes[0]
    maps, *_ = app.pca_view(wb, [str(path)], 64)
    assert maps[0][0].size == (384, 288)  # 4:3 at 64 px longer side (8x6 patches), shown at 384 px


def test_too_many_images_and_oversized_files(wb, tmp_path):
    with pytest.raises(ex.InputError, match=f"at most {ex.MAX_IMAGES}"):
        app.pca_view(wb, [PHOTOS[0]] * (ex.MAX_IMAGES + 1), 64)
    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:  # sparse: no disk used
        f.write(Path(PHOTOS[0]).read_bytes())
        f.truncate((ex.MAX_FILE_MB + 1) * 2**20)
    with pytest.raises(ex.InputError, match=f"over the {ex.MAX_FILE_MB} MB limit"):
        app.pca_view(wb, [str(big)], 64)
    with pytest.raises(ex.InputError, match="no image given"):
        app.pca_view(wb, None, 64)


def test_errors_reach_the_ui_as_messages(wb):
    import gradio as gr

    guarded = app._guard(lambda f: app.pca_view(wb, f, 64))
    with pytest.raises(gr.Error, match="no image given"):
        guarded(None)


def test_bad_checkpoint_paths_give_clear_cli_errors(tmp_path):
    not_ckpt = tmp_path / "weights.pt"
    not_ckpt.write_text("not a checkpoint")
    for args, expect in (
        (["--checkpoint", str(tmp_path / "missing.ckpt")], "does not exist"),
        (["--checkpoint", str(not_ckpt)], "weights.pt"),
    ):
        r = subprocess.run(
            [sys.executable, str(ROOT / "app" / "main.py"), *args], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 2, r.stderr
        assert expect in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------ served app
@pytest.fixture(scope="module")
def served(wb):
    demo = app.build_demo(wb)
    demo.queue(default_concurrency_limit=2).launch(prevent_thread_lock=True, quiet=True, **app.launch_kwargs(port=None))
    yield demo, demo.local_url
    demo.close()


def test_eight_concurrent_api_clients(served):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from gradio_client import Client, handle_file

    _, url = served
    client = Client(url, verbose=False)
    assert {"/pca", "/clusters", "/reconstruct", "/similarity"} <= set(
        client.view_api(return_format="dict")["named_endpoints"]
    )

    def call(i):
        photo = handle_file(PHOTOS[i % len(PHOTOS)])
        if i % 4 == 0:
            return client.predict(images=[photo], resolution=64, components=3, api_name="/pca")  # as the README
        if i % 4 == 1:
            return client.predict([photo], 64, False, 6, api_name="/clusters")
        if i % 4 == 2:
            return client.predict([photo], 0, 64, "block", 0.5, True, i, api_name="/reconstruct")
        return client.predict([photo], 0, 1, 2, 64, api_name="/similarity")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(8)))
    assert len(results) == 8
    for r in results:
        gallery = r[0]
        assert gallery and all(Path(item["image"]).suffix == ".png" for item in gallery)
        assert Image.open(gallery[0]["image"]).mode == "RGB"


def test_real_browser(served, tmp_path):
    """Headless Chromium: upload photos, run each view, wait for its images, click a patch, see a bad file's
    message, and nothing is fetched from the internet. Skips only off CI when Chromium is absent."""
    if browser_check.chromium_path() is None:
        if os.environ.get("CI") or os.environ.get("CAPI_LAB_REQUIRE_BROWSER"):
            pytest.fail("Chromium is missing: `apt-get install chromium` (the CI set-up does this)")
        pytest.skip("no Chromium here: `apt-get install chromium` to run the browser test")
    _, url = served
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    r = browser_check.drive_app(url, PHOTOS[:2], tmp_path, bad_file=str(bad))
    assert r["images"] == {"pca": 4, "clusters": 2, "reconstruct": 5, "similarity": 2}  # own + joint PCA per photo
    assert all(Path(p).stat().st_size > 5000 for p in r["screenshots"].values())
    assert "Top-1 agreement" in r["status"]["reconstruct"]
    assert "(row 0, col 0)" not in r["status"]["similarity_click"]  # the click chose another patch
    assert "broken.jpg: not an image" in r["error_message"]
    assert r["external_requests"] == []


def test_real_browser_runs_view_and_side_by_side(wb, trained_run, tmp_path):
    """Headless Chromium on the Runs view of a run trained here: the curves are drawn, the step slider moves the
    pictures from the newest snapshot to step 0, and the run's checkpoint shows next to the app's model."""
    if browser_check.chromium_path() is None:
        if os.environ.get("CI") or os.environ.get("CAPI_LAB_REQUIRE_BROWSER"):
            pytest.fail("Chromium is missing: `apt-get install chromium` (the CI set-up does this)")
        pytest.skip("no Chromium here: `apt-get install chromium` to run the browser test")
    run_dir = trained_run
    demo = app.build_demo(wb, runs_dir=str(run_dir.parent))
    demo.queue().launch(prevent_thread_lock=True, quiet=True, **app.launch_kwargs(port=None))
    try:
        r = browser_check.drive_runs(demo.local_url, PHOTOS[:1], tmp_path / "shots")
    finally:
        demo.close()
    assert r["curves_drawn"]
    assert "snapshot 4 of 4: step 6" in r["snapshot_status_newest"]
    assert "snapshot 1 of 4: step 0" in r["snapshot_status_first"]
    assert r["first_picture_first"] != r["first_picture_newest"]
    assert Path(r["model_b"]).name == "last.ckpt" and Path(r["model_b"]).parent.parent == run_dir
    assert "Side by side" in r["side_by_side_status"] and r["side_by_side_images"] == 4  # A and B, own + joint
    assert all(Path(p).stat().st_size > 5000 for p in r["screenshots"].values())
    assert r["external_requests"] == []


def test_app_starts_from_the_command_line():
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "app" / "main.py"), "--port", str(port)])
    try:
        t0 = time.time()
        while time.time() - t0 < 60:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail("the app did not answer within 60 s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
