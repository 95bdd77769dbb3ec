"""WebDataset shards: the writer, the readers' errors, the split over ranks x workers, and exact resume."""

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capi_lab.data import DataError, check_decodable, resolve_source
from capi_lab.data.shards import (
    MANIFEST,
    ShardSource,
    ShardStream,
    buffer_order,
    main,
    open_shards,
    parse_size,
    write_shards,
)
from capi_lab.train import main as train_main

TINY = ["--preset", "tiny", "--batch-size", "8", "--model.num-prototypes", "64"]


def _photos(folder: Path, n: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = (rng.random((36, 44, 3)) * 255).astype("uint8")
        a[: 4 + i % 9] //= 3
        Image.fromarray(a).save(folder / (f"{i:03d}.jpg" if i % 2 else f"{i:03d}.png"))
    return folder


BROKEN = b"\xff\xd8 broken"
"""The start of a JPEG, and nothing after it."""


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path: Path, members: dict[str, bytes]) -> None:
    """A tar holding ``members`` (name -> bytes), in that order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """48 images written as 8 shards of 6 (``--max-count 6``)."""
    root = tmp_path_factory.mktemp("shards")
    write_shards(str(_photos(root / "photos", 48)), root / "sh", max_count=6, progress=False)
    return root / "sh"


def _keys(stream: ShardStream, workers: int, batches: int) -> list[list[str]]:
    loader = torch.utils.data.DataLoader(stream, batch_size=stream.batch_size, num_workers=workers, collate_fn=list)
    out = []
    for batch, _ in zip(loader, range(batches), strict=False):
        out.append([key for key, _, _ in batch])
    return out


def test_writer_keeps_the_files_bytes_skips_bad_images_and_refuses_to_overwrite(tmp_path, capsys):
    src = _photos(tmp_path / "photos", 10)
    (src / "broken.jpg").write_bytes((src / "001.jpg").read_bytes()[:200])  # truncated JPEG
    (src / "notes.png").write_bytes(b"not an image")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "tiny.bmp")  # re-encoded as PNG
    assert main([str(src), str(tmp_path / "sh"), "--shard-size", "15KB", "--num-workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "wrote 11 images" in out and "2 skipped" in out and "--data " in out
    manifest = json.loads((tmp_path / "sh" / MANIFEST).read_text())
    assert sorted(s["image"].rsplit("/", 1)[1] for s in manifest["skipped"]) == ["broken.jpg", "notes.png"]
    assert "not an image" in next(s["error"] for s in manifest["skipped"] if s["image"].endswith("notes.png"))
    assert len(manifest["shardlist"]) >= 2 and sum(s["nsamples"] for s in manifest["shardlist"]) == 11
    tars = sorted((tmp_path / "sh").glob("*.tar"))
    assert [t.name for t in tars] == [s["url"] for s in manifest["shardlist"]]  # no empty trailing shard
    with tarfile.open(tars[0]) as tar:
        names = tar.getnames()
        first = tar.extractfile("000000000.png").read()
        meta = json.loads(tar.extractfile("000000000.json").read())
    assert sorted(names[:2]) == ["000000000.json", "000000000.png"] and meta["source"].endswith("000.png")
    assert first == (src / "000.png").read_bytes()  # the file itself, not a re-encoding
    with pytest.raises(SystemExit, match="already holds shards .* add --overwrite"):
        main([str(src), str(tmp_path / "sh")])
    assert main([str(src), str(tmp_path / "sh"), "--overwrite", "--max-count", "100"]) == 0
    assert len(list((tmp_path / "sh").glob("*.tar"))) == 1
    assert parse_size("1GB") == 10**9 and parse_size("64KiB") == 65536 and parse_size("2e9") == 2 * 10**9
    with pytest.raises(DataError, match="give a size like 1GB"):
        parse_size("big")
    for flags, message in ((["--shard-size", "big"], "--shard-size 'big': give a size like 1GB"),
                           (["--max-count", "0"], "--max-count must be >= 1, got 0"),
                           (["--num-workers", "-1"], "--num-workers must be >= 0")):  # fmt: skip
        with pytest.raises(SystemExit, match=f"^error: {re.escape(message)}"):
            main([str(src), str(tmp_path / "other"), *flags])
    assert not (tmp_path / "other").exists()  # a bad flag writes nothing


def test_every_way_of_naming_shards_reads_the_same(shards):
    pattern = str(shards / "shard-{000000..000007}.tar")
    by_pattern, by_folder, by_manifest = (resolve_source(s) for s in (pattern, shards, shards / MANIFEST))
    assert isinstance(by_pattern, ShardSource) and len(by_pattern) == 48
    assert by_pattern.shards == by_folder.shards == by_manifest.shards
    assert [s.count for s in by_pattern.shards] == [6] * 8
    glob = open_shards(str(shards / "shard-*.tar"))
    assert glob.shards == by_pattern.shards
    check_decodable(by_pattern)


def test_bad_patterns_and_shards_get_errors_that_say_what_to_do(shards, tmp_path):
    with pytest.raises(DataError, match="matches no shard"):
        open_shards(str(tmp_path / "none-*.tar"))
    with pytest.raises(DataError, match=r"2 of the 10 shards it names do not exist .*brace range"):
        open_shards(str(shards / "shard-{000000..000009}.tar"))
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    with pytest.raises(DataError, match="hold no images"):
        open_shards(str(empty))
    (tmp_path / "junk.tar").write_bytes(b"\x00" * 10 + b"junk" * 100)
    with pytest.raises(DataError, match="hold no images|not a readable tar"):
        open_shards(str(tmp_path / "junk.tar"))
    with pytest.raises(DataError, match="remote shards need their image counts"):
        open_shards("https://example.org/shards/train-{0000..0003}.tar")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="is not a shard manifest"):
        open_shards(str(tmp_path / "bad.json"))
    (tmp_path / "bad.json").write_text('{"shardlist": [{"url": "a.tar"}]}')
    with pytest.raises(DataError, match="has a shard entry without url and nsamples"):
        open_shards(str(tmp_path / "bad.json"))
    (tmp_path / "bad.json").write_text('{"shardlist": [{"url": "gone.tar", "nsamples": 3}]}')
    with pytest.raises(DataError, match="the manifest names .*gone.tar, which does not exist"):
        open_shards(str(tmp_path / "bad.json"))
    stream = ShardStream(open_shards(str(shards)), 16, 4, rank=0, world_size=2)
    with pytest.raises(DataError, match=r"8 shards cannot feed 2 rank\(s\) x 5 loader worker\(s\) = 10 readers"):
        stream.check_split(5)


def test_training_refuses_more_readers_than_shards_before_building_a_model(shards, tmp_path, monkeypatch):
    from capi_lab import train

    monkeypatch.setattr(train, "build_trainer", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(SystemExit, match=r"error: 8 shards cannot feed 1 rank\(s\) x 9 loader worker\(s\)"):
        train_main([*TINY, "--num-workers", "9", "--data", str(shards), "--output-dir", str(tmp_path / "r")])


def test_shards_with_no_decodable_image_stop_with_one_line(tmp_path):
    _tar(tmp_path / "junk.tar", {f"{k:03d}.jpg": BROKEN for k in range(8)})
    with pytest.raises(SystemExit, match=r"^error: none of the first 8 images of .*junk.tar can be decoded"):
        train_main([*TINY, "--num-workers", "1", "--data", str(tmp_path / "junk.tar"), "--output-dir",
                    str(tmp_path / "r"), "--max-steps", "2"])  # fmt: skip
    with pytest.raises(DataError, match=r"none of the 4 images of a batch could be decoded \(shards \['.*junk.tar'\]"):
        next(iter(ShardStream(open_shards(str(tmp_path / "junk.tar")), 16, 4)))
    # one good image first (the start-up check passes), then a whole batch of broken ones, in a loader worker
    late = {"000.png": _png(np.full((40, 40, 3), 90, np.uint8)), **{f"{k:03d}.jpg": BROKEN for k in range(1, 17)}}
    _tar(tmp_path / "late.tar", late)
    with pytest.raises(SystemExit, match=r"^error: none of the 8 images of a batch could be decoded \(shards"):
        train_main([*TINY, "--num-workers", "1", "--data", str(tmp_path / "late.tar"), "--output-dir",
                    str(tmp_path / "r2"), "--max-steps", "4"])  # fmt: skip


def test_uneven_shards_are_warned_about(shards, caplog):
    stream = ShardStream(open_shards(str(shards)), 16, 4, world_size=3)
    with caplog.at_level(logging.WARNING):
        stream.check_split(1)
    assert "8 shards do not spread evenly over 3 readers" in caplog.text


def test_two_ranks_by_two_workers_read_every_image_once_an_epoch(shards):
    """8 shards of 6 over 2 ranks x 2 workers: each reader has 2 shards (12 images, 4 batches of 3) an epoch, so
    8 batches of each rank are one epoch."""
    source = open_shards(str(shards))
    every = sorted(f"{s.url}#{i:09d}" for n, s in enumerate(source.shards) for i in range(6 * n, 6 * n + 6))
    per_rank = [_keys(ShardStream(source, 16, 3, r, 2, buffer=5, with_keys=True), 2, 16) for r in range(2)]
    for epoch in range(2):
        seen = [k for rank in per_rank for batch in rank[8 * epoch : 8 * epoch + 8] for k in batch]
        assert len(seen) == 48 and sorted(seen) == every, epoch  # each image once: none twice, none left out
    first, second = ([k for r in per_rank for b in r[8 * e : 8 * e + 8] for k in b] for e in (0, 1))
    assert first != second  # a new shard permutation and shuffle each epoch


def test_a_stream_restarted_at_any_step_continues_exactly(shards):
    source = open_shards(str(shards))
    full = _keys(ShardStream(source, 16, 3, 1, 2, buffer=5, with_keys=True), 2, 20)
    for start in (3, 7, 13):  # mid-epoch, across the epoch boundary, another worker parity
        resumed = _keys(ShardStream(source, 16, 3, 1, 2, start_step=start, buffer=5, with_keys=True), 2, 20 - start)
        assert resumed == full[start:], start


def test_the_buffer_shuffles_and_emits_each_input_once():
    order = buffer_order(1000, 50, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(1000))
    assert 0.5 < np.mean(np.abs(order - np.arange(1000))) / 50 < 5  # mixed locally, within about the buffer
    assert (buffer_order(10, 100, np.random.default_rng(1)) != np.arange(10)).any()  # a large buffer: a shuffle


def test_corrupt_and_truncated_shards_are_skipped_counted_and_keep_the_batch_shape(shards, tmp_path, caplog):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in shards.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    pngs = {f"x{k:03d}.png": _png(np.full((20, 20, 3), 40 * k, np.uint8)) for k in range(6)}
    _tar(bad / "shard-000001.tar", {**pngs, "x002.png": b"\x89PNG broken"})  # a corrupt image among good ones
    raw = (bad / "shard-000002.tar").read_bytes()
    (bad / "shard-000002.tar").write_bytes(raw[: len(raw) // 3])  # truncated: the manifest still says 6
    source = open_shards(str(bad))
    assert len(source) == 48
    with caplog.at_level(logging.WARNING):
        stream = iter(ShardStream(source, 16, 6))
        items = [next(stream) for _ in range(48)]  # one epoch
    assert all(x.shape == (3, 16, 16) for x, _, _ in items) and [p for _, p, _ in items] == list(range(48))
    skipped = sum(s for _, _, s in items)
    assert 1 + 3 <= skipped <= 1 + 6  # the broken PNG, and the images the truncated shard lost
    assert "cannot decode it" in caplog.text and "shard-000002.tar holds" in caplog.text


def test_training_on_shards_with_workers_resumes_exactly(shards, tmp_path, interrupt_and_resume, caplog):
    common = [*TINY, "--num-workers", "2", "--data", str(shards), "--log-every", "1", "--max-steps", "7",
              "--checkpoint-every", "3"]  # fmt: skip
    assert train_main([*common, "--output-dir", str(tmp_path / "once")]) == 0
    # interrupted just after the step-3 checkpoint: the workers' roles swap on resume (3 is odd)
    assert interrupt_and_resume(train_main, [*common, "--output-dir", str(tmp_path / "twice")], 3) == 0
    once, twice = (
        [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("once", "twice")
    )
    assert [r["step"] for r in twice] == list(range(1, 8))
    assert [r["capi_loss"] for r in once] == [r["capi_loss"] for r in twice]
    ck = torch.load(tmp_path / "twice" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["data_readers"] == 2
    with caplog.at_level(logging.WARNING):  # one worker instead of two: another order, said so
        assert train_main([*TINY, "--num-workers", "1", "--data", str(shards), "--max-steps", "8",
                           "--checkpoint-every", "3", "--output-dir", str(tmp_path / "twice")]) == 0  # fmt: skip
    assert "read its shards with 2 readers (ranks x loader workers), this one with 1" in caplog.text


def test_the_writer_takes_any_source_arrays_included(tmp_path, monkeypatch):
    from capi_lab.data import ArrayImages
    from capi_lab.data import shards as shards_module

    pixels = np.random.default_rng(0).integers(0, 256, (10, 12, 12), dtype=np.uint8)
    monkeypatch.setattr(shards_module, "resolve_source", lambda spec: ArrayImages(pixels, name="digits"))
    manifest = write_shards("digits", tmp_path / "sh", progress=False)
    assert manifest["images"] == 10 and not manifest["skipped"]
    with tarfile.open(tmp_path / "sh" / manifest["shardlist"][0]["url"]) as tar:
        img = Image.open(io.BytesIO(tar.extractfile("000000003.png").read()))
    assert np.array_equal(np.asarray(img.convert("L")), pixels[3])  # lossless


def _cmd(data, out, steps):
    return [sys.executable, "-m", "capi_lab.train", *TINY, "--num-workers", "2", "--data", str(data), "--output-dir",
            str(out), "--max-steps", str(steps), "--checkpoint-every", "5", "--log-every", "5"]  # fmt: skip


def test_sigkill_on_shards_then_the_same_command_sees_the_same_samples(shards, tmp_path):
    out, steps = tmp_path / "killed", 36
    proc = subprocess.Popen(_cmd(shards, out, steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "step_0000010.ckpt").exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    step = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["step"]
    assert 5 <= step < steps
    res = subprocess.run(_cmd(shards, out, steps), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"at step {step}" in res.stdout
    assert train_main(_cmd(shards, tmp_path / "straight", steps)[3:]) == 0  # the uninterrupted run, in-process
    killed, straight = (
        {r["step"]: r["capi_loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())}
        for d in (out, tmp_path / "straight")
    )
    assert killed == straight and max(killed) == steps  # the same samples, crops and masks after the kill


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu_read_the_shards(shards, tmp_path):
    """The multi-node path as far as one machine goes: torchrun, 2 processes, gloo, 2 workers each."""
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "capi_lab.train", *TINY,
           "--num-workers", "2", "--data", str(shards), "--output-dir", str(out), "--max-steps", "6",
           "--log-every", "1", "--checkpoint-every", "3", "--accelerator", "cpu", "--devices", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and np.isfinite(rows[-1]["capi_loss"])
    ck = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["data_readers"] == 4 and ck["stream_position"] == 6 * 8 * 2
    assert Counter(r["step"] for r in rows)[6] == 1


COUNT_KEYS = """
import json, os, sys, torch
from capi_lab.data.shards import ShardStream, open_shards
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
stream = ShardStream(open_shards(sys.argv[1]), 16, 3, rank, world, buffer=5, with_keys=True)
loader = torch.utils.data.DataLoader(stream, batch_size=3, num_workers=2, collate_fn=list)
keys = [k for batch, _ in zip(loader, range(8)) for k, _, _ in batch]  # one epoch: 8 shards of 6 over 4 readers
with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
    json.dump({"keys": keys, "pid": os.getpid()}, f)
"""


@pytest.mark.slow
def test_two_torchrun_processes_by_two_workers_read_every_image_once(shards, tmp_path):
    (tmp_path / "count.py").write_text(COUNT_KEYS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(tmp_path / "count.py"),
           str(shards), str(tmp_path)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["pid"] != ranks[1]["pid"]
    keys = ranks[0]["keys"] + ranks[1]["keys"]
    assert len(keys) == 48 and len(set(keys)) == 48  # 2 processes x 2 workers: every image once, none twice
    assert len({k.split("#")[0] for k in ranks[0]["keys"]} & {k.split("#")[0] for k in ranks[1]["keys"]}) == 0
