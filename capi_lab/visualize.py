"""The authors' feature visualisations over a folder of images, as PNGs.

    python -m capi_lab.visualize --checkpoint default --images photos/ --out viz/ --dict-learning

For every image: ``NNNNN_pca_sep.png`` (PCA of that image's patch features), ``NNNNN_pca_joint.png`` (one PCA basis
for all the images, so a colour means the same in each) and, with ``--dict-learning``, ``NNNNN_dict_sep.png`` and
``NNNNN_dict_joint.png``. A PCA row is the image, the first three components as RGB and each component as a
blue-white-red heatmap; a dictionary row is the image and the sparse codes of 3, 6 and 10 atoms coloured with the
RGB, RGB+CMY and tab10 palettes.

The rules are the authors' (``eval_visualizations.py``): images resized to a square ``--resolution`` (bicubic); PCA
with whitening (6 components per image, 10 joint); each component's sign chosen so its skewness is positive;
projections divided by the first component's standard deviation and shown on the fixed range [-2.3, 2.3];
dictionary learning with ``alpha=1``, codes as absolute values over their maximum.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from capi_lab.command_line import (
    clear_errors,
    instantiate,
    new_parser,
    normalise_argv,
    require_positive,
    shorthand_flags,
)
from capi_lab.config import ConfigError
from capi_lab.data import DataError

RANGE = 2.3
"""Projections are shown on [-RANGE, RANGE] (in units of the first component's standard deviation)."""
PALETTES = {
    "rgb": np.identity(3),
    "rgbcmy": np.array([(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1), (1, 0, 1), (1, 1, 0)], dtype=float),
}


def _tab10() -> np.ndarray:
    from matplotlib import colormaps

    return np.array(colormaps["tab10"].colors)


def skew_positive(p: np.ndarray) -> np.ndarray:
    """Flip each column of ``p`` whose skewness (third moment over the second's 1.5 power) is negative."""
    skew = np.mean(p**3, 0) / np.power(np.mean(p**2, 0), 1.5).clip(1e-12)
    return p * np.where(skew < 0, -1.0, 1.0)


def authors_pca(x: np.ndarray, components: int, whiten: bool = True) -> np.ndarray:
    """``[n, d] -> [n, components]``: PCA (whitened), signs by skewness, scaled by the first component's std."""
    from sklearn.decomposition import PCA

    k = min(components, *x.shape)
    p = PCA(n_components=k, whiten=whiten).fit_transform(x.astype(np.float64))
    p = skew_positive(p)
    return p / max(float(p[:, 0].std()), 1e-12)


def rgb_of(p: np.ndarray, grid: tuple[int, int], size: int) -> Image.Image:
    """The first three columns of ``p`` as RGB on [-RANGE, RANGE], blown up to ``size`` with sharp patches."""
    q = np.zeros((len(p), 3))
    q[:, : min(3, p.shape[1])] = p[:, :3]
    a = ((q - -RANGE) / (2 * RANGE)).clip(0, 1).reshape(*grid, 3)
    return Image.fromarray((a * 255).astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)


def heatmap(v: np.ndarray, grid: tuple[int, int], size: int) -> Image.Image:
    from capi_lab.explore.render import colorize

    return Image.fromarray(colorize(v.reshape(grid), "coolwarm", -RANGE, RANGE)).resize((size, size), 0)


def codes_picture(codes: np.ndarray, palette: np.ndarray, grid: tuple[int, int], size: int) -> Image.Image:
    a = (codes @ palette).clip(0, 1).reshape(*grid, 3)
    return Image.fromarray((a * 255).astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)


def dictionary_codes(x: np.ndarray, atoms: int, seed: int = 0) -> np.ndarray:
    """Sparse codes of the rows of ``x`` on a learnt dictionary of ``atoms`` atoms (``alpha=1``), as absolute
    values over their maximum."""
    from sklearn.decomposition import DictionaryLearning

    codes = np.abs(DictionaryLearning(n_components=atoms, alpha=1, random_state=seed).fit_transform(x))
    return codes / max(float(codes.max()), 1e-12)


def grid_picture(rows: list[list[Image.Image]], pad: int = 10) -> Image.Image:
    """Pictures laid out in rows with ``pad`` black pixels between them (the authors' grids)."""
    w = max(sum(im.width for im in r) + pad * (len(r) - 1) for r in rows)
    h = sum(max(im.height for im in r) for r in rows) + pad * (len(rows) - 1)
    out = Image.new("RGB", (w, h))
    y = 0
    for r in rows:
        x = 0
        for im in r:
            out.paste(im.convert("RGB"), (x, y))
            x += im.width + pad
        y += max(im.height for im in r) + pad
    return out


@dataclass
class VisualizeConfig:
    """The authors' PCA and dictionary-learning pictures of a model's patch features."""

    checkpoint: str
    """Anything load_pretrained accepts ('default', a run's .ckpt, an authors' .pth, a published name)."""
    images: str
    """Image folder (recursive), list file or 'demo-photos'."""
    out: str
    """Folder the PNGs and index.json go to."""
    resolution: int = 224
    """Square input side (the authors': 224); a multiple of the patch size."""
    num_images: int = 64
    """At most this many images, evenly spaced through the set (the authors': 1024)."""
    size: int = 224
    """Side of each picture in the grids."""
    whiten: bool = True
    """Whitened PCA (the authors' default)."""
    pca: bool = True
    """Write the PCA pictures."""
    dict_learning: bool = False
    """Also write the dictionary-learning pictures (slower: a few seconds per image on a CPU)."""
    device: str | None = None
    """'cpu' or 'cuda' (default: cuda when available)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Precision of the forward pass."""

    def __post_init__(self) -> None:
        require_positive(self, "resolution", "num_images", "size")


def visualize(model, source, cfg: VisualizeConfig, device) -> list[dict]:
    """Write the pictures of ``cfg`` for ``source``; one record per image (its name and files)."""
    from capi_lab.evaluation.segmentation import patch_set

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    step = max(len(source) // cfg.num_images, 1)
    idx = list(range(0, len(source), step))[: cfg.num_images]
    images = [source.load(i).resize((cfg.resolution, cfg.resolution), Image.Resampling.BICUBIC) for i in idx]
    pairs = [(im, np.zeros((cfg.resolution, cfg.resolution), np.int64)) for im in images]
    ps = patch_set(model, [pairs], cfg.resolution, 32, device, cfg.dtype, desc="features")
    grid = ps.grid
    n = grid[0] * grid[1]
    feats = ps.features.numpy().reshape(len(images), n, -1)
    shown = [im.resize((cfg.size, cfg.size), Image.Resampling.BICUBIC) for im in images]
    records = [{"image": source.describe(i), "files": []} for i in idx]

    def save(j: int, kind: str, rows: list[list[Image.Image]]) -> None:
        name = f"{j:05d}_{kind}.png"
        grid_picture(rows).save(out / name)
        records[j]["files"].append(name)

    if cfg.pca:
        for j in tqdm(range(len(images)), desc="PCA per image"):
            p = authors_pca(feats[j], 6, cfg.whiten)
            save(j, "pca_sep", [[shown[j], rgb_of(p, grid, cfg.size), *(heatmap(c, grid, cfg.size) for c in p.T)]])
        joint = authors_pca(feats.reshape(-1, feats.shape[-1]), 10, cfg.whiten).reshape(len(images), n, -1)
        for j in tqdm(range(len(images)), desc="PCA joint"):
            p = joint[j]
            save(j, "pca_joint", [[shown[j], rgb_of(p, grid, cfg.size), *(heatmap(c, grid, cfg.size) for c in p.T)]])
    if cfg.dict_learning:
        palettes = [PALETTES["rgb"], PALETTES["rgbcmy"], _tab10()]
        for j in tqdm(range(len(images)), desc="dictionary learning per image"):
            pics = [codes_picture(dictionary_codes(feats[j], len(pal)), pal, grid, cfg.size) for pal in palettes]
            save(j, "dict_sep", [[shown[j], *pics]])
        flat = feats.reshape(-1, feats.shape[-1])
        joint_codes = [dictionary_codes(flat, len(pal)).reshape(len(images), n, -1) for pal in palettes]
        for j in range(len(images)):
            pics = [codes_picture(c[j], pal, grid, cfg.size) for c, pal in zip(joint_codes, palettes, strict=True)]
            save(j, "dict_joint", [[shown[j], *pics]])
    (out / "index.json").write_text(json.dumps(records, indent=1))
    return records


def parse_args(argv: list[str] | None = None) -> VisualizeConfig:
    parser = new_parser("python -m capi_lab.visualize", __doc__.split("\n\n")[0])
    parser.add_class_arguments(VisualizeConfig, nested_key=None)
    argv = normalise_argv(sys.argv[1:] if argv is None else argv, shorthand_flags(VisualizeConfig))
    with clear_errors(parser.prog):
        return instantiate(VisualizeConfig, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    import torch

    from capi_lab.data import resolve_source
    from capi_lab.features import default_device
    from capi_lab.pretrained import CheckpointError, load_pretrained

    cfg = parse_args(argv)
    try:
        source = resolve_source(cfg.images)
        model = load_pretrained(cfg.checkpoint)
        if cfg.resolution % model.patch_size:
            p = model.patch_size
            raise ConfigError(f"--resolution {cfg.resolution} is not a multiple of the patch size {p}; use e.g. "
                              f"{max(1, round(cfg.resolution / p)) * p}")  # fmt: skip
        device = torch.device(cfg.device) if cfg.device else default_device()
        records = visualize(model, source, cfg, device)
    except (DataError, CheckpointError, ConfigError) as e:
        raise SystemExit(f"error: {e}") from None
    files = sum(len(r["files"]) for r in records)
    print(json.dumps({"out": cfg.out, "images": len(records), "files": files}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
