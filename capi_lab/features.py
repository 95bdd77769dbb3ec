"""Frozen CAPI features for your own analyses.

    python -m capi_lab.features --checkpoint runs/quick/checkpoints/last.ckpt --images photos/ --out f.safetensors

Writes, for every image, the global representation ``[N, D]``, the registers ``[N, R, D]`` and the
patch feature map ``[N, h, w, D]`` (``--no-patches`` to skip it), plus the image list: a safetensors
file (image list as JSON in its metadata) or an ``.npz`` (image list as the ``paths`` array).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
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
from capi_lab.data import DataError, ImageSource, eval_transform, resolve_source
from capi_lab.model.capi import CAPIModel

log = logging.getLogger("capi_lab.features")


@dataclass
class Features:
    global_repr: Tensor
    """``[N, D]``: mean of the first predictor block over all positions (the paper's pooling)."""
    registers: Tensor
    """``[N, R, D]``."""
    feature_map: Tensor | None
    """``[N, h, w, D]`` normalized patch features (None when not kept)."""
    index: list[int] | None = None
    """The source's images these rows are, in order (None: all of them); images that could not be read are
    left out (:func:`extract_features`)."""
    skipped: list[str] = field(default_factory=list)
    """The images left out, as the source describes them."""

    def labels(self, labels: Tensor) -> Tensor:
        """The labels of the kept images, given the labels of the whole source."""
        return labels if self.index is None else labels[self.index]

    @property
    def mean_patch(self) -> Tensor:
        """``[N, D]``: average of the patch features (the paper's Table 5 alternative to ``global_repr``)."""
        if self.feature_map is None:
            raise ValueError("patch features were not kept (keep_patches=False)")
        return self.feature_map.mean(dim=(1, 2))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def extract_features(
    model: CAPIModel,
    source: ImageSource,
    image_size: int = 224,
    batch_size: int = 64,
    keep_patches: bool = True,
    pool_patches: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "features",
) -> Features:
    """Run ``model`` over every image of ``source`` (resize + centre crop to ``image_size``).

    With ``pool_patches`` the feature map is averaged per image right away (``feature_map`` then has
    ``h = w = 1``), which keeps memory small for large sets. An image that cannot be read is left out with one
    warning naming it, as in training: ``index`` says which images the rows are, ``skipped`` which were left out;
    when none can be read, a :class:`DataError`.
    """
    device = torch.device(device) if device is not None else default_device()
    p = model.patch_size
    if image_size % p or image_size < p:
        raise ConfigError(
            f"--image-size {image_size} is not a multiple of the model's patch size {p}; use e.g. "
            f"{max(1, round(image_size / p)) * p}"
        )
    model = model.to(device).eval()
    tf = eval_transform(image_size)
    g, r, f = [], [], []
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    kept: list[int] = []
    skipped: list[str] = []
    for start in tqdm(range(0, len(source), batch_size), desc=desc, disable=not progress, unit="batch"):
        inputs = read_inputs(source, range(start, min(start + batch_size, len(source))), tf, kept, skipped)
        if not inputs:
            continue
        x = torch.stack(inputs).to(device)
        with autocast:
            gr, reg, fm = model(x)
        g.append(gr.float().cpu())
        r.append(reg.float().cpu())
        if pool_patches:
            f.append(fm.float().mean(dim=(1, 2), keepdim=True).cpu())
        elif keep_patches:
            f.append(fm.float().cpu())
    index = kept_index(source, kept, skipped, desc)
    return Features(torch.cat(g), torch.cat(r), torch.cat(f) if f else None, index, skipped)


def read_inputs(
    source: ImageSource, indices: Iterable[int], transform: Any, kept: list[int], skipped: list[str]
) -> list[Tensor]:
    """``transform(source.load(i))`` for each index that reads; appends to ``kept`` the indices read and to
    ``skipped`` (with a warning) the images that could not be."""
    out = []
    for i in indices:
        try:
            out.append(transform(source.load(i)))
            kept.append(i)
        except Exception as e:
            skipped.append(source.describe(i))
            log.warning("skipping %s: cannot read it (%s)", skipped[-1], str(e).splitlines()[0][:120])
    return out


def kept_index(source: ImageSource, kept: list[int], skipped: list[str], desc: str) -> list[int] | None:
    """None when every image was read, else the indices read; a :class:`DataError` when none was."""
    if not kept:
        raise DataError(f"none of the {len(source)} images could be read (first: {skipped[0] if skipped else '-'})")
    if skipped:
        log.warning("%s: %d of %d images could not be read and were left out", desc, len(skipped), len(source))
    return None if len(kept) == len(source) else kept


def check_writable(path: str | Path) -> Path:
    """Make ``path``'s folder and check that a file can be written there, before any long work; a
    :class:`DataError` says why not."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"--out {str(path)!r} is a folder; give a file name ending in .safetensors or .npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=".capi_lab_write_check")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DataError(f"cannot write --out {str(path)!r} ({type(e).__name__}: {e.strerror or e})") from None
    return path


def save_features(path: str | Path, feats: Features, names: list[str]) -> Path:
    """``.safetensors`` (names as JSON metadata) or ``.npz`` (names as the ``paths`` array)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"global_repr": feats.global_repr, "registers": feats.registers}
    if feats.feature_map is not None:
        tensors["feature_map"] = feats.feature_map
    if path.suffix == ".npz":
        np.savez(path, paths=np.array(names), **{k: v.numpy() for k, v in tensors.items()})
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"paths": json.dumps(names)})
    else:
        raise ValueError(f"--out must end in .safetensors or .npz, got {path.name!r}")
    return path


@dataclass
class FeaturesConfig:
    """Extract frozen CAPI features of a set of images into one file."""

    checkpoint: str
    """A capi_lab checkpoint, an authors' .pth, or a published name ('default', 'capi_vitl14_lvd', ...)."""
    images: str
    """Image folder (recursive), list file, 'demo-photos' or 'fashion-mnist'."""
    out: str
    """Output file: .safetensors or .npz."""
    image_size: int | None = None
    """Square input side in pixels (default: 16 patches)."""
    batch_size: int = 32
    """Images per forward pass."""
    no_patches: bool = False
    """Do not store the patch feature maps (only the global and register features)."""
    device: str | None = None
    """'cpu' or 'cuda' (default: cuda when available)."""

    def __post_init__(self) -> None:
        if not self.out.endswith((".safetensors", ".npz")):
            raise ConfigError(f"--out must end in .safetensors or .npz, got {self.out!r}")
        require_positive(self, "batch_size", "image_size")


def parse_args(argv: list[str] | None = None) -> FeaturesConfig:
    parser = new_parser("python -m capi_lab.features", __doc__.split("\n\n")[0])
    parser.add_class_arguments(FeaturesConfig, nested_key=None)
    argv = normalise_argv(sys.argv[1:] if argv is None else argv, shorthand_flags(FeaturesConfig))
    with clear_errors(parser.prog):
        return instantiate(FeaturesConfig, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    from capi_lab.pretrained import CheckpointError, load_pretrained

    args = parse_args(argv)
    try:
        check_writable(args.out)  # before the extraction, not after it
        source = resolve_source(args.images)
        model = load_pretrained(args.checkpoint)
        size = args.image_size or 16 * model.patch_size
        feats = extract_features(
            model, source, size, args.batch_size, keep_patches=not args.no_patches, device=args.device
        )
    except (DataError, CheckpointError, ConfigError) as e:
        raise SystemExit(f"error: {e}") from None
    names = [source.describe(i) for i in (feats.index or range(len(source)))]
    out = save_features(args.out, feats, names)
    shapes = {k: list(v.shape) for k, v in vars(feats).items() if isinstance(v, Tensor)}
    print(json.dumps({"out": str(out), "images": len(names), "skipped": feats.skipped, **shapes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
