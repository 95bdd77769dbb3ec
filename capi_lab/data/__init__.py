"""Images for pretraining: where they come from (``--data``), how they are decoded and augmented,
and how a batch gets its masks (built in the loader workers).

Every sample is addressed by its *position* in an infinite, epoch-by-epoch shuffled stream. The
image, its random crop and the batch's masks are all functions of ``(seed, position)``, so a run
resumed at step ``s`` sees exactly the data it would have seen, whatever the number of workers.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2

from capi_lab.config import MaskConfig
from capi_lab.masking import MaskBatch, sample_masks

log = logging.getLogger("capi_lab.data")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


class DataError(ValueError):
    """The data source cannot be used; the message names the problem and the fix."""


# ----------------------------------------------------------------------------- sources


class ImageSource:
    """A finite, indexable collection of images. ``load(i)`` returns an RGB PIL image or raises.

    ``load(i, min_side=m)`` says the caller needs no more than ``m`` pixels on the image's shorter side; a
    source may then return a smaller image whose shorter side is still at least ``m`` (files: JPEGs decoded at
    1/2, 1/4 or 1/8 scale). Sources that cannot do that cheaply ignore it."""

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int, min_side: int | None = None) -> Image.Image:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        return f"image {i}"


class FileImages(ImageSource):
    """Image files. Decoded images are kept in memory up to ``cache_bytes`` (per loader worker), so
    small sets of large photos are not decoded again at every epoch.

    With ``min_side``, a JPEG at least twice that size on its shorter side is decoded by libjpeg at the smallest
    of 1/2, 1/4 and 1/8 scale that keeps the shorter side at least ``min_side`` (PIL's ``draft``): a 4032x3024
    photo needed for 224 px crops decodes at 1008x756, several times faster than at full size. Other formats,
    and smaller JPEGs, are decoded at full size. Images are turned upright by their EXIF orientation tag, as the
    app does with uploads."""

    CACHE_BYTES = 256 * 2**20
    """The cache size when ``cache_bytes`` is not given (``benchmarks/loop_throughput.py`` sets it to 0)."""

    def __init__(self, paths: Sequence[str | os.PathLike], cache_bytes: int | None = None):
        self.paths = [Path(p) for p in paths]
        self.cache_bytes = self.CACHE_BYTES if cache_bytes is None else cache_bytes
        self._cache: dict[tuple[int, int | None], Image.Image] = {}
        self._cached = 0

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int, min_side: int | None = None) -> Image.Image:
        if (i, min_side) in self._cache:
            return self._cache[i, min_side]
        rgb = read_image(self.paths[i], min_side=min_side)
        size = rgb.width * rgb.height * 3
        if self._cached + size <= self.cache_bytes:
            self._cache[i, min_side] = rgb
            self._cached += size
        return rgb

    def describe(self, i: int) -> str:
        return str(self.paths[i])


class ArrayImages(ImageSource):
    """Images held in memory as a ``uint8`` array ``[N, H, W]`` (grey) or ``[N, H, W, 3]``, with labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, name: str = "array"):
        self.images, self.labels, self.name = images, labels, name

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int, min_side: int | None = None) -> Image.Image:
        return Image.fromarray(self.images[i]).convert("RGB")

    def describe(self, i: int) -> str:
        return f"{self.name}[{i}]"


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16-bit and float images are rescaled (PIL's own conversion would
    clip them to white), CMYK/greyscale/palette converted, alpha dropped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def read_image(
    path: str | os.PathLike | io.IOBase,
    min_side: int | None = None,
    max_side: int | None = None,
    info: dict | None = None,
) -> Image.Image:
    """Decode an image file (a path, or an open binary file such as a ``BytesIO``) as upright 8-bit RGB: the one
    reader training, evaluation, features, the app and the notebooks share. Turned upright by its EXIF orientation
    tag (as phone photos are shown); :func:`to_rgb`.

    ``min_side``: a JPEG of at least twice that on its shorter side is decoded by libjpeg at a reduced scale that
    keeps its shorter side at least ``min_side``. ``max_side``: a larger image is decoded at a reduced scale
    (JPEG) and downscaled (Lanczos) to that longest side. ``info``, when given, receives the file's own
    ``size`` and ``mode``. PIL's errors (``OSError``, ``Image.DecompressionBombError``, ...) pass through."""
    with Image.open(path) as img:
        if info is not None:
            info.update(size=img.size, mode=img.mode)
        short = min(img.size)
        if min_side and img.format == "JPEG" and short >= 2 * min_side:
            img.draft(None, (-(-img.width * min_side // short), -(-img.height * min_side // short)))
        if max_side and max(img.size) > max_side:
            img.draft("RGB", (max_side, max_side))  # JPEG: decode at reduced scale
        img.load()
        rgb = to_rgb(ImageOps.exif_transpose(img))
    if max_side and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return rgb


def to_input(image: Image.Image) -> torch.Tensor:
    """An RGB picture as the model's input ``[3, H, W]``: scaled to [0, 1] and ImageNet-normalised (the last steps
    of :func:`train_transform` and :func:`eval_transform`, used alone by the app and the segmentation set)."""
    return _TO_INPUT(image)


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively (class sub-folders are fine), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


# scikit-image photos with clear licences (from the docstrings of skimage.data)
_SKIMAGE_PHOTOS = {
    "astronaut.png": "public domain (NASA)",
    "brick.png": "CC0 (CC0Textures)",
    "camera.png": "CC0 (Lav Varshney)",
    "cell.png": "CC0",
    "chelsea.png": "CC0 (Stefan van der Walt)",
    "coffee.png": "CC0 (Rachel Michetti)",
    "coins.png": "no known copyright restrictions (Brooklyn Museum)",
    "grass.png": "CC0 (CC0Textures)",
    "gravel.png": "CC0 (CC0Textures)",
    "hubble_deep_field.jpg": "public domain (NASA)",
    "ihc.png": "no known copyright restrictions",
    "retina.jpg": "CC0 (Hakan Wieslander / Hampus Forsberg)",
    "rocket.jpg": "public domain (SpaceX)",
}
DEMO_SOURCES = ("foolbox", "opencv", "mate", "plasma", "lomiri", "gcompris", "stellarium")
"""Photo sources fetched by scripts/fetch_demo_data.py into the cache (tuxpaint cut-outs are kept apart:
they feed the segmentation set, not pretraining)."""


@dataclass(frozen=True)
class DemoPhoto:
    path: Path
    source: str
    license: str


def cache_dir() -> Path:
    """Where fetched data lives: ``$CAPI_LAB_CACHE`` or ``~/.cache/capi_lab``."""
    return Path(os.environ.get("CAPI_LAB_CACHE", Path.home() / ".cache" / "capi_lab"))


def demo_photos() -> list[DemoPhoto]:
    """The ``demo-photos`` set with source and licence of each image: photos that installed Python
    packages ship (scikit-image, scikit-learn, matplotlib) plus those scripts/fetch_demo_data.py put in
    the cache (foolbox's ImageNet samples, Debian's opencv-doc, mate-backgrounds, plasma wallpapers).
    Every source is optional."""
    found: list[DemoPhoto] = []
    try:
        import skimage

        d = Path(skimage.__file__).parent / "data"
        found += [DemoPhoto(d / n, "scikit-image", lic) for n, lic in _SKIMAGE_PHOTOS.items() if (d / n).exists()]
    except ImportError:
        pass
    try:
        import sklearn.datasets

        d = Path(sklearn.datasets.__file__).parent / "images"
        found += [DemoPhoto(p, "scikit-learn", "CC BY 2.0 (flickr)") for p in sorted(d.glob("*.jpg"))]
    except ImportError:
        pass
    try:
        import matplotlib

        p = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if p.exists():
            found.append(DemoPhoto(p, "matplotlib", "public domain (US Navy)"))
    except ImportError:
        pass
    manifest = cache_dir() / "demo-data" / "manifest.json"
    if manifest.exists():
        import json

        for row in json.loads(manifest.read_text()):
            p = manifest.parent / row["path"]
            if row["source"] in DEMO_SOURCES and p.exists():
                found.append(DemoPhoto(p, row["source"], row["license"]))
    return found


def demo_photo_paths() -> list[Path]:
    return [d.path for d in demo_photos()]


# ----------------------------------------------------------------------------- cut-outs pasted on photos


def stamp_classes(root: Path, min_stamps: int = 4) -> dict[str, list[Path]]:
    """Top-level folders of ``root`` holding at least ``min_stamps`` RGBA PNG cut-outs."""
    classes = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        stamps = sorted(p for p in d.rglob("*.png"))
        if len(stamps) >= min_stamps:
            classes[d.name] = stamps
    return classes


def stamp_split(
    root: Path, backgrounds: Sequence[Path], split: str, seed: int = 0
) -> tuple[list[str], list[list[Path]], list[Path]]:
    """``(classes, cut-outs of each class, background photos)`` of one side of the seeded 70/30 split of
    cut-outs (within each class) and background photos. The k-NN segmentation set scores the ``test`` side; the
    ``composite`` pretraining source draws on the ``train`` side only, so what seg-knn tests stays unseen."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not root.is_dir():
        raise DataError(
            f"cut-out folder {root} does not exist: run `python scripts/fetch_demo_data.py --only tuxpaint` (or "
            "give a folder of class sub-folders holding RGBA PNG cut-outs)"
        )
    all_classes = stamp_classes(root)
    if len(all_classes) < 2:
        raise DataError(
            f"{root} holds no usable cut-outs: it needs at least two class sub-folders with 4+ RGBA PNG cut-outs "
            "each (`python scripts/fetch_demo_data.py --only tuxpaint` fetches them)"
        )
    if len(backgrounds) < 2:
        raise DataError("pasting cut-outs needs at least two background photos (see `demo-photos`)")
    rng = np.random.default_rng(seed)

    def side(n: int) -> slice:
        cut = max(1, int(n * 0.7))
        return slice(0, cut) if split == "train" else slice(cut, n)

    stamps = [[s[i] for i in rng.permutation(len(s))][side(len(s))] for s in all_classes.values()]
    bgs = [backgrounds[i] for i in rng.permutation(len(backgrounds))]
    return list(all_classes), stamps, bgs[side(len(bgs))]


def _open_small(path: Path, mode: str, side: int, cache: dict) -> Image.Image:
    if (path, mode) not in cache:
        with Image.open(path) as im:
            im = to_rgb(ImageOps.exif_transpose(im)) if mode == "RGB" else im.convert(mode)
            im.thumbnail((side, side), Image.Resampling.LANCZOS)
            cache[path, mode] = im
    return cache[path, mode]


class CompositeImages(ImageSource):
    """Object-on-background scenes for pretraining: photo cut-outs (tuxpaint stamps: RGBA, the alpha an exact
    mask) pasted on whole photos. Only the ``train`` side of :func:`stamp_split` is used, so the cut-outs and
    backgrounds the k-NN segmentation set (``seg-knn``) scores on are never seen in training.

    Image ``i`` is background ``i mod B`` (downscaled to ``max_side``) with, for a ``paste_fraction`` of the
    images, 1-3 cut-outs of random classes pasted at 20-60 % of the shorter side, at random positions; the rest
    are the plain photo. Each background appears ``per_background`` times with different pastes; everything is
    a function of ``(seed, i)``, so made images are kept (up to ``FileImages.CACHE_BYTES`` per loader process):
    after the first epoch a composite costs nothing to load (pasting costs about as much as the rest of the
    item)."""

    def __init__(
        self, stamps_root: Path, backgrounds: Sequence[Path], per_background: int = 8, paste_fraction: float = 0.75,
        max_side: int = 224, seed: int = 0,
    ):  # fmt: skip
        if not 0 <= paste_fraction <= 1:
            raise ValueError(f"paste_fraction must be in [0, 1], got {paste_fraction}")
        self.classes, self.stamps, self.backgrounds = stamp_split(Path(stamps_root), backgrounds, "train", seed)
        self.per_background, self.paste_fraction, self.max_side, self.seed = (
            per_background, paste_fraction, max_side, seed,
        )  # fmt: skip
        self._cache: dict = {}
        self._made: dict[int, Image.Image] = {}
        self._made_bytes = 0

    def __len__(self) -> int:
        return len(self.backgrounds) * self.per_background

    def load(self, i: int, min_side: int | None = None) -> Image.Image:
        if i in self._made:
            return self._made[i]
        img = self._make(i)
        size = img.width * img.height * 3
        if self._made_bytes + size <= FileImages.CACHE_BYTES:
            self._made[i] = img
            self._made_bytes += size
        return img

    def _make(self, i: int) -> Image.Image:
        rng = np.random.default_rng([self.seed, i, 2])
        canvas = _open_small(self.backgrounds[i % len(self.backgrounds)], "RGB", self.max_side, self._cache).copy()
        if rng.random() >= self.paste_fraction:
            return canvas
        for _ in range(int(rng.integers(1, 4))):
            c = int(rng.integers(len(self.classes)))
            stamp = _open_small(self.stamps[c][rng.integers(len(self.stamps[c]))], "RGBA", self.max_side, self._cache)
            scale = rng.uniform(0.2, 0.6) * min(canvas.size) / max(stamp.size)
            stamp = stamp.resize(
                (max(1, int(stamp.width * scale)), max(1, int(stamp.height * scale))), Image.Resampling.BICUBIC
            )
            x = int(rng.integers(0, max(canvas.width - stamp.width, 0) + 1))
            y = int(rng.integers(0, max(canvas.height - stamp.height, 0) + 1))
            canvas.paste(stamp, (x, y), stamp)
        return canvas

    def describe(self, i: int) -> str:
        return f"composite[{i}] on {self.backgrounds[i % len(self.backgrounds)]}"


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "train") -> ArrayImages:
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, else torchvision's download."""
    if split not in ("train", "test"):
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    images, labels = (
        FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz",
        FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz",
    )
    if images.exists() and labels.exists():
        return ArrayImages(_read_idx(images), _read_idx(labels).astype(np.int64), f"fashion-mnist-{split}")
    try:
        from torchvision.datasets import FashionMNIST

        ds = FashionMNIST(str(cache_dir()), train=split == "train", download=True)
        return ArrayImages(ds.data.numpy(), ds.targets.numpy(), f"fashion-mnist-{split}")
    except Exception as e:
        raise DataError(
            f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR} and could not be downloaded ({e}). "
            "On Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist"
        ) from None


def resolve_source(spec: str | os.PathLike) -> Any:
    """The images named by ``--data``: a folder (recursive), a text file listing image paths (relative
    paths are taken from the file's folder), WebDataset tar shards (a pattern like ``shards/s-{000..015}.tar``, a
    manifest, or a folder holding ``shards.json``: :mod:`capi_lab.data.shards`, a
    :class:`~capi_lab.data.shards.ShardSource`), ``fashion-mnist[:train|:test]``, ``demo-photos``, or ``composite``
    (tuxpaint cut-outs pasted on the demo photos, :class:`CompositeImages`; ``composite:DIR`` takes the cut-outs
    from DIR's class sub-folders)."""
    s = str(spec)
    from capi_lab.data import shards  # here: it imports this module

    if shards.is_shard_spec(s):
        return shards.open_shards(s)
    if s.startswith("fashion-mnist"):
        return load_fashion_mnist(s.partition(":")[2] or "train")
    if s == "composite" or s.startswith("composite:"):
        root = Path(s.partition(":")[2]).expanduser() if ":" in s else cache_dir() / "demo-data" / "tuxpaint"
        return CompositeImages(root, demo_photo_paths())
    if s == "demo-photos":
        paths = demo_photo_paths()
        if not paths:
            raise DataError(
                "no demo photos found: install scikit-image, scikit-learn or matplotlib, "
                "or run scripts/fetch_demo_data.py"
            )
        return FileImages(paths)
    path = Path(s).expanduser()
    if not path.exists():
        raise DataError(
            f"--data {s!r}: no such file or folder. Give a folder of images, a .txt file listing image paths, "
            "'fashion-mnist' or 'demo-photos'"
        )
    if path.is_dir():
        paths = list_images(path)
        if not paths:
            raise DataError(
                f"--data {s!r}: the folder holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}), "
                "even in sub-folders"
            )
        return FileImages(paths)
    return FileImages(_read_list_file(path, s))


def _read_list_file(path: Path, spec: str) -> list[Path]:
    """The image paths of a list file (one per line, ``#`` comments, relative to the file's folder); paths that do
    not exist are dropped with one warning, and a file that is not a text list is refused."""
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        raise DataError(
            f"--data {spec!r} is an image file; give the folder that holds it, or a .txt file listing image paths"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise DataError(
            f"--data {spec!r} is not a text file (binary content); give a folder of images or a .txt file listing "
            "image paths, one per line"
        )
    lines = [ln.strip() for ln in text.splitlines()]
    paths = [
        (path.parent / ln) if not Path(ln).is_absolute() else Path(ln) for ln in lines if ln and not ln.startswith("#")
    ]
    if not paths:
        raise DataError(f"--data {spec!r}: the list file names no images (one path per line expected)")
    found = [q for q in paths if q.is_file()]
    missing = [q for q in paths if not q.is_file()]
    if not found:
        raise DataError(
            f"--data {spec!r}: none of the {len(paths)} paths it lists exists (first: {str(missing[0])!r}; relative "
            f"paths are taken from {str(path.parent)!r})"
        )
    if missing:
        log.warning("--data %s: %d of %d listed paths do not exist and are left out (first: %s)", spec,
                    len(missing), len(paths), missing[0])  # fmt: skip
    return found


def check_decodable(source: Any, sample: int = 32) -> None:
    """Fail early when a source's images cannot be read: decode up to ``sample`` images spread over it (small,
    via ``min_side``); if none decodes, a :class:`DataError` names them. Training would otherwise build the model
    and then stop in the data loader."""
    n = len(source)
    if n == 0:
        raise DataError("the data source holds no images")
    if hasattr(source, "check"):  # shards: their first images
        return source.check()
    if not isinstance(source, FileImages):
        return  # arrays and generated scenes are decoded already
    picks = range(n) if n <= sample else sorted({round(i * (n - 1) / (sample - 1)) for i in range(sample)})
    errors = []
    for i in picks:
        try:
            source.load(i, min_side=16)
            return
        except Exception as e:
            errors.append(f"{source.describe(i)}: {str(e).splitlines()[0][:100]}")
    raise DataError(
        f"none of the {len(picks)} images tried (of {n}) can be decoded, e.g. {errors[0]}; check that the files are "
        "images (JPEG, PNG, ...) and not truncated"
    )


# ----------------------------------------------------------------------------- training stream


class ToInput:
    """A picture as the model's input ``[C, H, W]``: ``v2.ToImage``, ``v2.ToDtype(float32, scale=True)`` and
    ``v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)`` in one step, with the same operations and so bit for bit the
    same values (tests/test_data.py), at about a quarter of their cost on small images: each of those three
    dispatches on the input's type, which costs more than the arithmetic on a 28 x 28 Fashion-MNIST crop
    (~180 µs against ~40 µs an image on this project's CPU; the training loader does it for every sample)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            x = image if image.ndim == 3 else image.unsqueeze(0)  # already [C, H, W] (or [H, W])
        else:
            a = np.array(image, copy=True)  # [H, W] or [H, W, C], as torchvision's pil_to_tensor reads it
            x = torch.from_numpy(a if a.ndim == 3 else a[:, :, None]).permute(2, 0, 1)
        if x.dtype != torch.uint8:
            raise TypeError(f"ToInput takes 8-bit pictures, got {x.dtype}; convert the image to RGB first (to_rgb)")
        return x.to(torch.float32).mul_(1.0 / 255).sub(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


_TO_INPUT = ToInput()


@contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Inside the block the CPU generator starts from ``seed``; after it, it is where it was. The same draws as
    ``torch.random.fork_rng(devices=[])`` + ``torch.manual_seed(seed)`` at a tenth of the cost (~15 µs against
    ~150 µs here): ``torch.manual_seed`` also seeds every accelerator's generators, which a CPU-side augmentation
    never draws from. The loader does this for every sample (:func:`augment`)."""
    g = torch.default_generator
    state = g.get_state()
    g.manual_seed(seed)
    try:
        yield
    finally:
        g.set_state(state)


def train_transform(image_size: int, scale: tuple[float, float] = (0.6, 1.0)) -> v2.Compose:
    """RandomResizedCrop(scale 0.6-1 by default, bicubic) + horizontal flip + ImageNet normalization."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip(),
            _TO_INPUT,
        ]
    )


def eval_transform(image_size: int) -> v2.Compose:
    """Resize + centre crop + ImageNet normalization."""
    return v2.Compose(
        [
            v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC),
            v2.CenterCrop(image_size),
            _TO_INPUT,
        ]
    )


def _mix(*xs: int) -> int:
    return int(np.random.SeedSequence(list(xs)).generate_state(1, dtype=np.uint64)[0] >> 1)


def decode_side(image_size: int, crop_scale=(0.6, 1.0), full_decode: bool = False) -> int | None:
    """The ``min_side`` training images are decoded at (see :class:`PretrainStream`); None with ``full_decode``."""
    return None if full_decode else max(2 * image_size, math.ceil(image_size / (0.75 * crop_scale[0]) ** 0.5))


def augment(transform: v2.Compose, image: Image.Image, seed: int, pos: int) -> torch.Tensor:
    """``transform(image)`` with its randomness a function of ``(seed, pos)`` only (the global RNG is left as is)."""
    with seeded_cpu_rng(_mix(seed, pos, 1)):
        return transform(image)


class PretrainStream(Dataset):
    """Item ``pos`` of an infinite stream: epoch ``pos // N`` is a fresh permutation of the source.

    An image that cannot be decoded is skipped (one warning line per file) in favour of the next one
    in the permutation; the item reports how many were skipped.

    Unless ``full_decode``, images are asked for at the smallest size at which even the smallest random crop
    (``crop_scale[0]`` of the area, aspect ratio 3/4) still has ``image_size`` pixels on each side, and at least
    twice ``image_size`` on the shorter side: so the crop is still shrunk to ``image_size``, never enlarged, and a
    large JPEG decodes several times faster (:class:`FileImages`). A JPEG under twice that size (896 px on the
    shorter side for 224 px crops: nearly all of ImageNet's photos) is decoded at full size either way.
    """

    def __init__(
        self, source: ImageSource, image_size: int, seed: int = 0, crop_scale=(0.6, 1.0), full_decode: bool = False
    ):
        self.source, self.seed = source, seed
        self.transform = train_transform(image_size, tuple(crop_scale))
        self.min_side = decode_side(image_size, crop_scale, full_decode)
        self._perm: tuple[int, np.ndarray] | None = None
        self._bad: set[int] = set()

    def __len__(self) -> int:  # the stream is infinite; this is the source size
        return len(self.source)

    def _index(self, pos: int) -> int:
        n = len(self.source)
        epoch = pos // n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng(_mix(self.seed, epoch)).permutation(n))
        return int(self._perm[1][pos % n])

    def __getitem__(self, pos: int) -> tuple[torch.Tensor, int, int]:
        n = len(self.source)
        skipped = 0
        base = self._index(pos)
        for attempt in range(n):
            i = (base + attempt) % n  # an undecodable image is replaced by the next one in index order
            if i in self._bad:
                skipped += 1
                continue
            try:
                img = self.source.load(i, self.min_side)
            except Exception as e:
                self._bad.add(i)
                skipped += 1
                log.warning("skipping %s: cannot decode it (%s)", self.source.describe(i), str(e).splitlines()[0][:120])
                continue
            return augment(self.transform, img, self.seed, pos), pos, skipped
        raise DataError(f"none of the {n} images of the data source could be decoded")


class StreamSampler(Sampler[int]):
    """Positions for one rank: step ``s`` covers global positions ``[s*G, (s+1)*G)`` with
    ``G = batch_size * world_size``, rank ``r`` taking ``[s*G + r*batch_size, ... + batch_size)``."""

    def __init__(self, batch_size: int, rank: int = 0, world_size: int = 1, start_step: int = 0):
        self.batch_size, self.rank, self.world_size, self.start_step = batch_size, rank, world_size, start_step

    def __iter__(self) -> Iterator[int]:
        step = self.start_step
        g = self.batch_size * self.world_size
        while True:
            first = step * g + self.rank * self.batch_size
            yield from range(first, first + self.batch_size)
            step += 1


@dataclass
class Batch:
    images: torch.Tensor
    masks: MaskBatch
    positions: torch.Tensor
    skipped: int

    def pin_memory(self) -> Batch:
        """Page-locked copies of the tensors the step reads, made by the DataLoader's pinning thread
        (``pin_memory=True``), so that their copy to the GPU is asynchronous. The loader leaves a dataclass
        without this method as it is, and a copy from pageable memory makes the host wait for the GPU."""
        return batch_to(self, torch.Tensor.pin_memory)


class MaskCollator:
    """Stacks images and draws the batch's masks, seeded by the batch's first stream position."""

    def __init__(self, grid: tuple[int, int], mask: MaskConfig, seed: int = 0):
        self.grid, self.mask, self.seed = grid, mask, seed

    def __call__(self, items: list[tuple[torch.Tensor, int, int]]) -> Batch:
        images = torch.stack([it[0] for it in items])
        positions = torch.tensor([it[1] for it in items])
        rng = np.random.default_rng(_mix(self.seed, int(positions[0]), 2))
        masks = sample_masks(len(items), *self.grid, self.mask, rng)
        return Batch(images, masks, positions, sum(it[2] for it in items))


def batch_to(batch: Batch, fn: Any) -> Batch:
    """Apply ``fn`` (e.g. ``fabric.to_device``) to every tensor of the batch."""
    return Batch(fn(batch.images), MaskBatch(*(fn(t) for t in batch.masks)), batch.positions, batch.skipped)
