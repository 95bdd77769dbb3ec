"""What a CAPI model sees in a handful of images: the computations behind the app and the notebooks.

Everything here takes a model and PIL images or tensors and returns arrays; ``capi_lab.explore.render`` turns
them into pictures. The steps:

* :func:`load_images` — read user files robustly (corrupt files, 16-bit, CMYK, alpha, huge images);
* :func:`prepare` — resize to a side length in multiples of the patch size, normalise;
* :func:`encode` — patch features and clustering-head logits of each image;
* :func:`pca_maps`, :func:`cluster_maps`, :func:`reconstruct`, :func:`similarity_maps` — the views.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from capi_lab.config import MaskConfig
from capi_lab.data import read_image, to_input
from capi_lab.explore.pca import pca_basis, pca_rgb
from capi_lab.masking import MASK_STRATEGIES, sample_mask
from capi_lab.model.capi import CAPIModel
from capi_lab.sinkhorn import sinkhorn_standard

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
"""The seven example photos the app and the notebooks start from (package data; sources in ATTRIBUTION.md)."""


def example_photos() -> list[Path]:
    """Paths of the bundled example photos, sorted by name."""
    return sorted(p for p in EXAMPLES_DIR.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


MAX_IMAGES = 16
"""Images handled at once (more is an error naming the limit, not a silent cut)."""
MAX_FILE_MB = 50
"""Largest accepted file, in MB."""
MAX_INPUT_SIDE = 2048
"""Larger images are downscaled to this longest side when read (12000 x 9000 photos included)."""
MIN_SIDE = 16
"""Images with a side below this many pixels carry too little to look at and are refused."""
TEACHER_TEMPERATURE = 0.06
"""Temperature of the teacher's assignments (the paper's Sinkhorn temperature)."""
STUDENT_TEMPERATURE = 0.12
"""Temperature of the student's predictions (the paper's)."""


class InputError(ValueError):
    """A problem with what the user gave (files, settings); the message says what to do."""


@dataclass
class LoadedImage:
    name: str
    image: Image.Image  # 8-bit RGB
    notes: list[str] = field(default_factory=list)


def _read_one(path: Path) -> tuple[Image.Image | None, list[str]]:
    name = path.name
    try:
        size = path.stat().st_size
    except OSError as e:
        return None, [f"{name}: cannot be read ({e.strerror or e}); check the path"]
    if size == 0:
        return None, [f"{name}: the file is empty (0 bytes); upload the image again"]
    if size > MAX_FILE_MB * 2**20:
        return None, [f"{name}: {size / 2**20:.0f} MB is over the {MAX_FILE_MB} MB limit; downscale or recompress it"]
    notes: list[str] = []
    info: dict = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = read_image(path, max_side=MAX_INPUT_SIDE, info=info)
    except Image.DecompressionBombError:
        return None, [f"{name}: too many pixels to decode safely; downscale it below 100 megapixels first"]
    except (OSError, SyntaxError, ValueError) as e:
        kind = "not an image" if "cannot identify" in str(e) else f"a corrupt or truncated image ({e})"
        return None, [f"{name}: {kind}; upload a JPEG, PNG, WebP, BMP, GIF or TIFF image"]
    (w0, h0), mode = info["size"], info["mode"]
    if min(w0, h0) < MIN_SIDE:
        return None, [f"{name}: {w0}x{h0} px is too small (each side needs at least {MIN_SIDE} px)"]
    if mode != "RGB":
        what = {
            "L": "greyscale",
            "LA": "greyscale with alpha",
            "RGBA": "RGBA (alpha dropped)",
            "CMYK": "CMYK",
            "P": "palette",
            "I;16": "16-bit",
            "I;16B": "16-bit",
            "I": "32-bit integer",
            "F": "floating-point",
        }
        notes.append(f"{name}: {what.get(mode, mode)} image converted to 8-bit RGB")
    if max(w0, h0) > MAX_INPUT_SIDE:
        notes.append(f"{name}: {w0}x{h0} px downscaled to {img.size[0]}x{img.size[1]} (max side {MAX_INPUT_SIDE})")
    return img, notes


def load_images(paths: list[str | os.PathLike], max_images: int = MAX_IMAGES) -> tuple[list[LoadedImage], list[str]]:
    """Read image files as RGB. Files that cannot be used are skipped with a note (the others go on);
    conversions and downscaling are noted too. Raises :class:`InputError` when no file is given, when
    more than ``max_images`` are, or when none can be used."""
    paths = [Path(p) for p in (paths or [])]
    if not paths:
        raise InputError("no image given: upload one or more images (or click an example)")
    if len(paths) > max_images:
        raise InputError(f"{len(paths)} images given; at most {max_images} are handled at once — remove some")
    images, notes = [], []
    for p in paths:
        img, n = _read_one(p)
        notes += n
        if img is not None:
            images.append(LoadedImage(p.name, img, n))
    if not images:
        raise InputError("none of the files could be used:\n" + "\n".join(f"- {n}" for n in notes))
    return images, notes


def fit_size(width: int, height: int, resolution: int, patch_size: int) -> tuple[int, int]:
    """``(W, H)`` with the longer side ``resolution`` (rounded to the patch size), aspect kept, both
    sides multiples of ``patch_size`` and at least one patch."""
    if resolution < patch_size:
        raise InputError(f"resolution {resolution} is below the patch size {patch_size}; use a multiple of it")
    res = resolution // patch_size * patch_size
    scale = res / max(width, height)
    W = max(patch_size, round(width * scale / patch_size) * patch_size)
    H = max(patch_size, round(height * scale / patch_size) * patch_size)
    return W, H


def prepare(image: Image.Image, resolution: int, patch_size: int) -> tuple[torch.Tensor, Image.Image]:
    """The model's input ``[1, 3, H, W]`` (ImageNet-normalised) and the resized RGB picture it shows."""
    W, H = fit_size(*image.size, resolution, patch_size)
    shown = image.resize((W, H), Image.Resampling.BICUBIC)
    return to_input(shown)[None], shown


@dataclass
class Encoded:
    """One image as the model sees it."""

    shown: Image.Image  # the resized picture, H x W
    features: torch.Tensor  # [h, w, D] normalised patch tokens
    logits: torch.Tensor | None  # [h, w, K] clustering-head logits (None without a clustering head)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.features.shape[:2])


@torch.inference_mode()
def encode(model: CAPIModel, image: Image.Image, resolution: int) -> Encoded:
    return _encode_prepared(model, *prepare(image, resolution, model.patch_size))


def _encode_prepared(model: CAPIModel, x: torch.Tensor, shown: Image.Image) -> Encoded:
    p = next(model.parameters())
    feats = model.patch_features(x.to(p.device, p.dtype))[0]
    h, w = x.shape[2] // model.patch_size, x.shape[3] // model.patch_size
    logits = model.clustering_head(feats).float().cpu().view(h, w, -1) if model.clustering_head is not None else None
    return Encoded(shown, feats.float().cpu().view(h, w, -1), logits)


# ---------------------------------------------------------------------------------------------- PCA
@dataclass
class PCAResult:
    per_image: list[np.ndarray]  # [h, w, 3] in [0, 1], each image's own basis
    joint: list[np.ndarray]  # [h, w, 3] in [0, 1], one basis for all images
    components: list[np.ndarray]  # per image, [c, h, w]: projections on the first c joint components
    explained_variance: np.ndarray  # ratio of the first components of the joint basis


def pca_maps(encoded: list[Encoded], n_components: int = 4) -> PCAResult:
    maps = [e.features for e in encoded]
    per_image = [m.numpy() for m in pca_rgb(maps, joint=False)]
    joint = [m.numpy() for m in pca_rgb(maps, joint=True)]
    flat = torch.cat([m.reshape(-1, m.shape[-1]) for m in maps])
    k = max(n_components, 10)
    mean, comps, ratio = pca_basis(flat, min(k, *flat.shape))
    proj = [((m.reshape(-1, m.shape[-1]) - mean) @ comps[:n_components].T).T.reshape(-1, *m.shape[:2]) for m in maps]
    return PCAResult(per_image, joint, [p.numpy() for p in proj], ratio.numpy())


# ------------------------------------------------------------------------------------------ clusters
@dataclass
class ClusterResult:
    assignments: list[np.ndarray]  # [h, w] cluster index per patch
    confidence: list[np.ndarray]  # [h, w] probability of the assigned cluster
    entropy: list[np.ndarray]  # [h, w] entropy (nats) of each patch's assignment
    method: str  # how the clusters were made, in words
    num_clusters: int  # size of the cluster vocabulary (K, or k of k-means)
    usage: list[tuple[int, int]]  # (cluster, patch count), most used first
    centers: torch.Tensor  # [num_clusters, D] the prototypes (or k-means centroids): what colours follow


def _kmeans_probs(feats: torch.Tensor, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.cluster import KMeans

    x = F.normalize(feats, dim=-1)
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(x.numpy())
    centroids = F.normalize(torch.from_numpy(km.cluster_centers_).float(), dim=-1)
    return torch.softmax(x @ centroids.T / TEACHER_TEMPERATURE, dim=-1), centroids


def prototypes(model: CAPIModel) -> torch.Tensor | None:
    """``[K, D]`` the clustering head's prototype vectors (None without a clustering head)."""
    if model.clustering_head is None:
        return None
    return model.clustering_head.linear.weight.detach().float().cpu()


def cluster_maps(
    encoded: list[Encoded], balance: bool = False, kmeans_k: int = 32, centers: torch.Tensor | None = None
) -> ClusterResult:
    """Each patch's cluster: the clustering head's softmax at the teacher temperature, or with
    ``balance`` the standard Sinkhorn-Knopp over all patches of all the images (every cluster gets an
    even share of the set, as the teacher's targets do in training). A model without a clustering head
    (the authors' published backbones) gets k-means on its patch features instead. ``centers``: the model's
    prototypes (:func:`prototypes`), kept in the result for colouring."""
    sizes = [e.grid[0] * e.grid[1] for e in encoded]
    if all(e.logits is not None for e in encoded):
        logits = torch.cat([e.logits.reshape(-1, e.logits.shape[-1]) for e in encoded])
        k = logits.shape[-1]
        if balance:
            probs = sinkhorn_standard(logits / TEACHER_TEMPERATURE)
            method = f"teacher clustering head, {k} prototypes, Sinkhorn-balanced over the {len(encoded)} image(s)"
        else:
            probs = torch.softmax(logits / TEACHER_TEMPERATURE, dim=-1)
            method = f"teacher clustering head, {k} prototypes, softmax at temperature {TEACHER_TEMPERATURE}"
    else:
        feats = torch.cat([e.features.reshape(-1, e.features.shape[-1]) for e in encoded])
        k = min(kmeans_k, feats.shape[0])
        probs, centers = _kmeans_probs(feats, k)
        method = f"k-means (k={k}) on patch features — this model has no clustering head"
    conf, assign = probs.max(-1)
    ent = -torch.special.xlogy(probs, probs).sum(-1)
    counts = torch.bincount(assign, minlength=k)
    order = torch.argsort(counts, descending=True, stable=True)
    usage = [(int(c), int(counts[c])) for c in order if counts[c] > 0]

    def split(t: torch.Tensor) -> list[np.ndarray]:
        return [a.reshape(e.grid).numpy() for a, e in zip(t.split(sizes), encoded, strict=True)]

    if centers is None or centers.shape[0] != k:
        centers = torch.eye(k)  # unknown prototypes: colours by index
    return ClusterResult(split(assign), split(conf), split(ent), method, k, usage, centers)


# ----------------------------------------------------------------------------------- reconstruction
@dataclass
class Reconstruction:
    mask: np.ndarray  # [h, w] True = masked (hidden from the encoder, predicted)
    predicted: np.ndarray  # [h, w] predicted cluster at masked patches, -1 elsewhere
    teacher: np.ndarray  # [h, w] the teacher's cluster for the full image
    in_top5: np.ndarray  # [h, w] teacher's cluster among the prediction's 5 best (masked patches)
    confidence: np.ndarray  # [h, w] predictor's probability of its top cluster (masked), 0 elsewhere
    top1: float  # agreement over masked patches
    top5: float


@torch.inference_mode()
def reconstruct(
    model: CAPIModel,
    image: Image.Image,
    resolution: int,
    strategy: str = "inverse_block",
    ratio: float = 0.65,
    roll: bool = True,
    seed: int = 0,
) -> tuple[Reconstruction, Encoded]:
    """Hide patches with a training mask, run the encoder on the visible ones and the predictor at every
    masked position, and compare the student head's cluster with the teacher's for the full image."""
    _check_heads(model)
    if strategy not in MASK_STRATEGIES:
        raise InputError(f"unknown masking strategy {strategy!r}; choose one of {', '.join(MASK_STRATEGIES)}")
    x, shown = prepare(image, resolution, model.patch_size)
    h, w = x.shape[2] // model.patch_size, x.shape[3] // model.patch_size
    try:
        cfg = MaskConfig(strategy=strategy, ratio=float(ratio), roll=bool(roll), prediction_subsampling=1.0)
        mask = sample_mask(h, w, cfg, np.random.default_rng(seed))
    except ValueError as e:  # unknown strategy, or a ratio that leaves no visible / no masked patch
        raise InputError(str(e)) from None
    return _reconstruct_prepared(model, x, shown, mask)


@torch.inference_mode()
def reconstruct_with_mask(
    model: CAPIModel, image: Image.Image, resolution: int, mask: np.ndarray
) -> tuple[Reconstruction, Encoded]:
    """:func:`reconstruct` with a given ``[h, w]`` mask (True = hidden) instead of a sampled one."""
    _check_heads(model)
    x, shown = prepare(image, resolution, model.patch_size)
    grid = (x.shape[2] // model.patch_size, x.shape[3] // model.patch_size)
    if mask.shape != grid or mask.all() or not mask.any():
        raise InputError(f"the mask must be {grid[0]}x{grid[1]} with masked and visible patches, got {mask.shape}")
    return _reconstruct_prepared(model, x, shown, mask)


def _check_heads(model: CAPIModel) -> None:
    if model.head is None or model.clustering_head is None:
        raise InputError(
            "this model has no student head and clustering head (the authors' published checkpoints hold the "
            "backbone only), so it cannot name predicted clusters; use a capi_lab checkpoint or the default model"
        )


def _reconstruct_prepared(
    model: CAPIModel, x: torch.Tensor, shown: Image.Image, mask: np.ndarray
) -> tuple[Reconstruction, Encoded]:
    ((rec, feats, logits),) = reconstruct_batch(model, x, mask[None])
    return rec, Encoded(shown, feats, logits)


@torch.inference_mode()
def reconstruct_batch(
    model: CAPIModel, x: torch.Tensor, masks: np.ndarray
) -> list[tuple[Reconstruction, torch.Tensor, torch.Tensor]]:
    """:func:`reconstruct` for a batch: inputs ``[B, 3, H, W]`` and masks ``[B, h, w]`` with the same number
    of masked patches in each; per image its reconstruction, ``[h, w, D]`` patch features and ``[h, w, K]``
    clustering logits (both on the CPU)."""
    p = next(model.parameters())
    x = x.to(p.device, p.dtype)
    b, (h, w) = x.shape[0], model.backbone.grid_size(x)
    n = h * w
    flat = torch.from_numpy(masks.reshape(b, n))
    if len(set(flat.sum(1).tolist())) != 1:
        raise InputError("every mask of a batch must hide the same number of patches")
    visible = torch.nonzero(~flat.flatten()).flatten().to(p.device)
    masked = torch.nonzero(flat.flatten()).flatten().to(p.device)
    feats = model.patch_features(x)
    logits = model.clustering_head(feats).float().cpu()
    ctx = model.backbone.encode(x, visible)
    probs = torch.softmax(model.prediction_logits(ctx, masked).float() / STUDENT_TEMPERATURE, dim=-1).cpu()
    out = []
    for i in range(b):
        teacher = logits[i].argmax(-1)
        m_idx = torch.nonzero(flat[i]).flatten()
        conf, pred = probs[i].max(-1)
        top5 = probs[i].topk(min(5, probs.shape[-1]), dim=-1).indices
        t = teacher[m_idx]
        hit1, hit5 = pred == t, (top5 == t[:, None]).any(-1)
        predicted = torch.full((n,), -1, dtype=torch.long).index_copy_(0, m_idx, pred)
        in5 = torch.zeros(n, dtype=torch.bool).index_copy_(0, m_idx, hit5)
        confidence = torch.zeros(n).index_copy_(0, m_idx, conf)
        rec = Reconstruction(
            masks[i],
            predicted.view(h, w).numpy(),
            teacher.view(h, w).numpy(),
            in5.view(h, w).numpy(),
            confidence.view(h, w).numpy(),
            float(hit1.float().mean()),
            float(hit5.float().mean()),
        )
        out.append((rec, feats[i].float().cpu().view(h, w, -1), logits[i].view(h, w, -1)))
    return out


# --------------------------------------------------------------------------------------- similarity
def patch_at(grid: tuple[int, int], size: tuple[int, int], x: float | int, y: float | int) -> tuple[int, int]:
    """``(row, col)`` of the patch under pixel ``(x, y)`` of a picture of ``size = (W, H)``."""
    h, w = grid
    W, H = size
    return min(h - 1, max(0, int(y * h / H))), min(w - 1, max(0, int(x * w / W)))


def similarity_maps(encoded: list[Encoded], image_index: int, row: int, col: int) -> list[np.ndarray]:
    """Cosine similarity of patch ``(row, col)`` of image ``image_index`` to every patch of every image."""
    if not 0 <= image_index < len(encoded):
        raise InputError(f"image index {image_index} is out of range: {len(encoded)} image(s) loaded (0-based)")
    h, w = encoded[image_index].grid
    if not (0 <= row < h and 0 <= col < w):
        raise InputError(f"patch ({row}, {col}) is outside the {h}x{w} patch grid of image {image_index}")
    q = F.normalize(encoded[image_index].features[row, col], dim=-1)
    return [(F.normalize(e.features, dim=-1) @ q).numpy() for e in encoded]


def entropy_bound(num_clusters: int) -> float:
    """Largest possible assignment entropy (nats): uniform over ``num_clusters``."""
    return math.log(num_clusters)
