"""Load CAPI weights (the authors' published ``.pth`` files, capi_lab checkpoints, published names)
and export capi_lab models to the authors' key layout (capi-method.md §6).

Files are always read with ``torch.load(weights_only=True)`` or safetensors: loading never runs
code from the file.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from capi_lab.config import CAPIConfig, ConfigError, ModelConfig
from capi_lab.model.capi import CAPIModel

PUBLISHED_URL = "https://dl.fbaipublicfiles.com/capi/{name}.pth"
PUBLISHED = ("capi_vitl14_lvd", "capi_vitl14_i22k", "capi_vitl14_in1k", "capi_vitl14_p205")
"""Names of the authors' published ViT-L/14 checkpoints (LVD-142M, IN22k, IN1k, Places205)."""

FORMAT = "capi_lab"
DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "default.pt"
"""The embedded default model (trained on the demo photos; see weights/MODEL_CARD.md)."""
_AUTHORS_PREFIX = "backbone."


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message says why and what to do."""


def published_path(name: str) -> Path:
    """Where a published checkpoint lives in torch.hub's cache (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / f"{name}.pth"


def fetch_published(name: str) -> Path:
    """Path of published checkpoint ``name``, downloading it into torch.hub's cache if needed."""
    dst = published_path(name)
    if dst.exists():
        return dst
    url = PUBLISHED_URL.format(name=name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dst), progress=True)
    except Exception as e:  # offline, proxy, HTTP error...
        raise CheckpointError(
            f"could not download {name!r} from {url} ({type(e).__name__}: {e}). If this machine is offline, "
            f"download that file elsewhere and put it at {dst} (torch.hub's cache; set TORCH_HOME to move it), "
            "or pass the file's path to load_pretrained"
        ) from None
    return dst


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a ``.pth``/``.ckpt`` (weights only, no code runs) or ``.safetensors`` file into a dict."""
    path = Path(path)
    if path.is_dir():
        inside = [p for p in (path / "checkpoints" / "last.ckpt", path / "last.ckpt") if p.is_file()]
        hint = f"; did you mean {str(inside[0])!r}?" if inside else ""
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist; pass a file path, 'default', or one of {list(PUBLISHED)}"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is an empty file (an interrupted download or copy?)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any parse failure (truncated zip, bad pickle, refused global) means unreadable
        raise CheckpointError(f"{str(path)!r} is not a readable checkpoint: {_why_unreadable(e)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict or capi_lab checkpoint")
    return obj


def _why_unreadable(e: Exception) -> str:
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    if refused:
        return (
            f"it holds a Python object ({refused.group(1)}) that would run code when loaded, and capi_lab loads only "
            "tensors and plain values (torch.load with weights_only=True). If you trust the file, load it yourself "
            "with weights_only=False and save its state_dict() again"
        )
    first = " ".join(str(e).split())
    if len(first) > 300:
        first = first[:300].rsplit(" ", 1)[0] + " ..."
    return (
        f"{type(e).__name__}: {first}. Expected a PyTorch state dict (.pth/.ckpt) or a .safetensors file; if it is "
        "truncated, fetch or copy it again"
    )


def _check_tensors(sd: Any, what: str) -> None:
    if not isinstance(sd, dict):
        raise CheckpointError(f"{what} is a {type(sd).__name__}, not a state dict")
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{what} has values that are not tensors: {sorted(map(str, bad))[:6]}")


def architecture_from_state_dict(sd: dict[str, Tensor]) -> ModelConfig:
    """Read the architecture of an authors'-layout backbone off its tensor shapes."""

    def get(key: str) -> Tensor:
        if key not in sd:
            raise CheckpointError(f"missing key {key!r}: this does not look like a CAPI backbone state dict")
        return sd[key]

    patch_embed = get("patch_embed.weight")
    if patch_embed.ndim != 4:
        raise CheckpointError(
            f"patch_embed.weight has shape {tuple(patch_embed.shape)}; a CAPI backbone's is 4-D "
            "(embed_dim, 3, patch, patch)"
        )
    D, _, p, _ = patch_embed.shape
    R = get("registers").shape[1]
    d_pred = get("mask_token").shape[-1]

    def depth(part: str) -> int:
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"{part}\.blocks\.(\d+)\.", k))}
        return max(idx) + 1 if idx else 0

    depth_enc, depth_dec = depth("encoder"), depth("decoder")
    if depth_enc == 0 or depth_dec == 0:
        raise CheckpointError(f"found {depth_enc} encoder and {depth_dec} decoder blocks; a CAPI backbone has both")
    freqs = get("encoder.blocks.0.residual1.fn.rope.freqs")
    hd_enc = freqs.shape[1]
    hd_dec = get("decoder.blocks.0.residual1.fn.rope.freqs").shape[1]
    hidden = get("encoder.blocks.0.residual2.fn.fc1.weight").shape[0]
    f = freqs[0, : hd_enc // 4].double() / (2 * math.pi)
    max_freq = float(f[0])
    min_freq = float(f[-1]) if len(f) > 1 else max_freq * 1e-4
    layout = "rotation" if bool((freqs[1, : hd_enc // 4] != 0).any()) else "capi"
    return ModelConfig(
        patch_size=p,
        embed_dim=D,
        depth=depth_enc,
        num_heads=D // hd_enc,
        pred_depth=depth_dec,
        pred_dim=d_pred,
        pred_heads=d_pred // hd_dec,
        mlp_ratio=hidden / D,
        num_registers=R,
        num_prototypes=sd["head.last_layer.weight_v"].shape[0] if "head.last_layer.weight_v" in sd else 16384,
        rope_max_freq=round(max_freq, 6),
        rope_min_freq=round(min_freq, 10),
        rope_layout=layout,
    )


def _rename(key: str, to_authors: bool) -> str:
    """Our ``backbone.predictor.*`` is the authors' ``backbone.decoder.*``; everything else matches."""
    a, b = ("predictor.", "decoder.") if to_authors else ("decoder.", "predictor.")
    return b + key[len(a) :] if key.startswith(a) else key


def export_authors_state_dict(model: CAPIModel, include_heads: bool = False) -> dict[str, Tensor]:
    """The model's backbone in the authors' key layout (``backbone.patch_embed.weight``, ...,
    ``backbone.decoder.blocks.i...``). With ``include_heads`` the student head and clustering head are
    added under ``head.*`` / ``clustering_head.*`` (the authors' loader ignores such keys)."""
    out = {_AUTHORS_PREFIX + _rename(k, True): v.detach().clone() for k, v in model.backbone.state_dict().items()}
    if include_heads:
        for name in ("head", "clustering_head"):
            module = getattr(model, name)
            if module is not None:
                out.update({f"{name}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    return out


def save_authors_checkpoint(model: CAPIModel, path: str | Path, include_heads: bool = False) -> Path:
    """Write :func:`export_authors_state_dict` with ``torch.save`` (a plain state dict, as published)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(export_authors_state_dict(model, include_heads), path)
    return path


def _load_strict(module: torch.nn.Module, sd: dict[str, Tensor], what: str) -> None:
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        more = lambda keys: " ..." if len(keys) > 8 else ""  # noqa: E731
        raise CheckpointError(
            f"{what} does not match the architecture read from it: missing keys {missing[:8]}{more(missing)}, "
            f"unexpected keys {unexpected[:8]}{more(unexpected)}"
        )
    bad = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in module.state_dict().items()
        if sd[k].shape != v.shape
    ]
    if bad:
        raise CheckpointError(f"{what} has tensors of the wrong shape: {bad[:6]}")
    module.load_state_dict(sd)


_HEAD_KEYS = {
    "head": ("last_layer.weight_g", "last_layer.weight_v"),
    "clustering_head": ("linear.weight", "linear.bias"),
}


def model_from_authors_state_dict(sd: dict[str, Tensor]) -> CAPIModel:
    """Build a capi_lab model from an authors'-layout state dict. Keys outside ``backbone.*`` are
    ignored, as by the authors' loader, except the exact head keys :func:`export_authors_state_dict`
    writes (``head.last_layer.weight_g/v``, ``clustering_head.linear.weight/bias``)."""
    backbone = {k[len(_AUTHORS_PREFIX) :]: v for k, v in sd.items() if k.startswith(_AUTHORS_PREFIX)}
    _check_tensors(backbone, "its backbone.* entries")
    heads = {
        name: {k: sd[f"{name}.{k}"] for k in keys}
        for name, keys in _HEAD_KEYS.items()
        if all(f"{name}.{k}" in sd for k in keys)
    }
    config = architecture_from_state_dict({**backbone, **{f"head.{k}": v for k, v in heads.get("head", {}).items()}})
    if "clustering_head" in heads:
        config = dataclasses.replace(config, num_prototypes=heads["clustering_head"]["linear.weight"].shape[0])
    model = CAPIModel(config, student_head="head" in heads, clustering_head="clustering_head" in heads)
    _load_strict(model.backbone, {_rename(k, False): v for k, v in backbone.items()}, "the backbone")
    for name, part in heads.items():
        _load_strict(getattr(model, name), part, f"the {name}")
    return model


def model_state(model: CAPIModel, config: CAPIConfig | None = None, **meta: Any) -> dict[str, Any]:
    """A capi_lab model file: format tag, resolved config and the full model state dict."""
    config = config or CAPIConfig(model=model.config, image_size=model.image_size or 16 * model.patch_size)
    return {"format": FORMAT, "config": config.to_dict(), "model": model.state_dict(), **meta}


def model_from_capi_lab(obj: dict[str, Any], which: str = "teacher") -> CAPIModel:
    """Build a model from a capi_lab file: a model file (``model``) or a training checkpoint, whose
    ``teacher`` (the EMA model, like the authors' releases) is used by default."""
    if not isinstance(obj.get("config"), dict):
        raise CheckpointError(f"the capi_lab checkpoint has no config (its keys: {sorted(map(str, obj))})")
    try:
        full = CAPIConfig.from_dict(obj["config"])
    except ConfigError as e:
        raise CheckpointError(f"the checkpoint's config is invalid: {e}") from None
    config = full.model
    sd = obj.get("model", obj.get(which))
    if sd is None:
        raise CheckpointError(f"capi_lab checkpoint holds neither 'model' nor {which!r}: keys {sorted(obj)}")
    _check_tensors(sd, f"its {'model' if 'model' in obj else which!r} weights")
    model = CAPIModel(
        config,
        student_head=any(k.startswith("head.") for k in sd),
        clustering_head=any(k.startswith("clustering_head.") for k in sd),
    )
    _load_strict(model, sd, "the capi_lab checkpoint")
    model.image_size = full.image_size
    model.meta = dict(obj.get("meta", {}))  # training provenance, when the file records it
    return model


def load_pretrained(src: str | Path, device: str | torch.device = "cpu") -> CAPIModel:
    """An eval-mode CAPI model from ``src``.

    Args:
        src: ``"default"`` (the embedded default model); a path to an authors' ``.pth`` state dict (keys
            ``backbone.*``; the architecture is read off the shapes); a capi_lab checkpoint or model file;
            or a published name (``capi_vitl14_lvd``,
            ``capi_vitl14_i22k``, ``capi_vitl14_in1k``, ``capi_vitl14_p205``), downloaded into torch.hub's
            cache on first use.
        device: where to put the model.
    """
    if isinstance(src, str) and src in PUBLISHED:
        path = fetch_published(src)
    elif isinstance(src, str) and src == "default":
        path = DEFAULT_MODEL
        if not path.exists():
            raise CheckpointError(
                f"the embedded default model is missing ({path}); "
                "rebuild it with `python scripts/build_default_model.py`"
            )
    else:
        path = Path(src)
    obj = read_checkpoint(path)
    try:
        if obj.get("format") == FORMAT:
            model = model_from_capi_lab(obj)
        elif any(isinstance(k, str) and k.startswith(_AUTHORS_PREFIX) for k in obj):
            model = model_from_authors_state_dict(obj)
        else:
            model = None
    except CheckpointError as e:
        raise CheckpointError(f"{str(path)!r}: {e}") from None
    except (ConfigError, KeyError, AttributeError, TypeError, ValueError, IndexError, RuntimeError) as e:
        # whatever the checks above did not foresee: still one line naming the file
        raise CheckpointError(
            f"{str(path)!r} is a malformed checkpoint ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from None
    if model is None:
        keys = [k for k in list(obj)[:5]]
        raise CheckpointError(
            f"{str(path)!r} is neither an authors' CAPI state dict (keys 'backbone.*') nor a capi_lab checkpoint; "
            f"its first keys are {keys}"
        )
    return model.to(device).eval()
