"""Helpers the tutorial notebooks share: smoke mode, and data/model that fall back gracefully.

``CAPI_LAB_SMOKE=1`` selects a smoke mode (fewer images and steps) used by CI; without it a notebook
runs in full. Nothing here needs the internet: a missing optional dataset or the default model being
absent leads to a printed note and a fallback, never an error.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

SMOKE = os.environ.get("CAPI_LAB_SMOKE", "") not in ("", "0")
"""True in smoke mode (``CAPI_LAB_SMOKE=1``)."""


def pick(full, smoke):
    """``smoke`` in smoke mode, else ``full``."""
    return smoke if SMOKE else full


def png(picture: Image.Image) -> bytes:
    """PNG bytes of a picture (for ``ipywidgets.Image``)."""
    import io

    buf = io.BytesIO()
    picture.save(buf, format="png")
    return buf.getvalue()


def generated_images(n: int, size: int = 96, seed: int = 0) -> list[Image.Image]:
    """Synthetic pictures (coloured shapes on gradients) for when no photo is available."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y, x = np.mgrid[0:size, 0:size] / size
        base = np.stack([x, y, 1 - x], -1) * rng.uniform(0.3, 1, 3)
        img = Image.fromarray((base * 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = rng.integers(0, size * 3 // 4, 2)
            s = int(rng.integers(size // 6, size // 2))
            box = (int(x0), int(y0), int(x0) + s, int(y0) + s)
            fill = tuple(int(v) for v in rng.integers(0, 255, 3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=fill)
        out.append(img)
    return out


def photos(n: int = 8) -> list[Image.Image]:
    """Up to ``n`` real photos: the app's bundled examples, then the demo photos that installed packages
    ship; synthetic images (with a note) if there are none."""
    from capi_lab.data import demo_photo_paths, read_image
    from capi_lab.explore import example_photos

    paths = example_photos()
    if len(paths) < n:
        paths += [p for p in demo_photo_paths() if p not in paths]
    images = []
    for p in paths[:n]:
        try:
            images.append(read_image(p))
        except OSError:
            continue
    if not images:
        print("note: no photos found (capi_lab/explore/examples, scikit-image, ...); using generated images instead")
        return generated_images(n)
    return images


def default_model():
    """The embedded default model; a randomly initialised one of the same shape (with a note) if the
    weights file is missing."""
    import capi_lab
    from capi_lab.pretrained import CheckpointError

    try:
        return capi_lab.load_pretrained("default")
    except CheckpointError as e:
        print(f"note: {e}\n      using a randomly initialised model of the same shape instead")
        return capi_lab.create_model("default").eval()


def labeled_images(n: int, split: str = "train", seed: int = 0):
    """``(source, labels, class_names, name)``: Fashion-MNIST when the Debian package is installed,
    else the demo photos labelled by where they come from (with a note). Never downloads."""
    from capi_lab.data import FASHION_MNIST_DIR, ArrayImages, load_fashion_mnist

    if FASHION_MNIST_DIR.is_dir():
        ds = load_fashion_mnist(split)
        idx = np.random.default_rng(seed).permutation(len(ds))[:n]
        names = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
        return ArrayImages(ds.images[idx], ds.labels[idx], ds.name), ds.labels[idx], names, "fashion-mnist"
    print("note: Fashion-MNIST is not installed (sudo apt-get install dataset-fashion-mnist); using generated images")
    imgs = generated_images(n, size=32, seed=seed)
    arr = np.stack([np.asarray(i) for i in imgs])
    labels = (arr.mean(axis=(1, 2)).argmax(-1)).astype(np.int64)  # dominant colour channel as a label
    return ArrayImages(arr, labels, "generated"), labels, ["red", "green", "blue"], "generated"


def study(name: str, **protocol):
    """A study of :mod:`capi_lab.ablate`: run in full mode (its run folders under ``runs/ablate``, or
    ``$CAPI_LAB_ABLATE_DIR``, so a rerun reuses the finished rows), or the committed full-mode result in smoke mode
    and when Fashion-MNIST is absent."""
    from capi_lab import ablate
    from capi_lab.data import FASHION_MNIST_DIR

    if not SMOKE and FASHION_MNIST_DIR.exists():
        out = os.environ.get("CAPI_LAB_ABLATE_DIR", "runs/ablate")
        print(f"training the {name} study's rows under {out}/{name}/ (finished rows are reused)")
        return ablate.run(name, ablate.Protocol(**protocol), out=out)
    why = "smoke mode" if SMOKE else "note: Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)"
    result = ablate.cached(name)
    print(f"{why}: showing the committed full-mode result ({ablate.RESULTS_DIR / f'ablate_{name}.json'}, made by "
          f"python -m capi_lab.ablate {name})")  # fmt: skip
    return result
