"""Pictures of what ``capi_lab.explore`` computes: patch grids upscaled over the image, cluster colours,
colormaps, mosaics. Everything returns 8-bit RGB PIL images (save them as PNG: lossless)."""

from __future__ import annotations

import colorsys

import numpy as np
from matplotlib import colormaps
from PIL import Image

from capi_lab.explore import ClusterResult, Encoded, Reconstruction

# 20 distinct colours for the most used clusters (matplotlib's tab20, reordered: saturated first)
_TAB20 = (np.array(colormaps["tab20"].colors)[list(range(0, 20, 2)) + list(range(1, 20, 2))] * 255).astype(np.uint8)


def to_pil(a: np.ndarray) -> Image.Image:
    """``[h, w, 3]`` float in [0, 1] or uint8 as an RGB image."""
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(a, "RGB")


def upscale(a: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A patch-grid picture ``[h, w, 3]`` blown up to ``size = (W, H)`` with sharp patch edges."""
    return to_pil(a).resize(size, Image.Resampling.NEAREST)


def colorize(
    values: np.ndarray, cmap: str = "viridis", vmin: float | int | None = None, vmax: float | int | None = None
) -> np.ndarray:
    """``[h, w]`` values through a matplotlib colormap, as uint8 ``[h, w, 3]``."""
    vmin = float(np.nanmin(values)) if vmin is None else vmin
    vmax = float(np.nanmax(values)) if vmax is None else vmax
    t = (values - vmin) / max(vmax - vmin, 1e-12)
    return (colormaps[cmap](np.clip(t, 0, 1))[..., :3] * 255 + 0.5).astype(np.uint8)


def diverging(values: np.ndarray, scale: float | int | None = None) -> np.ndarray:
    """Signed values on a symmetric red-white-blue scale (``scale`` = the value shown fully saturated)."""
    s = float(np.nanmax(np.abs(values))) if scale is None else scale
    return colorize(values, "RdBu_r", -s, s)


def cluster_color(cluster: int, rank: int | None) -> np.ndarray:
    """Colour of a cluster: one of 20 distinct colours by usage rank, else a hue from its index."""
    if rank is not None and rank < len(_TAB20):
        return _TAB20[rank]
    h = (cluster * 0.618033988749895) % 1.0
    return (np.array(colorsys.hsv_to_rgb(h, 0.45, 0.85)) * 255).astype(np.uint8)


def palette(usage: list[tuple[int, int]], num_clusters: int) -> np.ndarray:
    """``[num_clusters, 3]`` uint8 colours, the most used clusters getting the most distinct ones."""
    rank = {c: r for r, (c, _) in enumerate(usage)}
    return np.stack([cluster_color(c, rank.get(c)) for c in range(num_clusters)])


def similarity_palette(vectors, quantile: float = 0.02) -> np.ndarray:
    """``[K, 3]`` uint8 colours for ``K`` cluster centres ``[K, D]`` (prototypes, centroids): the first three
    principal components of the l2-normalised vectors as RGB (each scaled between its ``quantile`` and
    ``1 - quantile`` values, sign-fixed), so similar prototypes get similar colours and the colours of a model
    do not depend on which images are shown."""
    import torch

    from capi_lab.explore.pca import pca_basis

    v = torch.nn.functional.normalize(torch.as_tensor(vectors).float(), dim=-1)
    k = v.shape[0]
    if k < 2:
        return np.full((k, 3), 128, np.uint8)
    mean, comps, _ = pca_basis(v, min(3, *v.shape))
    proj = (v - mean) @ comps.T
    if proj.shape[1] < 3:
        proj = torch.cat([proj, proj.new_zeros(k, 3 - proj.shape[1])], 1)
    lo, hi = proj.quantile(quantile, dim=0), proj.quantile(1 - quantile, dim=0)
    t = ((proj - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    return (40 + 200 * t.numpy() + 0.5).astype(np.uint8)  # no pure black or white: they read as "no data"


def blend(picture: Image.Image, overlay: np.ndarray | Image.Image, alpha: float | int = 0.6) -> Image.Image:
    """``overlay`` (a patch grid, upscaled) over ``picture`` with opacity ``alpha``."""
    over = overlay if isinstance(overlay, Image.Image) else upscale(overlay, picture.size)
    return Image.blend(picture, over.resize(picture.size, Image.Resampling.NEAREST), alpha)


def row(pictures: list[Image.Image], pad: int = 4, background: int = 255) -> Image.Image:
    """Pictures side by side (top-aligned) with ``pad`` px between them."""
    W = sum(p.width for p in pictures) + pad * (len(pictures) - 1)
    H = max(p.height for p in pictures)
    out = Image.new("RGB", (W, H), (background,) * 3)
    x = 0
    for p in pictures:
        out.paste(p, (x, 0))
        x += p.width + pad
    return out


def stack(pictures: list[Image.Image], pad: int = 4, background: int = 255) -> Image.Image:
    """Pictures one above the other (left-aligned) with ``pad`` px between them."""
    W = max(p.width for p in pictures)
    H = sum(p.height for p in pictures) + pad * (len(pictures) - 1)
    out = Image.new("RGB", (W, H), (background,) * 3)
    y = 0
    for p in pictures:
        out.paste(p, (0, y))
        y += p.height + pad
    return out


def header(labels: list[str], width: int, pad: int = 4, height: int = 14) -> Image.Image:
    """A strip of column titles for a :func:`row` of ``len(labels)`` tiles ``width`` px wide."""
    from PIL import ImageDraw

    out = Image.new("RGB", (len(labels) * (width + pad) - pad, height), (255, 255, 255))
    d = ImageDraw.Draw(out)
    for i, text in enumerate(labels):
        d.text((i * (width + pad) + 1, 1), text, fill=(0, 0, 0))
    return out


def colorbar(
    cmap: str, vmin: float | int, vmax: float | int, label: str, width: int = 384, height: int = 14
) -> Image.Image:
    """A legend for a colour scale: the colormap as a strip from ``vmin`` to ``vmax`` with its label."""
    from PIL import ImageDraw

    strip = colorize(np.tile(np.linspace(0, 1, width), (height, 1)), cmap, 0, 1)
    out = Image.new("RGB", (width, height + 16), (255, 255, 255))
    out.paste(Image.fromarray(strip, "RGB"), (0, 0))
    d = ImageDraw.Draw(out)
    d.text((0, height + 2), f"{vmin:g}", fill=(0, 0, 0))
    right = f"{vmax:g}"
    d.text((width - 6 * len(right) - 1, height + 2), right, fill=(0, 0, 0))
    d.text((width // 2 - 3 * len(label), height + 2), label, fill=(0, 0, 0))
    return out


def swatches(colors: np.ndarray, clusters: list[int], per_row: int = 16, size: int = 24) -> Image.Image:
    """A legend of cluster colours: a square per cluster with its index under it."""
    from PIL import ImageDraw

    rows = max(1, -(-len(clusters) // per_row))
    out = Image.new("RGB", (per_row * (size + 4), rows * (size + 16)), (255, 255, 255))
    d = ImageDraw.Draw(out)
    for i, c in enumerate(clusters):
        x, y = (i % per_row) * (size + 4), (i // per_row) * (size + 16)
        d.rectangle((x, y, x + size - 1, y + size - 1), fill=tuple(int(v) for v in colors[c]))
        d.text((x, y + size + 1), str(c), fill=(0, 0, 0))
    return out


def mosaic(tiles: list[Image.Image], columns: int, pad: int = 2, background: int = 255) -> Image.Image:
    """Equal-sized tiles in a grid."""
    if not tiles:
        return Image.new("RGB", (1, 1), (background,) * 3)
    w, h = tiles[0].size
    rows = -(-len(tiles) // columns)
    out = Image.new("RGB", (columns * (w + pad) - pad, rows * (h + pad) - pad), (background,) * 3)
    for i, t in enumerate(tiles):
        out.paste(t, ((i % columns) * (w + pad), (i // columns) * (h + pad)))
    return out


def mark_patch(picture: Image.Image, grid: tuple[int, int], row: int, col: int, color=(0, 255, 255)) -> Image.Image:
    """``picture`` with patch ``(row, col)`` outlined."""
    from PIL import ImageDraw

    out = picture.copy()
    ph, pw = picture.height / grid[0], picture.width / grid[1]
    box = (int(col * pw), int(row * ph), int((col + 1) * pw) - 1, int((row + 1) * ph) - 1)
    ImageDraw.Draw(out).rectangle(box, outline=color, width=2)
    return out


def cluster_map(enc: Encoded, assign: np.ndarray, colors: np.ndarray, alpha: float | int = 0.65) -> Image.Image:
    """Each patch coloured by its cluster, over the picture."""
    return blend(enc.shown, colors[assign], alpha)


def cluster_gallery(
    encoded: list[Encoded],
    clusters: ClusterResult,
    top: int = 12,
    per_cluster: int = 16,
    tile: int = 40,
    colors: np.ndarray | None = None,
) -> list[tuple[Image.Image, str]]:
    """For the ``top`` most used clusters: a mosaic of their most confident patches across all images
    (each patch cut from the picture, bordered in the cluster's colour), with a caption. ``colors``: the
    cluster colours (default: :func:`similarity_palette` of the clusters' centres)."""
    colors = similarity_palette(clusters.centers) if colors is None else colors
    out = []
    for cluster, count in clusters.usage[:top]:
        found = []
        for i, (a, c) in enumerate(zip(clusters.assignments, clusters.confidence, strict=True)):
            for r, q in zip(*np.nonzero(a == cluster), strict=True):
                found.append((float(c[r, q]), i, int(r), int(q)))
        found.sort(reverse=True)
        tiles = []
        for _, i, r, q in found[:per_cluster]:
            e = encoded[i]
            h, w = e.grid
            ph, pw = e.shown.height / h, e.shown.width / w
            crop = e.shown.crop((int(q * pw), int(r * ph), int((q + 1) * pw), int((r + 1) * ph)))
            t = Image.new("RGB", (tile, tile), tuple(int(v) for v in colors[cluster]))
            t.paste(crop.resize((tile - 6, tile - 6), Image.Resampling.BICUBIC), (3, 3))
            tiles.append(t)
        n_img = len({i for _, i, _, _ in found})
        out.append(
            (mosaic(tiles, columns=min(8, len(tiles))), f"cluster {cluster}: {count} patches in {n_img} image(s)")
        )
    return out


def mask_picture(enc: Encoded, mask: np.ndarray) -> Image.Image:
    """The picture with masked patches greyed out (what the encoder does not see)."""
    grey = np.where(mask[..., None], np.array([90, 90, 90], np.uint8), np.array([0, 0, 0], np.uint8))
    shade = upscale(grey, enc.shown.size)
    m = upscale(np.repeat(mask[..., None], 3, -1).astype(np.uint8) * 255, enc.shown.size).convert("L")
    return Image.composite(Image.blend(enc.shown, shade, 0.8), enc.shown, m)


def reconstruction_pictures(enc: Encoded, rec: Reconstruction, colors: np.ndarray) -> dict[str, Image.Image]:
    """``mask``, ``predicted`` (predicted clusters on masked patches, the visible picture elsewhere),
    ``teacher`` (the teacher's clusters everywhere), ``agreement`` (green: same top-1 cluster, yellow: in
    the top 5, red: miss) and ``confidence`` (the predictor's top probability on masked patches, black 0 to
    white = the largest)."""
    masked = rec.mask
    hidden = mask_picture(enc, masked)
    sel = upscale(np.repeat(masked[..., None], 3, -1).astype(np.uint8) * 255, enc.shown.size).convert("L")

    def on_masked(picture: Image.Image) -> Image.Image:
        return Image.composite(picture, hidden, sel)

    agree = np.zeros((*masked.shape, 3), np.uint8)
    agree[masked & (rec.predicted == rec.teacher)] = (40, 170, 60)
    agree[masked & (rec.predicted != rec.teacher) & rec.in_top5] = (235, 190, 40)
    agree[masked & ~rec.in_top5] = (210, 50, 40)
    return {
        "mask": hidden,
        "predicted": on_masked(upscale(colors[np.where(masked, rec.predicted, 0)], enc.shown.size)),
        "teacher": cluster_map(enc, rec.teacher, colors, alpha=1.0),
        "agreement": on_masked(blend(enc.shown, agree, 0.7)),
        "confidence": on_masked(
            upscale(colorize(rec.confidence, "magma", 0, float(rec.confidence.max())), enc.shown.size)
        ),
    }
