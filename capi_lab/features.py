"""Frozen CAPI features for your own analyses.

    python -m capi_lab.features --checkpoint runs/quick/checkpoints/last.ckpt --images photos/ --out f.safetensors

Writes, for every image, the global representation ``[N, D]``, the registers ``[N, R, D]`` (``--no-registers`` to
skip them) and the patch feature map ``[N, h, w, D]`` (``--no-patches`` to skip it), plus the image list: a safetensors
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
from typing import Any, Literal

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

log = logging.getLogger("capi_lab.features")


@dataclass
class Features:
    global_repr: Tensor
    """``[N, D]``: mean of the first predictor block over all positions (the paper's pooling)."""
    registers: Tensor | None
    """``[N, R, D]`` (None when not kept)."""
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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``--dtype`` of the model's forward pass. fp32 is the default on every device, so a result does not depend on
where it was computed; bf16/fp16 run under autocast (faster on a GPU, a little different)."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, dtype: str = "fp32"):
    """The autocast context for ``dtype`` (:data:`DTYPES`) on ``device``; none for fp32."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")


def check_image_size(p: int, image_size: int) -> None:
    """An input side the model can take: a multiple of its patch size ``p``, else a ConfigError naming one."""
    if image_size % p or image_size < p:
        raise ConfigError(
            f"--image-size {image_size} is not a multiple of the model's patch size {p}; use e.g. "
            f"{max(1, round(image_size / p)) * p}"
        )


class _Inputs(torch.utils.data.Dataset):
    """``(index, input tensor or None, error)`` per image, so a loader worker reports an unreadable image instead
    of dying on it."""

    def __init__(self, source: ImageSource, transform: Any):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(self.source.load(i)), None
        except Exception as e:
            return i, None, str(e).splitlines()[0][:120] if str(e) else type(e).__name__


def _collate(items):
    return items


def loader(dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int) -> torch.utils.data.DataLoader:
    """In order, unshuffled, every item kept: the extraction loaders of features and evaluations."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate,
        persistent_workers=False, prefetch_factor=2 if num_workers else None,
    )  # fmt: skip


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    source: ImageSource,
    image_size: int = 224,
    batch_size: int = 64,
    keep_patches: bool = True,
    pool_patches: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "features",
    keep_registers: bool = False,
    num_workers: int = 0,
    dtype: str = "fp32",
) -> Features:
    """Run ``model`` over every image of ``source`` (resize + centre crop to ``image_size``).

    Images are decoded by a DataLoader with ``num_workers`` processes (0: in this one) and written into
    preallocated outputs, so memory is the result and one batch, never a list of batches and their concatenation.
    Registers are kept only with ``keep_registers``; patch maps with ``keep_patches``, or averaged per image right
    away with ``pool_patches`` (``feature_map`` then has ``h = w = 1``). ``dtype`` (:data:`DTYPES`, fp32 by default
    on every device) is the forward pass's precision; outputs are fp32. An image that cannot be read is left out
    with one warning naming it, as in training: ``index`` says which images the rows are, ``skipped`` which were
    left out; when none can be read, a :class:`DataError`.
    """
    device = torch.device(device) if device is not None else default_device()
    check_image_size(model.patch_size, image_size)
    model = model.to(device).eval()
    cast = autocast(device, dtype)
    n = len(source)
    out: dict[str, Tensor] = {}
    kept: list[int] = []
    skipped: list[str] = []
    row = 0
    batches = loader(_Inputs(source, eval_transform(image_size)), batch_size, num_workers)
    for items in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        for i, _, err in items:
            if err is not None:
                skipped.append(source.describe(i))
                log.warning("skipping %s: cannot read it (%s)", skipped[-1], err)
        good = [(i, x) for i, x, err in items if err is None]
        if not good:
            continue
        with cast:
            gr, reg, fm = model(torch.stack([x for _, x in good]).to(device))
        parts = {"global_repr": gr}
        if keep_registers:
            parts["registers"] = reg
        if pool_patches:
            parts["feature_map"] = fm.float().mean(dim=(1, 2), keepdim=True)
        elif keep_patches:
            parts["feature_map"] = fm
        for name, t in parts.items():
            if name not in out:
                out[name] = torch.empty((n, *t.shape[1:]), dtype=torch.float32)
            out[name][row : row + len(good)] = t.float().cpu()
        kept += [i for i, _ in good]
        row += len(good)
    index = kept_index(source, kept, skipped, desc)
    if index is not None:  # some left out: the kept rows are the first `row`
        out = {k: v[:row] for k, v in out.items()}
    return Features(out["global_repr"], out.get("registers"), out.get("feature_map"), index, skipped)


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
    tensors = {"global_repr": feats.global_repr}
    if feats.registers is not None:
        tensors["registers"] = feats.registers
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
    no_registers: bool = False
    """Do not store the register tokens."""
    device: str | None = None
    """'cpu' or 'cuda' (default: cuda when available)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Precision of the forward pass (fp32 on every device by default, so features do not depend on it)."""
    num_workers: int = -1
    """Image-decoding worker processes; -1 picks them from the cores (none on a CPU with fewer than 4)."""

    def __post_init__(self) -> None:
        if not self.out.endswith((".safetensors", ".npz")):
            raise ConfigError(f"--out must end in .safetensors or .npz, got {self.out!r}")
        require_positive(self, "batch_size", "image_size")
        check_workers(self.num_workers)


def check_workers(num_workers: int) -> None:
    if num_workers < -1:
        raise ConfigError(f"--num-workers {num_workers}: give 0 or more, or -1 to pick from the cores")


def resolve_workers(num_workers: int, device: torch.device) -> int:
    """``--num-workers``, with -1 resolved as training does (:func:`capi_lab.loader.default_workers`)."""
    if num_workers >= 0:
        return num_workers
    from capi_lab.loader import default_workers

    return default_workers(device.type, os.cpu_count() or 1, 0, torch.cuda.device_count())


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
        device = torch.device(args.device) if args.device else default_device()
        feats = extract_features(
            model, source, size, args.batch_size, keep_patches=not args.no_patches, device=device,
            keep_registers=not args.no_registers, num_workers=resolve_workers(args.num_workers, device),
            dtype=args.dtype,
        )  # fmt: skip
    except (DataError, CheckpointError, ConfigError) as e:
        raise SystemExit(f"error: {e}") from None
    names = [source.describe(i) for i in (feats.index or range(len(source)))]
    out = save_features(args.out, feats, names)
    shapes = {k: list(v.shape) for k, v in vars(feats).items() if isinstance(v, Tensor)}
    print(json.dumps({"out": str(out), "images": len(names), "skipped": feats.skipped, **shapes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
