"""Typed configuration for CAPI: model, masking and optimisation, with named presets.

Every field has a docstring. ``__post_init__`` validates values so that a bad override fails
when the config is built, with a message naming the field, not later inside a matmul.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_type_hints

MaskStrategy = Literal["inverse_block", "block", "random"]
MASK_STRATEGY_NAMES: tuple[str, ...] = get_args(MaskStrategy)
"""The masking strategies (capi_lab.masking implements each), in the order the app lists them."""


class ConfigError(ValueError):
    """A configuration value is invalid (the message names the field and the fix)."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    """Architecture of the CAPI backbone and its two heads (capi-method.md §1, §3, §4)."""

    patch_size: int = 16
    """Side of a square patch in pixels."""
    embed_dim: int = 768
    """Encoder width D."""
    depth: int = 12
    """Number of encoder blocks."""
    num_heads: int = 12
    """Encoder attention heads (head_dim = embed_dim / num_heads, a multiple of 4 for 2-D RoPE)."""
    pred_depth: int = 6
    """Number of predictor (cross-attention) blocks."""
    pred_dim: int | None = None
    """Predictor width D_pred; None means the encoder width, as in the released models."""
    pred_heads: int | None = None
    """Predictor attention heads; None means the encoder's."""
    mlp_ratio: float = 4.0
    """Hidden width of the MLPs relative to their block width."""
    num_registers: int = 16
    """Learned register tokens R (a multiple of 4: they sit on the 4 edges of the unit square)."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate, the same in every block (0.2 for the paper's ViT-L)."""
    num_prototypes: int = 16384
    """Prototypes K of the online clustering head and outputs of the student head."""
    rope_max_freq: float = 7.0
    """Highest RoPE frequency (cycles over the unit square)."""
    rope_min_freq: float = 7e-4
    """Lowest RoPE frequency."""
    rope_layout: Literal["capi", "rotation"] = "capi"
    """RoPE channel layout: 'capi' is the published models' table (not a pure rotation, see
    ``capi_lab.model.rope.rope_frequencies``); 'rotation' is a true 2-D rotary embedding."""

    def __post_init__(self) -> None:
        for name in ("patch_size", "embed_dim", "depth", "num_heads", "pred_depth", "num_prototypes"):
            _check(getattr(self, name) >= 1, f"model.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.num_registers >= 0, f"model.num_registers must be >= 0, got {self.num_registers}")
        _check(
            self.num_registers % 4 == 0,
            f"model.num_registers must be a multiple of 4 (registers sit on the 4 edges of the unit square), "
            f"got {self.num_registers}",
        )
        for prefix, dim, heads in (("", self.embed_dim, self.num_heads), ("pred_", self.dim_pred, self.heads_pred)):
            _check(dim % heads == 0, f"model.{prefix}dim={dim} is not divisible by model.{prefix}heads={heads}")
            _check(
                (dim // heads) % 4 == 0,
                f"head dim {dim // heads} (model.{prefix}dim / model.{prefix}heads) must be a multiple of 4 "
                "for 2-D axial RoPE",
            )
        _check(0.0 <= self.drop_path_rate < 1.0, f"model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        _check(
            self.rope_layout in ("capi", "rotation"),
            f"model.rope_layout must be 'capi' or 'rotation', got {self.rope_layout!r}",
        )
        _check(self.mlp_ratio > 0, f"model.mlp_ratio must be > 0, got {self.mlp_ratio}")
        _check(
            0 < self.rope_min_freq < self.rope_max_freq,
            f"need 0 < model.rope_min_freq < model.rope_max_freq, got {self.rope_min_freq}, {self.rope_max_freq}",
        )

    @property
    def dim_pred(self) -> int:
        """Resolved predictor width."""
        return self.pred_dim if self.pred_dim is not None else self.embed_dim

    @property
    def heads_pred(self) -> int:
        """Resolved predictor head count."""
        return self.pred_heads if self.pred_heads is not None else self.num_heads


@dataclass
class MaskConfig:
    """How patches are hidden from the student and which of them are scored (capi-method.md §2)."""

    strategy: MaskStrategy = "inverse_block"
    """'random', 'block' or 'inverse_block' (a rectangle is the visible part)."""
    ratio: float = 0.65
    """Fraction of patches masked: n_masked = int(N * ratio)."""
    roll: bool = True
    """Cyclically roll each mask by a random offset along both axes (the paper's default)."""
    prediction_subsampling: float = 0.05
    """Fraction of masked patches that are predicted and scored: n_predict = int(n_masked * this)."""
    min_aspect: float = 0.5
    """Smallest block aspect ratio (height / width); log-uniform between this and max_aspect."""
    max_aspect: float = 2.0
    """Largest block aspect ratio."""

    def __post_init__(self) -> None:
        _check(
            self.strategy in MASK_STRATEGY_NAMES,
            f"mask.strategy must be one of {', '.join(map(repr, MASK_STRATEGY_NAMES))}, got {self.strategy!r}",
        )
        _check(0.0 < self.ratio < 1.0, f"mask.ratio must be in (0, 1), got {self.ratio}")
        _check(
            0.0 < self.prediction_subsampling <= 1.0,
            f"mask.prediction_subsampling must be in (0, 1], got {self.prediction_subsampling}",
        )
        _check(
            0 < self.min_aspect <= self.max_aspect,
            f"need 0 < mask.min_aspect <= mask.max_aspect, got {self.min_aspect}, {self.max_aspect}",
        )


@dataclass
class OptimConfig:
    """Optimisation recipe (capi-method.md §4, Table 6)."""

    lr: float = 1e-3
    """Peak learning rate of the backbone and student head (the paper: 1e-3 at batch 16384)."""
    weight_decay: float = 0.1
    """AdamW weight decay of the backbone and student head."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (both optimizers)."""
    warmup_fraction: float = 0.1
    """Fraction of the run spent in linear warmup."""
    truncate: float = 0.8
    """The cosine is cut at this fraction of its period (the 'truncate_cos 0.8' schedule)."""
    momentum_peak: float = 0.999
    """Teacher EMA momentum reached at the end of warmup (it starts and ends at 1.0)."""
    clustering_lr_ratio: float = 0.5
    """Clustering-head learning rate relative to the backbone's."""
    clustering_weight_decay: float = 0.01
    """AdamW weight decay of the clustering head (PyTorch's default)."""
    patch_embed_lr_mult: float = 0.2
    """Learning-rate multiplier of the patch embedding."""
    norm_wd_mult: float = 0.1
    """Weight-decay multiplier of norm scales."""
    grad_clip: float | None = None
    """Clip the student's gradient norm to this value (None: no clipping, as in the paper)."""
    student_temp: float = 0.12
    """Temperature of the student's (and the clustering head's) softmax."""
    target_temp: float = 0.06
    """Temperature of the teacher logits fed to Sinkhorn-Knopp."""
    sinkhorn_iters: int = 3
    """Sinkhorn-Knopp iterations; 0: no balancing, plain softmax targets (collapses: an ablation, Table 1(i))."""
    sinkhorn_positionwise: bool = True
    """Balance prototypes per position across the batch (the paper's default) instead of globally."""

    def __post_init__(self) -> None:
        _check(self.lr >= 0, f"optim.lr must be >= 0, got {self.lr}")
        _check(
            0.0 <= self.warmup_fraction < 1.0, f"optim.warmup_fraction must be in [0, 1), got {self.warmup_fraction}"
        )
        _check(0.0 < self.truncate <= 1.0, f"optim.truncate must be in (0, 1], got {self.truncate}")
        _check(0.0 <= self.momentum_peak <= 1.0, f"optim.momentum_peak must be in [0, 1], got {self.momentum_peak}")
        _check(self.student_temp > 0 and self.target_temp > 0, "optim.student_temp and optim.target_temp must be > 0")
        _check(
            self.sinkhorn_iters >= 0, f"optim.sinkhorn_iters must be >= 0 (0: no balancing), got {self.sinkhorn_iters}"
        )
        _check(len(self.betas) == 2, f"optim.betas must have two values, got {self.betas}")


@dataclass
class CAPIConfig:
    """Everything that defines a CAPI model and how it is pretrained."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    mask: MaskConfig = field(default_factory=MaskConfig)
    """Masking."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimisation."""
    image_size: int = 224
    """Side of the square training crops (a multiple of the patch size)."""
    batch_size: int = 64
    """Images per step and per device."""
    crop_scale: tuple[float, float] = (0.6, 1.0)
    """Area range of the RandomResizedCrop (the paper: 0.6-1.0; smaller minimums crop more heavily)."""

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(
            self.image_size >= self.model.patch_size,
            f"image_size must be at least model.patch_size={self.model.patch_size}, got {self.image_size}",
        )
        lo, hi = self.crop_scale
        _check(0 < lo <= hi <= 1, f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        _check(
            self.image_size % self.model.patch_size == 0,
            f"image_size={self.image_size} is not a multiple of model.patch_size={self.model.patch_size}; "
            f"use e.g. {max(1, self.image_size // self.model.patch_size) * self.model.patch_size}",
        )

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (YAML/JSON friendly)."""
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(d["optim"]["betas"])
        d["crop_scale"] = list(d["crop_scale"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CAPIConfig:
        """Inverse of :meth:`to_dict`, through the same jsonargparse types as the command line (so YAML's
        ``1e-3`` string, ints for floats and lists for tuples are read as the fields' types); an unknown key
        or a value of the wrong type is a :class:`ConfigError` naming it."""
        from jsonargparse import ArgumentError

        unknown = _unknown_keys(cls, d)
        _check(not unknown, f"unknown config field(s) {unknown}; see capi_lab.config for the known ones")
        parser = _dict_parser()
        try:
            ns = parser.instantiate(parser.parse_object(d))
        except ArgumentError as e:
            raise ConfigError(_type_error(str(e))) from None
        return cls(**{f.name: ns[f.name] for f in dataclasses.fields(cls)})


def _unknown_keys(cls: type, d: dict[str, Any], prefix: str = "") -> list[str]:
    hints = get_type_hints(cls)
    out = []
    for key, value in d.items():
        if key not in hints:
            out.append(prefix + key)
        elif dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            out += _unknown_keys(hints[key], value, f"{prefix}{key}.")
    return out


@functools.cache
def _dict_parser() -> Any:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(CAPIConfig, nested_key=None)
    return parser


_TYPE_NAMES = {"<class 'float'>": "a number", "<class 'int'>": "an integer", "<class 'bool'>": "true or false"}


def _type_error(message: str) -> str:
    """jsonargparse's 'Parser key "optim.lr": Expected a <class 'float'>. Got value: fast' as one line."""
    m = re.search(r'key "([^"]+)":\s*Expected a (.+?)\. Got value: (.*)', message, re.S)
    if m is None:
        return " ".join(message.split())
    key, expected, got = m.groups()
    return f"{key} must be {_TYPE_NAMES.get(expected, expected)}, got {got.strip()!r}"


def _tiny() -> CAPIConfig:
    # Small enough that a training step takes well under a second on a laptop CPU; 28 px inputs
    # (Fashion-MNIST) give a 7x7 grid. More predictions per image than the paper's 5 %, since with
    # 49 patches 5 % would score a single token. From the recipe study (benchmarks/recipe_study.md, 600 steps of
    # batch 64 on Fashion-MNIST): 64 prototypes, not 1024, because position-wise Sinkhorn balances each position
    # over the batch's images, and with 64 images and 1024 prototypes it spreads every token over ~27 of them
    # (target entropy 3.3; the paper has as many prototypes as images in its global batch, 16384); and a teacher
    # momentum peaking at 0.95, not the paper's 0.999 (a ~1000-step time constant, right for 500k steps, which
    # leaves a short run's teacher at its random initialisation). A run of thousands of steps wants a slower one
    # and every masked patch predicted: at 7600 steps of 64 (the 20-minute run), `--optim.momentum-peak 0.99
    # --mask.prediction-subsampling 1.0` scores k-NN 81.3 / linear 85.2 against 80.1 / 84.3 for the preset
    # (medians of four and three seeds; momentum 0.99 alone 80.6 / 84.5).
    return CAPIConfig(
        model=ModelConfig(
            patch_size=4, embed_dim=128, depth=4, num_heads=4, pred_depth=2, num_registers=4, num_prototypes=64
        ),
        mask=MaskConfig(prediction_subsampling=0.5),
        optim=OptimConfig(lr=2e-3, weight_decay=0.05, momentum_peak=0.95),
        image_size=28,
        batch_size=64,
    )


def _vit(patch: int, dim: int, depth: int, heads: int, pred_depth: int, drop_path: float, **kw: Any) -> CAPIConfig:
    return CAPIConfig(
        model=ModelConfig(
            patch_size=patch,
            embed_dim=dim,
            depth=depth,
            num_heads=heads,
            pred_depth=pred_depth,
            drop_path_rate=drop_path,
        ),
        image_size=224,
        **kw,
    )


def _default() -> CAPIConfig:
    # The embedded default model: small enough to train on a laptop CPU in ~40 minutes and to ship
    # (< 25 MB), trained on ~400 demo photos with cut-outs pasted on them (`--data composite`) and heavy cropping,
    # so that it sees many scales. As many prototypes as images per step and a fast teacher, as `tiny` (the recipe
    # study, benchmarks/recipe_study.md).
    return CAPIConfig(
        model=ModelConfig(
            patch_size=8, embed_dim=192, depth=6, num_heads=3, pred_depth=3, num_registers=8, num_prototypes=64
        ),
        mask=MaskConfig(prediction_subsampling=0.25),
        optim=OptimConfig(lr=1e-3, weight_decay=0.05, momentum_peak=0.95),
        image_size=64,
        batch_size=64,
        crop_scale=(0.1, 1.0),
    )


PRESETS: dict[str, Any] = {
    "tiny": _tiny,
    "default": _default,
    "vit_s16": lambda: _vit(16, 384, 12, 6, 6, 0.1, batch_size=256),
    "vit_b16": lambda: _vit(16, 768, 12, 12, 6, 0.1, batch_size=256),
    # The paper's recipe: 24/12 x 1024, 16 heads, patch 14, 16384 prototypes, stochastic depth 0.2,
    # lr 1e-3 at a global batch of 16384 (set batch_size per device so devices x batch_size = 16384).
    "vit_l14": lambda: _vit(14, 1024, 24, 16, 12, 0.2, batch_size=128),
}
"""Named presets; each value builds a fresh :class:`CAPIConfig`."""


def get_preset(name: str) -> CAPIConfig:
    """The config of preset ``name``; an unknown name lists the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def with_overrides(config: CAPIConfig, **overrides: Any) -> CAPIConfig:
    """A copy of ``config`` with dotted or model-level overrides applied and validated.

    Keys may be ``"model.embed_dim"`` style paths, top-level fields (``image_size``), or bare
    model fields (``embed_dim=64``) as a shorthand for ``create_model``.
    """
    d = config.to_dict()
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for key, value in overrides.items():
        path = key.split(".")
        if len(path) == 1 and path[0] not in d and path[0] in model_fields:
            path = ["model", path[0]]
        node = d
        for part in path[:-1]:
            _check(isinstance(node.get(part), dict), f"unknown config section {part!r} in override {key!r}")
            node = node[part]
        _check(path[-1] in node, f"unknown config field {key!r}")
        node[path[-1]] = value
    return CAPIConfig.from_dict(d)
