"""capi_lab app: see what a CAPI model sees in your images.

    python app/main.py                              # the embedded default model, http://127.0.0.1:7860
    python app/main.py --checkpoint runs/x/checkpoints/last.ckpt
    python app/main.py --weights capi_vitl14_lvd    # an authors' model (downloaded once, on your machine)

Four views, each also an API endpoint for ``gradio_client``: ``/pca``, ``/clusters``, ``/reconstruct``,
``/similarity``. Runs offline: no analytics, no web fonts, nothing fetched from the internet.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without installing

from capi_lab import explore as ex  # noqa: E402
from capi_lab.config import MASK_STRATEGY_NAMES  # noqa: E402
from capi_lab.explore import render as rd  # noqa: E402
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
def pca_view(wb: Workbench, files: Any, resolution: int, n_components: int = 4):
    """Per-image and joint PCA maps, the first components one by one, explained variance."""
    images, notes = wb.load(files)
    enc = wb.encode(images, resolution)
    res = ex.pca_maps(enc, int(n_components))
    maps = [
        (
            rd.row([e.shown, rd.upscale(p, e.shown.size), rd.upscale(j, e.shown.size)]),
            f"{li.name}: image · own PCA · joint PCA ({e.grid[0]}×{e.grid[1]} patches)",
        )
        for li, e, p, j in zip(images, enc, res.per_image, res.joint, strict=True)
    ]
    comps = []
    for li, e, c in zip(images, enc, res.components, strict=True):
        scale = float(np.abs(c).max())
        pics = [rd.upscale(rd.diverging(ci, scale), e.shown.size) for ci in c]
        comps.append((rd.row(pics), f"{li.name}: components 1–{len(c)} (red +, blue −)"))
    ev = res.explained_variance
    fig = go.Figure()
    fig.add_bar(x=list(range(1, len(ev) + 1)), y=ev, name="component")
    fig.add_scatter(x=list(range(1, len(ev) + 1)), y=np.cumsum(ev), name="cumulative", mode="lines+markers")
    fig.update_layout(
        title="Explained variance of the joint PCA", xaxis_title="component", yaxis_title="fraction of variance",
        height=320, margin=dict(l=40, r=10, t=40, b=40), yaxis_range=[0, 1],
    )  # fmt: skip
    return maps, comps, fig, _status(notes, [f"{len(enc)} image(s) at {resolution} px (longer side)"])


def clusters_view(wb: Workbench, files: Any, resolution: int, balance: bool = False, top: int = 12):
    """Each patch's cluster, its assignment entropy, and the most used clusters' patches."""
    images, notes = wb.load(files)
    enc = wb.encode(images, resolution)
    cl = ex.cluster_maps(enc, balance=bool(balance))
    colors = rd.palette(cl.usage, cl.num_clusters)
    hmax = ex.entropy_bound(cl.num_clusters)
    maps = [
        (rd.row([e.shown, rd.cluster_map(e, a, colors)]), f"{li.name}: clusters")
        for li, e, a in zip(images, enc, cl.assignments, strict=True)
    ]
    ents = [
        (rd.blend(e.shown, rd.colorize(h, "viridis", 0, hmax), 0.85), f"{li.name}: entropy, mean {h.mean():.2f} nats")
        for li, e, h in zip(images, enc, cl.entropy, strict=True)
    ]
    gallery = rd.cluster_gallery(enc, cl, top=int(top))
    used = len(cl.usage)
    info = [
        f"**Clusters from:** {cl.method}",
        f"{used} of {cl.num_clusters} clusters used by {sum(a.size for a in cl.assignments)} patches; "
        f"entropy scale 0 (purple) – ln {cl.num_clusters} = {hmax:.2f} nats (yellow)",
    ]
    return maps, ents, gallery, _status(notes, info)


def reconstruct_view(
    wb: Workbench,
    files: Any,
    image_index: int = 0,
    resolution: int = DEFAULT_RESOLUTION,
    strategy: str = "inverse_block",
    ratio: float = 0.65,
    roll: bool = True,
    seed: int = 0,
):
    """Mask an image, predict every masked patch's cluster, compare with the teacher's."""
    images, notes = wb.load(files)
    i = int(image_index)
    if not 0 <= i < len(images):
        raise ex.InputError(f"image index {i} is out of range: {len(images)} usable image(s), numbered from 0")
    rec, enc = ex.reconstruct(wb.model, images[i].image, int(resolution), strategy, float(ratio), bool(roll), int(seed))
    ids, counts = np.unique(np.concatenate([rec.teacher.ravel(), rec.predicted[rec.mask]]), return_counts=True)
    usage = sorted(zip(ids.tolist(), counts.tolist(), strict=True), key=lambda t: -t[1])
    pics = rd.reconstruction_pictures(enc, rec, rd.palette(usage, wb.model.config.num_prototypes))
    captions = {
        "mask": "mask (grey: hidden from the encoder)",
        "predicted": "predicted cluster at masked patches",
        "teacher": "teacher's cluster, full image",
        "agreement": "agreement: green top-1, yellow top-5, red miss",
        "confidence": f"predictor confidence (black 0 → white {rec.confidence.max():.2f})",
    }
    n_masked = int(rec.mask.sum())
    k = wb.model.config.num_prototypes
    summary = (
        f"**{images[i].name}** — {n_masked} of {rec.mask.size} patches masked ({strategy}, ratio {ratio}, "
        f"roll {'on' if roll else 'off'}, seed {seed}).\n\n"
        f"**Top-1 agreement:** {rec.top1:.1%} · **top-5:** {rec.top5:.1%} · chance: {1 / k:.2%} / {5 / k:.2%} "
        f"({k} clusters) · **mean confidence:** {rec.confidence[rec.mask].mean():.3f}"
    )
    return [(pics[k_], captions[k_]) for k_ in captions], _status(notes, [summary])


def similarity_view(
    wb: Workbench, files: Any, image_index: int = 0, row: int = 0, col: int = 0, resolution: int = DEFAULT_RESOLUTION
):
    """Cosine similarity of one patch to every patch of every image."""
    images, notes = wb.load(files)
    enc = wb.encode(images, resolution)
    i, r, c = int(image_index), int(row), int(col)
    sims = ex.similarity_maps(enc, i, r, c)
    out = []
    for j, (li, e, s) in enumerate(zip(images, enc, sims, strict=True)):
        pic = rd.blend(e.shown, rd.colorize(s, "inferno", -0.2, 1.0), 0.75)
        if j == i:
            pic = rd.mark_patch(pic, e.grid, r, c)
        out.append((pic, f"{li.name}: max {s.max():.2f}" + (" (query image)" if j == i else "")))
    h, w = enc[i].grid
    info = [f"Query: patch (row {r}, col {c}) of {images[i].name} ({h}×{w} patches); colour scale −0.2 → 1 cosine"]
    return out, _status(notes, info)


def query_picture(wb: Workbench, files: Any, image_index: int = 0, resolution: int = DEFAULT_RESOLUTION):
    """The picture to click on in the similarity view."""
    images, _ = wb.load(files)
    i = min(max(int(image_index), 0), len(images) - 1)
    return wb.encode([images[i]], resolution)[0].shown


# --------------------------------------------------------------------------------------------- UI
def build_demo(model: CAPIModel | Workbench, source: str = "in-memory model") -> gr.Blocks:
    """The app's Blocks, on ``model`` (nothing is loaded or launched here)."""
    wb = model if isinstance(model, Workbench) else Workbench(model, source)
    p = wb.patch_size
    with gr.Blocks(title="capi_lab — what CAPI sees", analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(
            "# capi_lab — what a CAPI model sees\n"
            "Upload images (or use the examples), then open a view. Colours in the joint PCA and the cluster "
            f"maps mean the same thing in every image. At most {ex.MAX_IMAGES} images, {ex.MAX_FILE_MB} MB each; "
            f"larger than {ex.MAX_INPUT_SIDE} px is downscaled."
        )
        with gr.Accordion("Model", open=False):
            gr.Markdown(wb.describe())
        with gr.Row():
            files = gr.File(label="Images", file_count="multiple", type="filepath", height=140, scale=3)
            with gr.Column(scale=2):
                resolution = gr.Slider(
                    2 * p, max(MAX_RESOLUTION // p * p, 2 * p), value=max(2 * p, DEFAULT_RESOLUTION // p * p), step=p,
                    label=f"Resolution (longer side, px; multiples of the patch size {p})",
                )  # fmt: skip
                examples_btn = gr.Button(f"Use the {len(EXAMPLES)} example photos", size="sm")
        examples_btn.click(lambda: [str(e) for e in EXAMPLES], outputs=files, api_name=False)

        with gr.Tab("PCA feature maps", elem_id="tab-pca"):
            with gr.Row():
                n_comp = gr.Slider(1, 8, value=4, step=1, label="components shown one by one")
                pca_btn = gr.Button("Show PCA", variant="primary")
            pca_status = gr.Markdown(elem_id="pca-status")
            pca_maps = gr.Gallery(label="image · own PCA · joint PCA", columns=2, elem_id="pca-maps", **GALLERY)
            pca_comps = gr.Gallery(label="joint components (diverging)", columns=2, **GALLERY)
            pca_plot = gr.Plot(label="explained variance")
        pca_btn.click(
            _guard(lambda f, r, n: pca_view(wb, f, r, n)), [files, resolution, n_comp],
            [pca_maps, pca_comps, pca_plot, pca_status], api_name="pca",
        )  # fmt: skip

        with gr.Tab("Clusters", elem_id="tab-clusters"):
            with gr.Row():
                balance = gr.Checkbox(False, label="Sinkhorn-balance over the uploaded set")
                top = gr.Slider(1, 32, value=12, step=1, label="most used clusters to show")
                cl_btn = gr.Button("Show clusters", variant="primary")
            cl_status = gr.Markdown(elem_id="cl-status")
            cl_maps = gr.Gallery(label="cluster maps", columns=3, elem_id="cl-maps", **GALLERY)
            cl_ent = gr.Gallery(label="assignment entropy per patch", columns=4, **GALLERY)
            cl_gal = gr.Gallery(label="most used clusters: their most confident patches", columns=4, **GALLERY)
        cl_btn.click(
            _guard(lambda f, r, b, t: clusters_view(wb, f, r, b, t)), [files, resolution, balance, top],
            [cl_maps, cl_ent, cl_gal, cl_status], api_name="clusters",
        )  # fmt: skip

        with gr.Tab("Predictor reconstructions", elem_id="tab-reconstruct"):
            with gr.Row():
                rc_index = gr.Number(0, precision=0, minimum=0, label="image (0 = first uploaded)")
                strategy = gr.Dropdown(STRATEGIES, value="inverse_block", label="masking")
                ratio = gr.Slider(0.1, 0.9, value=0.65, step=0.05, label="mask ratio")
                roll = gr.Checkbox(True, label="roll")
                seed = gr.Number(0, precision=0, label="seed")
                rc_btn = gr.Button("Mask and predict", variant="primary")
            rc_status = gr.Markdown(elem_id="rc-status")
            rc_gal = gr.Gallery(label="reconstruction", columns=5, elem_id="rc-gallery", **GALLERY)
        rc_btn.click(
            _guard(lambda f, i, r, s, q, o, d: reconstruct_view(wb, f, i, r, s, q, o, d)),
            [files, rc_index, resolution, strategy, ratio, roll, seed], [rc_gal, rc_status], api_name="reconstruct",
        )  # fmt: skip

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
                    sim_gal = gr.Gallery(label="cosine similarity", columns=3, elem_id="sim-gallery", **GALLERY)
        sim_fn = _guard(lambda f, i, r, c, res: similarity_view(wb, f, i, r, c, res))
        sim_btn.click(
            sim_fn, [files, sim_index, sim_row, sim_col, resolution], [sim_gal, sim_status], api_name="similarity"
        )

        def show_query(f, i, r):  # follows uploads quietly: the views report bad files
            try:
                return query_picture(wb, f, i, r) if f else None
            except ex.InputError:
                return None

        for trigger in (files.change, sim_index.change, resolution.release):
            trigger(show_query, [files, sim_index, resolution], query, api_name=False)

        def on_click(f, i, res, evt: gr.SelectData):
            e = query_picture(wb, f, i, res)  # the picture clicked on, at the model's input size
            r, c = ex.patch_at((e.height // p, e.width // p), e.size, *evt.index)
            return r, c, *similarity_view(wb, f, i, r, c, res)

        query.select(_guard(on_click), [files, sim_index, resolution], [sim_row, sim_col, sim_gal, sim_status],
                     api_name=False)  # fmt: skip
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
    ap.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    ap.add_argument("--port", type=int, default=7860)
    args = ap.parse_args(argv)
    if not 1 <= args.port <= 65535:
        ap.error(f"--port must be in 1..65535, got {args.port}")
    try:
        model, source = resolve_model(args.checkpoint, args.weights)
    except CheckpointError as e:
        ap.error(str(e))
    demo = build_demo(model, source)
    demo.queue(default_concurrency_limit=2).launch(**launch_kwargs(args.host, args.port))


if __name__ == "__main__":
    main()
