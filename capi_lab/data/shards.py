"""WebDataset tar shards: a training stream over them, and a writer that turns a folder into them.

    python -m capi_lab.data.shards my_photos/ shards/ --shard-size 1GB     # once: folder (or list file) -> shards
    python -m capi_lab.train --data 'shards/shard-{000000..000041}.tar'    # or --data shards/ (its shards.json)

A shard is a plain tar in the WebDataset layout (the one timm, OpenCLIP and the authors' ImageNet-22k source use):
the files of one sample share a key, ``000123.jpg`` + ``000123.json``. Images are read from the keys ``jpg``,
``jpeg``, ``png`` and ``webp``; labels and other keys are ignored. The tar reading and the URL openers are
webdataset's (local paths, ``pipe:CMD``, ``http(s)://`` through curl, ``s3://``/``gs://`` through their CLIs).

**Order, split and resume.** The stream is cut into ``C = ranks x loader workers`` *consumers*. In epoch ``e`` the
shards are permuted by ``(seed, e)`` and consumer ``c`` reads shards ``c, c + C, c + 2C, ...`` of that permutation
in order, through a shuffle buffer seeded by ``(seed, e, c)``: an epoch reads every image once, and no shard is
opened by two consumers. Batch ``b`` of a rank comes from consumer ``b mod W`` of that rank (the DataLoader takes
workers' batches in turn), so after a restart at step ``s`` each worker knows which consumer it plays and how many
of its samples were used: it skips the earlier epochs by the shard counts, and within the current one reads from
the first shard still needed, dropping (without decoding) what was already used. A resumed run sees exactly the
samples, crops and masks the uninterrupted one would have, as long as the ranks x workers are the same (the
checkpoint records them; otherwise a warning says the order changes). The buffer shuffle is simulated on indices
(its choices depend only on the seed), which is what makes that skip exact.

A sample that does not decode, or that a truncated shard no longer holds, is replaced by the next image of its
batch that does (differently cropped, since crops are seeded by position) and counted as skipped, so batch ``b``
always holds the same positions.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import re
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from tqdm.auto import tqdm

from capi_lab.config import ConfigError
from capi_lab.data import (
    DataError,
    FileImages,
    _mix,
    augment,
    decode_side,
    read_image,
    resolve_source,
    train_transform,
)

log = logging.getLogger("capi_lab.data.shards")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
MANIFEST = "shards.json"
MANIFEST_FORMAT = "capi_lab-shards-1"
SHUFFLE_BUFFER = 1000
_REMOTE = re.compile(r"^(pipe:|[a-z][a-z0-9+.-]*://)", re.IGNORECASE)
_META = re.compile(r"__[^/]*__($|/)")


@dataclass(frozen=True)
class Shard:
    url: str
    count: int
    """Samples with an image in it."""


class ShardSource:
    """The shards named by ``--data``, with how many images each holds (from a manifest, or counted once)."""

    def __init__(self, shards: Sequence[Shard], spec: str):
        self.shards, self.spec = list(shards), spec

    def __len__(self) -> int:
        return sum(s.count for s in self.shards)

    def describe(self, i: int) -> str:
        return f"shard {self.shards[i].url}"

    def check(self, image_size: int = 16, sample: int = 32) -> None:
        """Fail early when the first shard's first images cannot be decoded (as :func:`check_decodable` does for
        folders): training would otherwise build the model and stop in the loader."""
        errors = []
        for _, sample_ in zip(range(sample), read_shard(self.shards[0]), strict=False):
            try:
                read_image(io.BytesIO(image_bytes(sample_)), min_side=image_size)
                return
            except Exception as e:
                errors.append(f"{sample_['__key__']}: {str(e).splitlines()[0][:100]}")
        if errors:
            raise DataError(
                f"none of the first {len(errors)} images of {self.shards[0].url} can be decoded, e.g. {errors[0]}; "
                "check that the shards hold images (jpg, png, webp)"
            )
        raise DataError(f"{self.shards[0].url} holds no image samples (keys {', '.join(IMAGE_KEYS)})")


def is_shard_spec(spec: str) -> bool:
    """Whether ``--data spec`` names shards: a tar path or URL, a brace or glob pattern of them, a manifest file,
    or a folder holding a manifest."""
    s = spec.split("::")[0]
    if re.search(r"\.(tar|tar\.gz|tgz)$", s, re.IGNORECASE) or s.endswith(".json"):
        return True
    path = Path(s).expanduser()
    return not _REMOTE.match(s) and path.is_dir() and (path / MANIFEST).is_file()


def expand(pattern: str) -> list[str]:
    """The URLs of a brace pattern (``a-{000..015}.tar``, several with ``::``), or a local glob (``*.tar``)."""
    import braceexpand

    urls = [u for part in pattern.split("::") for u in braceexpand.braceexpand(part)]
    out = []
    for u in urls:
        if not _REMOTE.match(u) and glob.has_magic(u):
            out += sorted(glob.glob(str(Path(u).expanduser())))
        else:
            out.append(u if _REMOTE.match(u) else str(Path(u).expanduser()))
    return out


def open_shards(spec: str) -> ShardSource:
    """The :class:`ShardSource` of ``--data spec`` (see :func:`is_shard_spec`); a :class:`DataError` when a
    pattern matches nothing, a shard is missing or empty, or remote shards come without a manifest."""
    path = Path(spec).expanduser()
    if not _REMOTE.match(spec) and path.is_dir():
        return _from_manifest(path / MANIFEST, spec)
    if spec.endswith(".json"):
        return _from_manifest(spec if _REMOTE.match(spec) else path, spec)
    urls = expand(spec)
    if not urls:
        raise DataError(f"--data {spec!r}: the pattern matches no shard")
    local = [u for u in urls if not _REMOTE.match(u)]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise DataError(
            f"--data {spec!r}: {len(missing)} of the {len(urls)} shards it names do not exist (first: {missing[0]}); "
            "check the brace range, e.g. 'shards/shard-{000000..000041}.tar' for 42 shards"
        )
    counts = _manifest_counts(urls)
    if counts is None:
        remote = [u for u in urls if _REMOTE.match(u)]
        if remote:
            raise DataError(
                f"--data {spec!r}: remote shards need their image counts: give the manifest instead (--data "
                f"URL/{MANIFEST}, as `python -m capi_lab.data.shards` writes it), or copy the shards locally"
            )
        counts = count_images(urls)
    shards = [Shard(u, n) for u, n in zip(urls, counts, strict=True)]
    empty = [s.url for s in shards if s.count == 0]
    if empty:
        raise DataError(
            f"--data {spec!r}: {len(empty)} shard(s) hold no images (keys {', '.join(IMAGE_KEYS)}), first {empty[0]}; "
            "leave them out of the pattern, or rewrite them with `python -m capi_lab.data.shards`"
        )
    return ShardSource(shards, spec)


def _read_json(where: str | Path) -> Any:
    if isinstance(where, Path):
        return json.loads(where.read_text())
    from webdataset.gopen import gopen

    with gopen(where) as f:
        return json.loads(f.read())


def _from_manifest(where: str | Path, spec: str) -> ShardSource:
    try:
        manifest = _read_json(where)
        entries = manifest["shardlist"]
    except FileNotFoundError:
        raise DataError(f"--data {spec!r}: no manifest {where}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"--data {spec!r}: {where} is not a shard manifest ({e})") from None
    base = str(where).rsplit("/", 1)[0] if "/" in str(where) else "."
    shards = []
    for e in entries:
        try:
            name, count = str(e["url"]), int(e["nsamples"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"--data {spec!r}: {where} has a shard entry without url and nsamples: {e!r}") from None
        url = name if _REMOTE.match(name) or Path(name).is_absolute() else f"{base}/{name}"
        if not _REMOTE.match(url) and not Path(url).is_file():
            raise DataError(f"--data {spec!r}: the manifest names {url}, which does not exist")
        shards.append(Shard(url, count))
    if not shards:
        raise DataError(f"--data {spec!r}: the manifest lists no shards")
    return ShardSource(shards, spec)


def _manifest_counts(urls: list[str]) -> list[int] | None:
    """Counts from a ``shards.json`` beside the (local) shards, when it lists every one of them."""
    if any(_REMOTE.match(u) for u in urls):
        return None
    folders = {str(Path(u).parent) for u in urls}
    if len(folders) != 1:
        return None
    manifest = Path(folders.pop()) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        known = {Path(e["url"]).name: int(e["nsamples"]) for e in json.loads(manifest.read_text())["shardlist"]}
    except (KeyError, TypeError, ValueError):
        return None
    names = [Path(u).name for u in urls]
    return [known[n] for n in names] if all(n in known for n in names) else None


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's grouping: the key is the path up to the first dot of the file name, the rest its suffix."""
    folder, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), suffix.lower()


def count_images(urls: Sequence[str]) -> list[int]:
    """Image samples per local shard, from the tar headers (the contents are skipped over, not read); a truncated
    tar counts what it still holds, with a warning."""
    counts = []
    for url in tqdm(urls, desc="counting shards (a manifest saves this)", disable=len(urls) < 20, leave=False):
        keys: set[str] = set()
        try:
            with tarfile.open(url, mode="r:*") as tar:
                for member in tar:
                    if member.isreg() and not _META.match(member.name):
                        key, suffix = _split_key(member.name)
                        if suffix in IMAGE_KEYS:
                            keys.add(key)
        except (tarfile.TarError, EOFError, OSError) as e:
            if not keys:
                raise DataError(f"{url} is not a readable tar ({e}); rewrite it or leave it out") from None
            log.warning("%s ends early (%s): %d images are readable", url, e, len(keys))
        counts.append(len(keys))
    return counts


def image_bytes(sample: dict[str, Any]) -> bytes:
    return next(sample[k] for k in IMAGE_KEYS if k in sample)


def read_shard(shard: Shard) -> Iterator[dict[str, Any]]:
    """The image samples of one shard in tar order (webdataset's reader), as dicts of raw bytes. A shard that
    cannot be opened or ends early stops with a warning naming it."""
    from webdataset.tariterators import tarfile_samples

    def warn(e: Exception) -> bool:
        log.warning("%s: %s", shard.url, str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        return False  # stop reading this shard

    for sample in tarfile_samples([{"url": shard.url}], handler=warn):
        if any(k in sample for k in IMAGE_KEYS):
            yield sample


def buffer_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of ``buffer`` samples emits inputs ``0..n-1`` (fill, then each new
    input swaps into a random slot and that slot's sample goes out; at the end the rest in random order)."""
    out = np.empty(n, dtype=np.int64)
    held: list[int] = []
    draws = rng.random(n)
    k = 0
    for i in range(n):
        held.append(i)
        if len(held) >= buffer:
            j = int(draws[i] * len(held))
            held[j], held[-1] = held[-1], held[j]
            out[k] = held.pop()
            k += 1
    out[k:] = np.asarray(held, dtype=np.int64)[rng.permutation(len(held))]
    return out


class ShardStream(IterableDataset):
    """The training stream of one rank over a :class:`ShardSource`: items ``(image, position, skipped)`` in the
    order described in the module docstring, batch ``b`` (of ``batch_size`` items, from ``start_step`` on) holding
    positions ``b*G + rank*batch_size + j`` with ``G = batch_size * world_size``, as the folder stream does.
    ``with_keys`` adds each sample's ``url#key`` (and yields no image) to audit what was read."""

    def __init__(
        self,
        source: ShardSource,
        image_size: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        seed: int = 0,
        crop_scale=(0.6, 1.0),
        full_decode: bool = False,
        buffer: int = SHUFFLE_BUFFER,
        with_keys: bool = False,
    ):
        self.source, self.batch_size, self.rank, self.world_size = source, batch_size, rank, world_size
        self.start_step, self.seed, self.buffer, self.with_keys = start_step, seed, buffer, with_keys
        self.transform = train_transform(image_size, tuple(crop_scale))
        self.min_side = decode_side(image_size, crop_scale, full_decode)

    def check_split(self, workers: int) -> None:
        """Refuse more consumers than shards; warn when the shards do not spread evenly over them."""
        consumers, n = self.world_size * max(workers, 1), len(self.source.shards)
        if n < consumers:
            raise DataError(
                f"{n} shards cannot feed {self.world_size} rank(s) x {max(workers, 1)} loader worker(s) = {consumers} "
                f"readers (each shard is read by one): lower --num-workers, or write smaller shards "
                f"(python -m capi_lab.data.shards ... --shard-size) so there are at least {consumers}"
            )
        if n % consumers:
            log.warning(
                "%d shards do not spread evenly over %d readers (ranks x workers): some read %d shards an epoch, "
                "others %d; every image is still read once an epoch", n, consumers, n // consumers + 1, n // consumers
            )  # fmt: skip

    # -- the consumers' streams
    def epoch_shards(self, epoch: int, consumer: int, consumers: int) -> list[Shard]:
        order = np.random.default_rng(_mix(self.seed, epoch, 3)).permutation(len(self.source.shards))
        return [self.source.shards[i] for i in order[consumer::consumers]]

    def consumer_samples(self, consumer: int, consumers: int, skip: int) -> Iterator[tuple[dict | None, str]]:
        """Consumer ``consumer``'s samples (raw dicts; None for one a shard no longer holds) from its ``skip``-th
        on, with the shard each comes from."""
        epoch = 0
        while True:
            shards = self.epoch_shards(epoch, consumer, consumers)
            n = sum(s.count for s in shards)
            if skip >= n:
                skip -= n
                epoch += 1
                continue
            order = buffer_order(n, self.buffer, np.random.default_rng(_mix(self.seed, epoch, consumer, 4)))
            todo = order[skip:]
            yield from self._read_in_order(shards, todo)
            skip = 0
            epoch += 1

    def _read_in_order(self, shards: list[Shard], todo: np.ndarray) -> Iterator[tuple[dict | None, str]]:
        """Inputs ``todo`` (indices into the concatenated shards) in that order, reading from the first shard that
        holds one of them; the inputs before it are never read, those read but not wanted are dropped."""
        starts = np.cumsum([0] + [s.count for s in shards])
        first = int(todo.min())
        si = int(np.searchsorted(starts, first, side="right")) - 1
        wanted = set(todo.tolist())
        held: dict[int, tuple[dict | None, str]] = {}
        inputs = self._inputs(shards[si:], int(starts[si]))
        for i in todo.tolist():
            while i not in held:
                j, item = next(inputs)
                if j in wanted:
                    held[j] = item
            yield held.pop(i)

    @staticmethod
    def _inputs(shards: list[Shard], start: int) -> Iterator[tuple[int, tuple[dict | None, str]]]:
        """``(index, (sample, url))`` over the shards, exactly ``count`` per shard: a shard that ends early is
        padded with None (warned once), one with more samples than its count is cut."""
        i = start
        for shard in shards:
            got = 0
            for sample in read_shard(shard):
                if got == shard.count:
                    break
                yield i, (sample, shard.url)
                i, got = i + 1, got + 1
            if got < shard.count:
                log.warning("%s holds %d of its %d images (truncated?): the rest are skipped", shard.url, got,
                            shard.count)  # fmt: skip
            for _ in range(shard.count - got):
                yield i, (None, shard.url)
                i += 1

    # -- batches
    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        logical = (self.start_step + worker) % workers  # the loader takes batch start_step + i from worker i % W
        consumer, consumers = self.rank * workers + logical, self.world_size * workers
        b = self.start_step + worker  # this worker's first batch
        samples = self.consumer_samples(consumer, consumers, skip=(b - logical) // workers * self.batch_size)
        g = self.batch_size * self.world_size
        while True:
            raw = [next(samples) for _ in range(self.batch_size)]
            first = b * g + self.rank * self.batch_size
            yield from self._batch(raw, first)
            b += workers

    def _batch(self, raw: list[tuple[dict | None, str]], first: int) -> list[tuple]:
        if self.with_keys:
            return [(None if s is None else f"{url}#{s['__key__']}", first + j, 0) for j, (s, url) in enumerate(raw)]
        images: list[Any] = []
        for sample, url in raw:
            if sample is None:
                images.append(None)
                continue
            try:
                images.append(read_image(io.BytesIO(image_bytes(sample)), min_side=self.min_side))
            except Exception as e:
                why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
                log.warning("skipping %s#%s: cannot decode it (%s)", url, sample["__key__"], why)
                images.append(None)
        good = [j for j, im in enumerate(images) if im is not None]
        if not good:
            raise DataError(
                f"none of the {len(raw)} images of a batch could be decoded (shards {sorted({u for _, u in raw})}); "
                "check the shards, or rewrite them with `python -m capi_lab.data.shards`"
            )
        items = []
        for j, im in enumerate(images):
            source = im if im is not None else images[next((k for k in good if k > j), good[0])]
            items.append((augment(self.transform, source, self.seed, first + j), first + j, int(im is None)))
        return items


# ----------------------------------------------------------------------------- the writer


def parse_size(text: str) -> int:
    """``'1GB'``, ``'500MB'``, ``'64KiB'``, ``'2e9'`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?i?b?)\s*", text, re.IGNORECASE)
    if not m:
        raise DataError(f"--shard-size {text!r}: give a size like 1GB, 500MB or 2e9 (bytes)")
    unit = m.group(2).lower().rstrip("b")
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit.rstrip("i")]
    value = float(m.group(1)) * (1024 if unit.endswith("i") else 1000) ** power
    if value < 1:
        raise DataError(f"--shard-size {text!r} must be at least one byte")
    return int(value)


_KEEP = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def _encode_file(path: str) -> tuple[bytes, str] | str:
    """An image file as ``(bytes, key suffix)``: a JPEG, PNG or WebP file's own bytes once it decodes whole (a
    truncated file fails here), other formats re-encoded as PNG; or the reason it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
        image = read_image(io.BytesIO(data))
        return (data, _KEEP[fmt]) if fmt in _KEEP else _png(image)
    except UnidentifiedImageError:
        return "not an image file PIL can read"
    except Exception as e:
        return str(e).splitlines()[0][:200] or type(e).__name__


def _png(image: Any) -> tuple[bytes, str]:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), "png"


def write_shards(
    src: str, dst: str | Path, shard_size: int = 10**9, max_count: int = 100_000, workers: int = 0,
    overwrite: bool = False, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Write the images of ``src`` (any ``--data`` source but shards) as tar shards ``dst/shard-NNNNNN.tar`` of at
    most ``max_count`` images, each closed once it holds ``shard_size`` bytes, in source order, and
    ``dst/shards.json`` (each shard's image count and size, the images skipped and why). Returns the manifest."""
    from webdataset.writer import ShardWriter

    source = resolve_source(src)
    if isinstance(source, ShardSource):
        raise DataError(f"{src!r} is already shards")
    dst = Path(dst).expanduser()
    old = sorted(dst.glob("shard-*.tar")) + ([dst / MANIFEST] if (dst / MANIFEST).exists() else [])
    if old and not overwrite:
        raise DataError(f"{dst} already holds shards ({old[0].name}, ...); choose another folder or add --overwrite")
    dst.mkdir(parents=True, exist_ok=True)
    for f in old:
        f.unlink()
    names = (
        [str(p) for p in source.paths]
        if isinstance(source, FileImages)
        else [source.describe(i) for i in range(len(source))]
    )
    counts: dict[str, int] = {}
    skipped: list[dict[str, str]] = []
    start = time.time()
    pool = None
    if isinstance(source, FileImages):
        if workers > 0:  # workers decode; the files' bytes come back in order
            pool = torch.multiprocessing.get_context("spawn").Pool(workers)
            encoded: Iterator = pool.imap(_encode_file, names, chunksize=16)
        else:
            encoded = map(_encode_file, names)
    else:  # arrays and generated scenes: decoded already
        encoded = (_png(source.load(i)) for i in range(len(source)))
    written = 0
    with ShardWriter(str(dst / "shard-%06d.tar"), maxcount=max_count, maxsize=shard_size, verbose=0) as sink:
        for i, result in enumerate(tqdm(encoded, total=len(source), desc=f"writing {dst}", disable=not progress)):
            if isinstance(result, str):
                skipped.append({"image": names[i], "error": result})
                continue
            data, suffix = result
            sink.write({"__key__": f"{written:09d}", suffix: data, "json": json.dumps({"source": names[i]}).encode()})
            counts[Path(sink.fname).name] = counts.get(Path(sink.fname).name, 0) + 1
            written += 1
    if pool is not None:
        pool.close()
    for f in dst.glob("shard-*.tar"):  # the writer opens its next shard before it knows whether one will follow
        if f.name not in counts:
            f.unlink()
    if not counts:
        raise DataError(f"none of the {len(source)} images of {src!r} could be read; no shards written")
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": str(src),
        "images": written,
        "shardlist": [
            {"url": name, "nsamples": n, "filesize": (dst / name).stat().st_size} for name, n in sorted(counts.items())
        ],
        "skipped": skipped,
        "seconds": round(time.time() - start, 1),
    }
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


@dataclass
class ShardsConfig:
    """How the images of SRC are written as shards into DST."""

    src: str
    """A folder of images (recursive), a .txt list of image paths, or another --data source."""
    dst: str
    """The folder to write shard-000000.tar, ... and shards.json into."""
    shard_size: str = "1GB"
    """A shard is closed once it holds this many bytes (1GB, 500MB, 2e9)."""
    max_count: int = 100_000
    """The most images a shard holds."""
    num_workers: int = 0
    """Processes decoding (checking) the images."""
    overwrite: bool = False
    """Replace the shards already in DST."""

    def __post_init__(self) -> None:
        if self.max_count < 1:
            raise ConfigError(f"--max-count must be >= 1, got {self.max_count}")
        if self.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0, got {self.num_workers}")
        parse_size(self.shard_size)


def parse_args(argv: list[str] | None = None) -> ShardsConfig:
    """``SRC DST`` and the flags of :class:`ShardsConfig` (jsonargparse, as the library's other command lines)."""
    from capi_lab.command_line import clear_errors, instantiate, new_parser, normalise_argv, shorthand_flags

    parser = new_parser(
        "python -m capi_lab.data.shards",
        "Write a folder of images (or a list file, or any --data source) as WebDataset tar shards for `python -m "
        "capi_lab.train --data DST`. Images that do not decode are skipped and listed in DST/shards.json.",
    )
    parser.add_argument("src", type=str, help="a folder of images (recursive), a .txt list of image paths, or "
                        "another --data source")  # fmt: skip
    parser.add_argument("dst", type=str, help="the folder to write shard-000000.tar, ... and shards.json into")
    parser.add_class_arguments(ShardsConfig, nested_key=None, skip={"src", "dst"})
    argv = normalise_argv(sys.argv[1:] if argv is None else argv, shorthand_flags(ShardsConfig))
    with clear_errors(parser.prog):
        try:
            return instantiate(ShardsConfig, parser.parse_args(argv))
        except DataError as e:  # --shard-size
            raise ConfigError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        m = write_shards(args.src, args.dst, parse_size(args.shard_size), args.max_count, args.num_workers,
                         args.overwrite)  # fmt: skip
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    n = len(m["shardlist"])
    print(
        f"wrote {m['images']} images in {n} shard(s) to {args.dst} in {m['seconds']} s; "
        f"{len(m['skipped'])} skipped (listed in {Path(args.dst) / MANIFEST})"
    )
    if m["skipped"]:
        print(f"first skipped: {m['skipped'][0]['image']}: {m['skipped'][0]['error']}")
    pattern = f"{args.dst}/shard-{{000000..{n - 1:06d}}}.tar"
    print(f"train on them: python -m capi_lab.train --data {args.dst}   (or --data '{pattern}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
