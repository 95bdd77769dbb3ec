"""capi_lab app: see what a CAPI model sees in your images.

    python app/main.py                              # the embedded default model, http://127.0.0.1:7860
    python app/main.py --checkpoint runs/x/checkpoints/last.ckpt
    python app/main.py --weights capi_vitl14_lvd    # an authors' model (downloaded once, on your machine)
    python app/main.py --runs runs/                 # the Runs view lists the training runs under runs/

Four views of images, each also an API endpoint for ``gradio_client`` (``/pca``, ``/clusters``, ``/reconstruct``,
``/similarity``), each able to show a second model side by side (``compare_with``), and a Runs view (``/run``,
``/snapshot``) that follows a training run while it trains. Runs offline: no analytics, no web fonts, nothing
fetched from the internet.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import os
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without installing

from capi_lab import explore as ex  # noqa: E402
from capi_lab.config import MASK_STRATEGY_NAMES  # noqa: E402
from capi_lab.explore import render as rd  # noqa: E402
from capi_lab.explore import runs  # noqa: E402
from capi_lab.model.capi import CAPIModel, num_parameters  # noqa: E402
from capi_lab.pretrained import CheckpointError, load_pretrained  # noqa: E402

EXAMPLES = ex.example_photos()
DEFAULT_RESOLUTION = 128
MAX_RESOLUTION = 1024
# system fonts only: the default theme would fetch Google Fonts
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
)
STRATEGIES = list(MASK_STRATEGY_NAMES)
GALLERY = dict(format="png", object_fit="contain", height="auto", preview=False)  # lossless, uncropped


CACHE_BYTES = 512 * 2**20
"""What the encoded-image cache may hold: features and cluster logits of a 1024 px image take ~50 MB with the
default model and far more with 16384 prototypes, so the cache is capped in bytes, not entries."""
DELETE_CACHE = (300, 1800)
"""Gradio's ``delete_cache``: every 5 minutes, uploads and result pictures older than 30 minutes are deleted (and
all of them when the app starts)."""


def encoded_bytes(e: ex.Encoded) -> int:
    """Memory held by one cache entry: its tensors and its picture."""
    tensors = [t for t in (e.features, e.logits) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors) + e.shown.width * e.shown.height * 3


class Workbench:
    """The model and a cache of encoded images (least recently used first out, at most ``cache_bytes``),
    shared by every view and request."""

    def __init__(self, model: CAPIModel, source: str = "in-memory model", cache_bytes: int = CACHE_BYTES):
        self.model = model.eval()
        self.source = source
        self._cache: OrderedDict[tuple, ex.Encoded] = OrderedDict()
        self.cache_bytes = cache_bytes
        self.cached_bytes = 0
        self._lock = threading.Lock()

    @property
    def patch_size(self) -> int:
        return self.model.patch_size

    def load(self, files: Any) -> tuple[list[ex.LoadedImage], list[str]]:
        return ex.load_images(_paths(files))

    def encode(self, images: list[ex.LoadedImage], resolution: int) -> list[ex.Encoded]:
        out = []
        for li in images:
            key = (hashlib.sha1(li.image.tobytes()).hexdigest(), li.image.size, int(resolution))
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
            if hit is None:
                hit = ex.encode(self.model, li.image, int(resolution))
                self._remember(key, hit)
            out.append(hit)
        return out

    def _remember(self, key: tuple, e: ex.Encoded) -> None:
        size = encoded_bytes(e)
        if size > self.cache_bytes:
            return  # larger than the whole cache: not kept
        with self._lock:
            if key in self._cache:
                return
            self._cache[key] = e
            self.cached_bytes += size
            while self.cached_bytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self.cached_bytes -= encoded_bytes(old)

    def describe(self) -> str:
        """Markdown for the model panel: architecture, size, source, provenance."""
        c, m = self.model.config, self.model
        heads = [n for n, h in (("student head", m.head), ("clustering head", m.clustering_head)) if h is not None]
        lines = [
            f"**Source:** `{self.source}`",
            f"**Architecture:** encoder {c.depth} blocks × {c.embed_dim} ({c.num_heads} heads), patch {c.patch_size}, "
            f"{c.num_registers} registers, RoPE `{c.rope_layout}`; predictor {c.pred_depth} blocks × {c.dim_pred}; "
            f"{c.num_prototypes} prototypes; heads: {', '.join(heads) or 'none (backbone only)'}",
            f"**Parameters:** {num_parameters(m) / 1e6:.2f} M"
            + (f"; trained at {m.image_size} px" if m.image_size else ""),
        ]
        meta = m.meta or {}
        if meta:
            keep = ("command", "steps", "train_seconds", "hardware", "date")
            lines.append("**Training:** " + "; ".join(f"{k.replace('_', ' ')}: `{meta[k]}`" for k in keep if k in meta))
        if self.source == "default":
            lines.append(
                "Model card: `capi_lab/weights/MODEL_CARD.md` (a small demonstration model, CPU-trained on ~100 photos)"
            )
        return "\n\n".join(lines)


def _paths(files: Any) -> list[str]:
    """File paths from what a File component (or gradio_client) hands over."""
    if files is None:
        return []
    if isinstance(files, (str, os.PathLike, dict)):
        files = [files]
    out = []
    for f in files:
        if isinstance(f, dict):
            f = f.get("path") or f.get("name")
        out.append(str(getattr(f, "name", f)))
    return out


def _status(notes: list[str], extra: list[str] = ()) -> str:
    """The view's message: what it shows, then every file note (skipped ⚠️, converted or downscaled ℹ️)."""
    marks = [("ℹ️ " if ("converted" in n or "downscaled" in n) else "⚠️ skipped: ") + n for n in notes]
    return "\n\n".join([*extra, *marks])


def _guard(fn):
    """Turn our input errors into a message in the UI (never a stack trace)."""

    @functools.wraps(fn)  # keeps the signature: gradio injects gr.SelectData by annotation
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ex.InputError, CheckpointError) as e:
            raise gr.Error(str(e), print_exception=False) from None

    return wrapped


# ------------------------------------------------------------------------------------------- views
DISPLAY_SIDE = 384
"""Pictures are shown at least this large (longer side, px): maps blown up with sharp patch edges."""
DEFAULT_OPACITY = 0.7
"""Opacity of a map laid over its photo (0: the photo alone, 1: the map alone)."""


def _display(e: ex.Encoded) -> Image.Image:
    """The photo at display size (at least :data:`DISPLAY_SIDE` on its longer side)."""
    scale = max(1.0, DISPLAY_SIDE / max(e.shown.size))
    return e.shown.resize((round(e.shown.width * scale), round(e.shown.height * scale)), Image.Resampling.BICUBIC)


def _over(photo: Image.Image, grid_rgb: np.ndarray, opacity: float) -> Image.Image:
    return rd.blend(photo, rd.upscale(grid_rgb, photo.size), float(opacity))


def _pair(a: list[tuple[Image.Image, str]], b: list[tuple[Image.Image, str]] | None) -> list[tuple[Image.Image, str]]:
    """Side by side: A's and B's pictures alternate (a two-column gallery puts each pair on one row)."""
    if b is None:
        return a
    out = []
    for (pa, ca), (pb, cb) in zip(a, b, strict=True):
        out += [(pa, f"A · {ca}"), (pb, f"B · {cb}")]
    return out


def _who(wb: Workbench, other: Workbench | None) -> list[str]:
    if other is None:
        return []
    return [f"**Side by side:** A = `{wb.source}`, B = `{other.source}` (same images, same settings)"]


PCA_LEGEND = (
    "Colours: the first three principal components of the patch tokens as red, green and blue (each scaled "
    "between its 1st and 99th percentile). *Own PCA*: each image its own basis. *Joint PCA*: one basis for all "
    "images, so a colour means the same thing in every image."
)


def pca_view(
    wb: Workbench,
    files: Any,
    resolution: int,
    n_components: int = 4,
    opacity: float = 1.0,
    other: Workbench | None = None,
):
    """Per-image and joint PCA maps over the photos, the first components one by one, explained variance."""
    images, notes = wb.load(files)
    figs, maps_by, comps_by = [], [], []
    for m in [wb, other] if other is not None else [wb]:
        enc = m.encode(images, resolution)
        res = ex.pca_maps(enc, int(n_components))
        maps = []
        for li, e, own, joint in zip(images, enc, res.per_image, res.joint, strict=True):
            photo = _display(e)
            grid = f"{e.grid[0]}×{e.grid[1]} patches"
            maps += [(_over(photo, own, opacity), f"{li.name}: own PCA ({grid})"),
                     (_over(photo, joint, opacity), f"{li.name}: joint PCA ({grid})")]  # fmt: skip
        comps = []
        for li, e, c in zip(images, enc, res.components, strict=True):
            scale = float(np.abs(c).max())
            side = max(e.shown.size[0], 192), max(e.shown.size[1], 192)
            tiles = [rd.upscale(rd.diverging(ci, scale), side) for ci in c]  # a near-square grid, read row-wise
            comps.append((rd.mosaic(tiles, columns=math.ceil(math.sqrt(len(tiles))), pad=4),
                          f"{li.name}: components 1–{len(c)}, row by row (red +, blue −)"))  # fmt: skip
        maps_by.append(maps)
        comps_by.append(comps)
        figs.append(res.explained_variance)
    fig = go.Figure()
    for label, ev in zip(["A", "B"] if other is not None else [""], figs, strict=False):
        x = list(range(1, len(ev) + 1))
        fig.add_bar(x=x, y=ev, name=f"{label} component".strip())
        fig.add_scatter(x=x, y=np.cumsum(ev), name=f"{label} cumulative".strip(), mode="lines+markers")
    fig.update_layout(
        title="Explained variance of the joint PCA", xaxis_title="component", yaxis_title="fraction of variance",
        height=320, margin=dict(l=40, r=10, t=40, b=40), yaxis_range=[0, 1],
    )  # fmt: skip
    second = maps_by[1] if other is not None else None
    comps = _pair(comps_by[0], comps_by[1] if other is not None else None)
    info = [f"{len(images)} image(s) at {resolution} px (longer side)", *_who(wb, other), PCA_LEGEND]
    return _pair(maps_by[0], second), comps, fig, _status(notes, info)


def _cluster_items(wb: Workbench, images, resolution, balance: bool, opacity: float):
    enc = wb.encode(images, resolution)
    cl = ex.cluster_maps(enc, balance=bool(balance), centers=ex.prototypes(wb.model))
    colors = rd.similarity_palette(cl.centers)
    hmax = ex.entropy_bound(cl.num_clusters)
    maps, ents = [], []
    for li, e, a, h in zip(images, enc, cl.assignments, cl.entropy, strict=True):
        photo = _display(e)
        maps.append((_over(photo, colors[a], opacity), f"{li.name}: clusters ({len(np.unique(a))} used)"))
        ents.append((_over(photo, rd.colorize(h, "viridis", 0, hmax), opacity),
                     f"{li.name}: entropy, mean {h.mean():.2f} nats"))  # fmt: skip
    return enc, cl, colors, maps, ents


def clusters_view(
    wb: Workbench,
    files: Any,
    resolution: int,
    balance: bool = False,
    top: int = 12,
    opacity: float = DEFAULT_OPACITY,
    other: Workbench | None = None,
):
    """Each patch's cluster (colours follow prototype similarity), its assignment entropy, the most used
    clusters' patches, and a legend of the colours."""
    images, notes = wb.load(files)
    enc, cl, colors, maps, ents = _cluster_items(wb, images, resolution, balance, opacity)
    gallery = rd.cluster_gallery(enc, cl, top=int(top), colors=colors)
    hmax = ex.entropy_bound(cl.num_clusters)
    info = [
        f"**Clusters from:** {cl.method}",
        f"{len(cl.usage)} of {cl.num_clusters} clusters used by {sum(a.size for a in cl.assignments)} patches. "
        "Cluster colours follow prototype similarity (the first three principal components of the prototype "
        "vectors as RGB): similar prototypes, similar colours. "
        f"Entropy scale 0 (purple) – ln {cl.num_clusters} = {hmax:.2f} nats (yellow).",
    ]
    if other is not None:
        _, cl_b, _, maps_b, ents_b = _cluster_items(other, images, resolution, balance, opacity)
        maps, ents = _pair(maps, maps_b), _pair(ents, ents_b)
        info += [*_who(wb, other), f"B: {len(cl_b.usage)} of {cl_b.num_clusters} clusters used ({cl_b.method})"]
    legend = rd.stack([
        rd.swatches(colors, [c for c, _ in cl.usage[:32]]),
        rd.colorbar("viridis", 0, round(hmax, 2), "assignment entropy (nats)"),
    ])  # fmt: skip
    return maps, ents, gallery, legend, _status(notes, info)


def _reconstruct_items(wb: Workbench, image, resolution, strategy, ratio, roll, seed):
    rec, enc = ex.reconstruct(wb.model, image, int(resolution), strategy, float(ratio), bool(roll), int(seed))
    colors = rd.similarity_palette(ex.prototypes(wb.model))
    pics = rd.reconstruction_pictures(enc, rec, colors)
    size = _display(enc).size
    captions = {
        "mask": "mask (grey: hidden from the encoder)",
        "predicted": "predicted cluster at masked patches",
        "teacher": "teacher's cluster, full image",
        "agreement": "agreement: green top-1, yellow top-5, red miss",
        "confidence": f"predictor confidence (black 0 → white {rec.confidence.max():.2f})",
    }
    items = [(pics[k].resize(size, Image.Resampling.NEAREST), c) for k, c in captions.items()]
    return rec, items


def reconstruct_view(
    wb: Workbench,
    files: Any,
    image_index: int = 0,
    resolution: int = DEFAULT_RESOLUTION,
    strategy: str = "inverse_block",
    ratio: float = 0.65,
    roll: bool = True,
    seed: int = 0,
    other: Workbench | None = None,
):
    """Mask an image, predict every masked patch's cluster, compare with the teacher's."""
    images, notes = wb.load(files)
    i = int(image_index)
    if not 0 <= i < len(images):
        raise ex.InputError(f"image index {i} is out of range: {len(images)} usable image(s), numbered from 0")
    args = (images[i].image, resolution, strategy, ratio, roll, seed)
    rec, items = _reconstruct_items(wb, *args)
    k = wb.model.config.num_prototypes
    n_masked = int(rec.mask.sum())
    lines = [
        f"**{images[i].name}** — {n_masked} of {rec.mask.size} patches masked ({strategy}, ratio {ratio}, "
        f"roll {'on' if roll else 'off'}, seed {seed}).",
        f"**Top-1 agreement:** {rec.top1:.1%} · **top-5:** {rec.top5:.1%} · chance: {1 / k:.2%} / {5 / k:.2%} "
        f"({k} clusters) · **mean confidence:** {rec.confidence[rec.mask].mean():.3f}",
    ]
    if other is not None:
        rec_b, items_b = _reconstruct_items(other, *args)
        items = _pair(items, items_b)
        kb = other.model.config.num_prototypes
        lines += [*_who(wb, other), f"B: top-1 {rec_b.top1:.1%} · top-5 {rec_b.top5:.1%} ({kb} clusters)"]
    lines.append("Cluster colours follow prototype similarity (similar prototypes, similar colours).")
    legend = rd.colorbar("magma", 0, round(float(rec.confidence.max()), 2), "predictor confidence")
    return items, legend, _status(notes, lines)


def _similarity_items(wb: Workbench, images, resolution, i, r, c, opacity):
    enc = wb.encode(images, resolution)
    sims = ex.similarity_maps(enc, i, r, c)
    out = []
    for j, (li, e, s) in enumerate(zip(images, enc, sims, strict=True)):
        pic = _over(_display(e), rd.colorize(s, "inferno", -0.2, 1.0), opacity)
        if j == i:
            pic = rd.mark_patch(pic, e.grid, r, c)
        out.append((pic, f"{li.name}: max {s.max():.2f}" + (" (query image)" if j == i else "")))
    return enc, out


def similarity_view(
    wb: Workbench,
    files: Any,
    image_index: int = 0,
    row: int = 0,
    col: int = 0,
    resolution: int = DEFAULT_RESOLUTION,
    opacity: float = DEFAULT_OPACITY,
    other: Workbench | None = None,
):
    """Cosine similarity of one patch to every patch of every image."""
    images, notes = wb.load(files)
    i, r, c = int(image_index), int(row), int(col)
    enc, out = _similarity_items(wb, images, resolution, i, r, c, opacity)
    h, w = enc[i].grid
    info = [f"Query: patch (row {r}, col {c}) of {images[i].name} ({h}×{w} patches); colour scale −0.2 → 1 cosine"]
    if other is not None:
        try:
            _, out_b = _similarity_items(other, images, resolution, i, r, c, opacity)
        except ex.InputError as e:  # another patch size: another grid
            raise ex.InputError(f"model B: {e}") from None
        out = _pair(out, out_b)
        info += _who(wb, other)
    return out, rd.colorbar("inferno", -0.2, 1.0, "cosine similarity"), _status(notes, info)


def query_picture(wb: Workbench, files: Any, image_index: int = 0, resolution: int = DEFAULT_RESOLUTION):
    """The picture to click on in the similarity view."""
    images, _ = wb.load(files)
    i = min(max(int(image_index), 0), len(images) - 1)
    return wb.encode([images[i]], resolution)[0].shown


# ------------------------------------------------------------------------------------------ runs view
def run_choices(root: str | os.PathLike) -> list[str]:
    return [str(p) for p in runs.list_runs(root)]


def run_view(run_dir: str):
    """Status (with the health signals) and curves of a run folder as it is now."""
    if not run_dir:
        return "Pick a run folder (one written by `python -m capi_lab.train`).", runs.curves(runs.Run(Path(".")))
    run = runs.open_run(run_dir)
    return "\n\n".join(runs.health(run)), runs.curves(run)


def snapshot_view(run_dir: str, index: int = -1, kind: str = "teacher clusters", opacity: float = DEFAULT_OPACITY):
    """The run's snapshot number ``index`` (-1: the newest): one map kind over each probe photo."""
    if not run_dir:
        return [], "Pick a run folder."
    if kind not in runs.MAP_KINDS:
        raise ex.InputError(f"unknown map {kind!r}; choose one of {', '.join(runs.MAP_KINDS)}")
    run = runs.open_run(run_dir)
    if int(index) < 0:
        index = len(run.snapshots) + int(index)
    return runs.snapshot_views(run, int(index), runs.MAP_KINDS[kind], float(opacity), DISPLAY_SIDE)


# --------------------------------------------------------------------------------------------- UI
class Models:
    """The app's model and the others a request names (``model`` / ``compare_with``), loaded on first use and
    kept (the few most recent) with their encoding caches."""

    KEEP = 3

    def __init__(self, served: Workbench):
        self.served = served
        self._loaded: OrderedDict[tuple, Workbench] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, source: str | None) -> Workbench:
        source = (source or "").strip()
        if not source or source == self.served.source:
            return self.served
        path = Path(source)
        key = (source, path.stat().st_mtime if path.exists() else None)
        with self._lock:
            hit = self._loaded.get(key)
            if hit is not None:
                self._loaded.move_to_end(key)
                return hit
        model, _ = resolve_model(source if path.exists() else None, None if path.exists() else source)
        wb = Workbench(model, source, cache_bytes=CACHE_BYTES // 4)
        with self._lock:
            self._loaded[key] = wb
            while len(self._loaded) > self.KEEP:
                self._loaded.popitem(last=False)
        return wb

    def pair(self, model: str | None, compare_with: str | None) -> tuple[Workbench, Workbench | None]:
        a = self.get(model)
        b = self.get(compare_with) if (compare_with or "").strip() else None
        return a, b


def build_demo(model: CAPIModel | Workbench, source: str = "in-memory model", runs_dir: str = "runs") -> gr.Blocks:
    """The app's Blocks, on ``model`` (nothing is loaded or launched here); the Runs view starts at ``runs_dir``."""
    wb = model if isinstance(model, Workbench) else Workbench(model, source)
    models = Models(wb)
    p = wb.patch_size
    with gr.Blocks(title="capi_lab — what CAPI sees", analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(
            "# capi_lab — what a CAPI model sees\n"
            "Upload images (or use the examples), then open a view. Colours in the joint PCA and the cluster "
            f"maps mean the same thing in every image. At most {ex.MAX_IMAGES} images, {ex.MAX_FILE_MB} MB each; "
            f"larger than {ex.MAX_INPUT_SIDE} px is downscaled. The **Runs** tab watches a training run."
        )
        with gr.Accordion("Model", open=False):
            model_info = gr.Markdown(wb.describe())
        with gr.Row():
            files = gr.File(label="Images", file_count="multiple", type="filepath", height=140, scale=3)
            with gr.Column(scale=2):
                resolution = gr.Slider(
                    2 * p, max(MAX_RESOLUTION // p * p, 2 * p), value=max(2 * p, DEFAULT_RESOLUTION // p * p), step=p,
                    label=f"Resolution (longer side, px; multiples of the patch size {p})",
                )  # fmt: skip
                opacity = gr.Slider(0, 1, value=DEFAULT_OPACITY, step=0.05, label="Map over photo (0 photo, 1 map)")
                examples_btn = gr.Button(f"Use the {len(EXAMPLES)} example photos", size="sm")
        with gr.Row():
            model_src = gr.Textbox(
                "", label="Model A (empty: the app's model; or a checkpoint path, 'default', an authors' name)",
                elem_id="model-a", scale=1,
            )  # fmt: skip
            compare_src = gr.Textbox(
                "", label="Compare with model B (empty: no comparison)", elem_id="model-b", scale=1
            )
        examples_btn.click(lambda: [str(e) for e in EXAMPLES], outputs=files, api_name=False)

        def describe(model: str, compare_with: str) -> str:
            try:
                a, b = models.pair(model, compare_with)
            except CheckpointError as e:
                return f"⚠️ {e}"
            return a.describe() + (f"\n\n---\n\n**Model B**\n\n{b.describe()}" if b is not None else "")

        for box in (model_src, compare_src):
            box.submit(describe, [model_src, compare_src], model_info, api_name=False)

        with gr.Tab("PCA feature maps", elem_id="tab-pca"):
            with gr.Row():
                n_comp = gr.Slider(1, 8, value=4, step=1, label="components shown one by one")
                pca_btn = gr.Button("Show PCA", variant="primary")
            pca_status = gr.Markdown(elem_id="pca-status")
            pca_maps = gr.Gallery(label="own PCA · joint PCA", columns=2, elem_id="pca-maps", **GALLERY)
            pca_comps = gr.Gallery(label="joint components (diverging)", columns=2, **GALLERY)
            pca_plot = gr.Plot(label="explained variance")

        @_guard
        def pca(images: Any, resolution: int, components: int = 4, opacity: float = 1.0, model: str = "",
                compare_with: str = ""):  # fmt: skip
            a, b = models.pair(model, compare_with)
            maps, comps, fig, status = pca_view(a, images, resolution, components, opacity, b)
            return maps, comps, fig, status

        pca_btn.click(pca, [files, resolution, n_comp, opacity, model_src, compare_src],
                      [pca_maps, pca_comps, pca_plot, pca_status], api_name="pca")  # fmt: skip

        with gr.Tab("Clusters", elem_id="tab-clusters"):
            with gr.Row():
                balance = gr.Checkbox(False, label="Sinkhorn-balance over the uploaded set")
                top = gr.Slider(1, 32, value=12, step=1, label="most used clusters to show")
                cl_btn = gr.Button("Show clusters", variant="primary")
            cl_status = gr.Markdown(elem_id="cl-status")
            cl_maps = gr.Gallery(label="cluster maps", columns=2, elem_id="cl-maps", **GALLERY)
            cl_legend = gr.Image(label="legend: cluster colours (most used first) and the entropy scale",
                                 type="pil", format="png", interactive=False, elem_id="cl-legend")  # fmt: skip
            cl_ent = gr.Gallery(label="assignment entropy per patch", columns=2, **GALLERY)
            cl_gal = gr.Gallery(label="most used clusters: their most confident patches", columns=4, **GALLERY)

        @_guard
        def clusters(images: Any, resolution: int, balance: bool = False, top: int = 12,
                     opacity: float = DEFAULT_OPACITY, model: str = "", compare_with: str = ""):  # fmt: skip
            a, b = models.pair(model, compare_with)
            maps, ents, gallery, legend, status = clusters_view(a, images, resolution, balance, top, opacity, b)
            return maps, legend, ents, gallery, status

        cl_btn.click(clusters, [files, resolution, balance, top, opacity, model_src, compare_src],
                     [cl_maps, cl_legend, cl_ent, cl_gal, cl_status], api_name="clusters")  # fmt: skip

        with gr.Tab("Predictor reconstructions", elem_id="tab-reconstruct"):
            with gr.Row():
                rc_index = gr.Number(0, precision=0, minimum=0, label="image (0 = first uploaded)")
                strategy = gr.Dropdown(STRATEGIES, value="inverse_block", label="masking")
                ratio = gr.Slider(0.1, 0.9, value=0.65, step=0.05, label="mask ratio")
                roll = gr.Checkbox(True, label="roll")
                seed = gr.Number(0, precision=0, label="seed")
                rc_btn = gr.Button("Mask and predict", variant="primary")
            rc_status = gr.Markdown(elem_id="rc-status")
            rc_gal = gr.Gallery(label="reconstruction", columns=2, elem_id="rc-gallery", **GALLERY)
            rc_legend = gr.Image(label="legend", type="pil", format="png", interactive=False)

        @_guard
        def reconstruct(images: Any, image_index: int = 0, resolution: int = DEFAULT_RESOLUTION,
                        strategy: str = "inverse_block", ratio: float = 0.65, roll: bool = True, seed: int = 0,
                        model: str = "", compare_with: str = ""):  # fmt: skip
            a, b = models.pair(model, compare_with)
            items, legend, status = reconstruct_view(a, images, image_index, resolution, strategy, ratio, roll, seed, b)
            return items, legend, status

        rc_btn.click(reconstruct, [files, rc_index, resolution, strategy, ratio, roll, seed, model_src, compare_src],
                     [rc_gal, rc_legend, rc_status], api_name="reconstruct")  # fmt: skip

        with gr.Tab("Patch similarity", elem_id="tab-similarity"):
            with gr.Row():
                sim_index = gr.Number(0, precision=0, minimum=0, label="query image (0 = first)")
                sim_row = gr.Number(0, precision=0, minimum=0, label="patch row")
                sim_col = gr.Number(0, precision=0, minimum=0, label="patch column")
                sim_btn = gr.Button("Compare", variant="primary")
            with gr.Row():
                query = gr.Image(
                    label="click a patch", type="pil", interactive=False, format="png", scale=1, elem_id="sim-query"
                )
                with gr.Column(scale=2):
                    sim_status = gr.Markdown(elem_id="sim-status")
                    sim_legend = gr.Image(label="legend", type="pil", format="png", interactive=False, height=60)
            sim_gal = gr.Gallery(label="cosine similarity", columns=2, elem_id="sim-gallery", **GALLERY)

        @_guard
        def similarity(images: Any, image_index: int = 0, row: int = 0, col: int = 0,
                       resolution: int = DEFAULT_RESOLUTION, opacity: float = DEFAULT_OPACITY, model: str = "",
                       compare_with: str = ""):  # fmt: skip
            a, b = models.pair(model, compare_with)
            items, legend, status = similarity_view(a, images, image_index, row, col, resolution, opacity, b)
            return items, legend, status

        sim_inputs = [files, sim_index, sim_row, sim_col, resolution, opacity, model_src, compare_src]
        sim_btn.click(similarity, sim_inputs, [sim_gal, sim_legend, sim_status], api_name="similarity")

        def show_query(f, i, r, m):  # follows uploads quietly: the views report bad files
            try:
                return query_picture(models.get(m), f, i, r) if f else None
            except (ex.InputError, CheckpointError):
                return None

        for trigger in (files.change, sim_index.change, resolution.release):
            trigger(show_query, [files, sim_index, resolution, model_src], query, api_name=False)

        def on_click(f, i, res, o, m, c, evt: gr.SelectData):
            a = models.get(m)
            e = query_picture(a, f, i, res)  # the picture clicked on, at the model's input size
            r, c_ = ex.patch_at((e.height // a.patch_size, e.width // a.patch_size), e.size, *evt.index)
            return r, c_, *similarity(f, i, r, c_, res, o, m, c)

        query.select(_guard(on_click), [files, sim_index, resolution, opacity, model_src, compare_src],
                     [sim_row, sim_col, sim_gal, sim_legend, sim_status], api_name=False)  # fmt: skip

        with gr.Tab("Runs", elem_id="tab-runs"):
            gr.Markdown(
                "Watch a training run: its curves with the health signals, and what the teacher sees in the "
                "probe images at each snapshot (`--snapshot-every`). Re-read every 5 s while *live* is on."
            )
            with gr.Row():
                runs_root = gr.Textbox(str(runs_dir), label="runs folder", scale=2)
                first = run_choices(runs_dir)
                run_pick = gr.Dropdown(first, value=first[0] if first else None, label="run", allow_custom_value=True,
                                       scale=3, elem_id="run-pick")  # fmt: skip
                run_refresh = gr.Button("Refresh", size="sm", scale=0)
                live = gr.Checkbox(True, label="live", scale=0)
            run_status = gr.Markdown(elem_id="run-status")
            run_plot = gr.Plot(label="curves", elem_id="run-plot")
            with gr.Row():
                snap_index = gr.Slider(0, 1, value=0, step=1, label="snapshot", elem_id="snap-slider", scale=3)
                snap_kind = gr.Radio(list(runs.MAP_KINDS), value="teacher clusters", label="map", scale=2)
                snap_opacity = gr.Slider(0, 1, value=DEFAULT_OPACITY, step=0.05, label="map over photo", scale=1)
            snap_status = gr.Markdown(elem_id="snap-status")
            snap_gal = gr.Gallery(label="the teacher's view of the probe images", columns=2, elem_id="snap-gallery",
                                  **GALLERY)  # fmt: skip
            with gr.Row():
                ckpt_pick = gr.Dropdown([], label="checkpoint of this run", allow_custom_value=True, scale=3)
                use_a = gr.Button("Use as model A in the other views", size="sm")
                use_b = gr.Button("Compare with it (model B)", size="sm")
            timer = gr.Timer(5.0, active=True)

        def refresh_run(run_dir, index, kind, opac, follow: bool):
            status, fig = run_view(run_dir)
            run = runs.open_run(run_dir) if run_dir else runs.Run(Path("."))
            n = len(run.snapshots)
            index = n - 1 if follow or index >= n else int(index)
            items, text = snapshot_view(run_dir, index, kind, opac) if run_dir else ([], "")
            ckpts = [str(c) for c in run.checkpoints]
            return (status, fig, gr.Slider(0, max(n - 1, 1), value=max(index, 0), step=1,
                                           label=f"snapshot ({n} so far; 0 = step 0)"),
                    items, text, gr.Dropdown(ckpts, value=ckpts[0] if ckpts else None))  # fmt: skip

        run_outputs = [run_status, run_plot, snap_index, snap_gal, snap_status, ckpt_pick]

        @_guard
        def run(run_dir: str, snapshot_index: int = -1, map: str = "teacher clusters",  # noqa: A002 - API name
                opacity: float = DEFAULT_OPACITY):  # fmt: skip
            return refresh_run(run_dir, snapshot_index, map, opacity, int(snapshot_index) < 0)

        run_pick.change(lambda d, k, o: run(d, -1, k, o), [run_pick, snap_kind, snap_opacity], run_outputs,
                        api_name=False)  # fmt: skip
        run_refresh.click(lambda r: gr.Dropdown(run_choices(r)), runs_root, run_pick, api_name=False)
        runs_root.submit(lambda r: gr.Dropdown(run_choices(r)), runs_root, run_pick, api_name=False)
        hidden_run, newest = gr.Button(visible=False), gr.Number(-1, precision=0, visible=False)
        hidden_run.click(run, [run_pick, newest, snap_kind, snap_opacity], run_outputs, api_name="run")

        def tick(d, i, k, o, on):
            if not on or not d:
                return [gr.skip()] * len(run_outputs)
            n_before = len(runs.read_index(d))
            return refresh_run(d, i, k, o, int(i) >= n_before - 1)  # at the newest: follow new snapshots

        timer.tick(tick, [run_pick, snap_index, snap_kind, snap_opacity, live], run_outputs, api_name=False,
                   show_progress="hidden")  # fmt: skip
        demo.load(lambda d, k, o: run(d, -1, k, o) if d else [gr.skip()] * len(run_outputs),
                  [run_pick, snap_kind, snap_opacity], run_outputs, api_name=False)  # fmt: skip

        @_guard
        def snapshot(run_dir: str, index: int = -1, map: str = "teacher clusters",  # noqa: A002 - API name
                     opacity: float = DEFAULT_OPACITY):  # fmt: skip
            return snapshot_view(run_dir, index, map, opacity)

        snap_index.release(snapshot, [run_pick, snap_index, snap_kind, snap_opacity], [snap_gal, snap_status],
                           api_name="snapshot")  # fmt: skip
        for trigger in (snap_kind.change, snap_opacity.release):
            trigger(snapshot, [run_pick, snap_index, snap_kind, snap_opacity], [snap_gal, snap_status],
                    api_name=False)  # fmt: skip
        use_a.click(lambda c: c, ckpt_pick, model_src, api_name=False).then(
            describe, [model_src, compare_src], model_info, api_name=False
        )
        use_b.click(lambda c: c, ckpt_pick, compare_src, api_name=False).then(
            describe, [model_src, compare_src], model_info, api_name=False
        )
    return demo


def launch_kwargs(host: str = "127.0.0.1", port: int | None = 7860) -> dict[str, Any]:
    """What every launch of the app passes (tests use it too)."""
    return dict(
        server_name=host,
        server_port=port,
        max_file_size=f"{ex.MAX_FILE_MB}mb",
        allowed_paths=[str(ex.EXAMPLES_DIR)],
        theme=THEME,
        footer_links=["api"],
        show_error=True,  # a malformed API call gets the validation message (e.g. "Expected a `float` ...")
    )


def resolve_model(checkpoint: str | None, weights: str | None) -> tuple[CAPIModel, str]:
    """The model to serve and its name; a missing, malformed or unsafe file is a :class:`CheckpointError`."""
    source = checkpoint or weights or "default"
    if checkpoint is not None and not Path(checkpoint).exists():
        raise CheckpointError(
            f"checkpoint {checkpoint!r} does not exist; give a file written by `python -m capi_lab.train` "
            "(DIR/checkpoints/last.ckpt), an exported model, or an authors' .pth"
        )
    return load_pretrained(source), source


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="a capi_lab checkpoint/model file or an authors' .pth")
    src.add_argument("--weights", help="'default' (embedded) or a published name such as capi_vitl14_lvd")
    ap.add_argument("--runs", default="runs", help="folder of training runs for the Runs view (default: runs)")
    ap.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    ap.add_argument("--port", type=int, default=7860)
    args = ap.parse_args(argv)
    if not 1 <= args.port <= 65535:
        ap.error(f"--port must be in 1..65535, got {args.port}")
    try:
        model, source = resolve_model(args.checkpoint, args.weights)
    except CheckpointError as e:
        ap.error(str(e))
    if not Path(args.runs).is_dir():
        print(f"note: --runs {args.runs!r} is not a folder (yet); the Runs view lists nothing until it exists")
    demo = build_demo(model, source, args.runs)
    demo.queue(default_concurrency_limit=2).launch(**launch_kwargs(args.host, args.port))


if __name__ == "__main__":
    main()
