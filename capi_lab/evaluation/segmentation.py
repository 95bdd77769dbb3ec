"""k-NN patch-label segmentation on a generated set: photo cut-outs pasted on photo crops.

The cut-outs are Debian's tuxpaint-stamps-default photos (RGBA, so the alpha channel is an exact
object mask; class = the stamp's top-level folder: animals, food, plants, vehicles, ...), fetched by
``scripts/fetch_demo_data.py --only tuxpaint``. Each image is a random square crop of a demo photo
with one stamp pasted at a random scale (35-70 % of the side) and position; its label map is 0 for
background and ``1 + class`` where the stamp's alpha is at least 128. Stamps and background photos
are split 70/30 between the train and test images (``capi_lab.data.stamp_split``), so test objects are unseen
instances; the ``composite`` pretraining source uses only the train side.

Evaluation (as the paper's k-NN segmentation): every train patch gets the majority label of its
pixels; each test patch takes the temperature-weighted vote of its k most similar train patches;
patch predictions are upsampled to pixels and scored by mean IoU over the classes present, and, read as
object-vs-background (any class against label 0), by a two-class mean IoU that asks only whether objects are found.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from capi_lab.data import cache_dir, demo_photo_paths, stamp_split, to_input


@dataclass
class StampSegmentation:
    """A deterministic generated segmentation set (see the module docstring)."""

    stamps_root: Path
    backgrounds: list[Path]
    n_images: int = 200
    image_size: int = 64
    split: str = "train"
    seed: int = 0

    def __post_init__(self) -> None:
        self.classes, self.stamps, self.bg_paths = stamp_split(
            self.stamps_root, self.backgrounds, self.split, self.seed
        )
        self._cache: dict[Path, Image.Image] = {}

    @property
    def num_classes(self) -> int:
        """Classes including background (label 0)."""
        return len(self.classes) + 1

    def __len__(self) -> int:
        return self.n_images

    def _open(self, path: Path, mode: str) -> Image.Image:
        if path not in self._cache:
            with Image.open(path) as im:
                im = im.convert(mode)
                im.thumbnail((512, 512))
                self._cache[path] = im
        return self._cache[path]

    def __getitem__(self, i: int) -> tuple[Image.Image, np.ndarray]:
        rng = np.random.default_rng([self.seed, i, 0 if self.split == "train" else 1])
        s = self.image_size
        bg = self._open(self.bg_paths[rng.integers(len(self.bg_paths))], "RGB")
        side = int(min(bg.size) * rng.uniform(0.4, 1.0))
        x0, y0 = rng.integers(0, bg.width - side + 1), rng.integers(0, bg.height - side + 1)
        canvas = bg.crop((x0, y0, x0 + side, y0 + side)).resize((s, s), Image.Resampling.BICUBIC)
        c = int(rng.integers(len(self.classes)))
        stamp = self._open(self.stamps[c][rng.integers(len(self.stamps[c]))], "RGBA")
        scale = rng.uniform(0.35, 0.7) * s / max(stamp.size)
        stamp = stamp.resize(
            (max(1, int(stamp.width * scale)), max(1, int(stamp.height * scale))), Image.Resampling.BICUBIC
        )
        px, py = rng.integers(0, s - stamp.width + 1), rng.integers(0, s - stamp.height + 1)
        canvas.paste(stamp, (int(px), int(py)), stamp)
        labels = np.zeros((s, s), dtype=np.int64)
        alpha = np.asarray(stamp)[..., 3] >= 128
        labels[py : py + stamp.height, px : px + stamp.width][alpha] = c + 1
        return canvas, labels


def tuxpaint_sets(image_size: int, n_train: int = 200, n_test: int = 100, seed: int = 0, root: Path | None = None):
    """Train and test :class:`StampSegmentation` sets from the fetched tuxpaint stamps and demo photos."""
    root = root or cache_dir() / "demo-data" / "tuxpaint"
    backgrounds = demo_photo_paths()
    return (
        StampSegmentation(root, backgrounds, n_train, image_size, "train", seed),
        StampSegmentation(root, backgrounds, n_test, image_size, "test", seed),
    )


def patch_labels(labels: torch.Tensor, patch: int, num_classes: int | None = None) -> torch.Tensor:
    """Majority label of each ``patch x patch`` cell: ``[B, H, W] -> [B, H/p, W/p]`` (ties: the smaller label)."""
    b, h, w = labels.shape
    return majority(pixel_vectors(labels, patch)).view(b, h // patch, w // patch)


def pixel_vectors(labels: torch.Tensor, patch: int) -> torch.Tensor:
    """The labels of each patch's pixels: ``[B, H, W] -> [B * H/p * W/p, p * p]`` (patches in raster order)."""
    b, h, w = labels.shape
    x = labels.view(b, h // patch, patch, w // patch, patch).permute(0, 1, 3, 2, 4)
    return x.reshape(-1, patch * patch)


def majority(vectors: torch.Tensor) -> torch.Tensor:
    """The most frequent label of each row (ties: the smaller label, as ``torch.mode``)."""
    return vectors.long().mode(dim=-1).values


def mean_iou(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int | None = None, ignore: tuple[int, ...] = ()
) -> tuple[float, float]:
    """(mean IoU over the classes present in prediction or target, pixel accuracy), over the pixels whose target
    is not in ``ignore`` — the same set of classes as scikit-learn's ``jaccard_score(average="macro")``."""
    pred, target = pred.flatten().long(), target.flatten().long()
    if ignore:
        keep = ~torch.isin(target, torch.tensor(ignore, device=target.device))
        pred, target = pred[keep], target[keep]
    if target.numel() == 0:
        raise ValueError("every pixel is an ignored label; nothing to score")
    n = max(int(pred.max()), int(target.max())) + 1 if num_classes is None else num_classes
    conf = torch.bincount(target * n + pred, minlength=n * n).view(n, n).double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()), float(inter.sum() / conf.sum())


# ----------------------------------------------------------------------------- features of a segmentation set


class RawPixelPatches(torch.nn.Module):
    """The pixel baseline as a "model": each patch's feature is its ``3 p^2`` normalised pixels."""

    def __init__(self, patch_size: int = 8):
        super().__init__()
        self.patch_size = patch_size
        self.image_size = None

    def forward(self, x: torch.Tensor):
        b, c, h, w = x.shape
        p = self.patch_size
        fm = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h // p, w // p, c * p * p)
        return fm.mean(dim=(1, 2)), fm[:, :0, 0], fm


class _SegItems(torch.utils.data.Dataset):
    """``(input [3, S, S], labels [S, S])``: the image resized to ``S x S`` (bicubic), its mask with nearest
    neighbours, as the authors' segmentation evaluation resizes both."""

    def __init__(self, ds, size: int):
        self.ds, self.size = ds, size

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        img, mask = self.ds[i]
        s = self.size
        if img.size != (s, s):
            img = img.resize((s, s), Image.Resampling.BICUBIC)
        if mask.shape != (s, s):
            mask = np.asarray(Image.fromarray(mask.astype(np.int32)).resize((s, s), Image.Resampling.NEAREST))
        return to_input(img), torch.from_numpy(mask.astype(np.int64))


def _collate_pairs(items):
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


@dataclass
class PatchSet:
    """Patch features ``[n, D]`` (fp32, CPU) and the labels of each patch's pixels ``[n, p * p]`` (int16)."""

    features: torch.Tensor
    labels: torch.Tensor
    grid: tuple[int, int]
    patch: int


@torch.no_grad()
def patch_set(
    model, datasets: list, size: int, batch_size: int = 32, device: str | torch.device | None = None,
    dtype: str = "fp32", num_workers: int = 0, desc: str = "features", progress: bool = True,
) -> PatchSet:  # fmt: skip
    """Patch features and pixel labels of every image of ``datasets``, one after the other in one preallocated
    pair of tensors (no concatenation: the k-NN bank of train + validation images is the whole tensor)."""
    from capi_lab.features import autocast, check_image_size, default_device

    device = torch.device(device) if device is not None else default_device()
    check_image_size(model.patch_size, size)
    model = model.to(device).eval()
    p = model.patch_size
    h = w = size // p
    n = sum(len(d) for d in datasets) * h * w
    feats: torch.Tensor | None = None
    labels = torch.empty((n, p * p), dtype=torch.int16)
    row = 0
    for ds in datasets:
        batches = torch.utils.data.DataLoader(
            _SegItems(ds, size), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_pairs
        )
        for x, y in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            with autocast(device, dtype):
                fm = model(x.to(device))[2]
            fm = fm.float().flatten(0, 2).cpu()
            if feats is None:
                feats = torch.empty((n, fm.shape[1]), dtype=torch.float32)
            if int(y.max()) > torch.iinfo(torch.int16).max or int(y.min()) < 0:
                raise ValueError(f"labels must lie in 0..32767; got {int(y.min())}..{int(y.max())}")
            feats[row : row + len(fm)] = fm
            labels[row : row + len(fm)] = pixel_vectors(y, p).to(torch.int16)
            row += len(fm)
    return PatchSet(feats, labels, (h, w), p)


class Standardizer:
    """Per-dimension centring and scaling fitted on the train patches (scikit-learn's ``StandardScaler``: population
    standard deviation, a constant dimension left unscaled), applied in place, in chunks."""

    def fit(self, x: torch.Tensor, chunk: int = 1 << 16) -> Standardizer:
        s = torch.zeros(x.shape[1], dtype=torch.float64)
        s2 = torch.zeros_like(s)
        for i in range(0, len(x), chunk):
            c = x[i : i + chunk].double()
            s += c.sum(0)
            s2 += (c * c).sum(0)
        mean = s / len(x)
        var = (s2 / len(x) - mean * mean).clamp_min(0)
        std = var.sqrt()
        std[std < 1e-12] = 1.0
        self.mean, self.std = mean.float(), std.float()
        return self

    def apply_(self, x: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
        for i in range(0, len(x), chunk):
            x[i : i + chunk].sub_(self.mean).div_(self.std)
        return x


# ----------------------------------------------------------------------------- classifiers


@torch.no_grad()
def knn_segment(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, ks: tuple[int, ...], distance: str,
    device: str | torch.device = "cpu", query_chunk: int = 1024, bank_chunk: int = 1 << 16,
    keep: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:  # fmt: skip
    """The authors' k-NN segmentation: each query patch's ``max(ks)`` nearest bank patches (``cosine``: 1 - cosine
    similarity; ``L2``: Euclidean), then for each ``k`` and each pixel the most frequent label among the first
    ``k`` neighbours' labels of that pixel (``bank_labels [n, p * p]``). Chunked top-k over queries and bank, on
    ``device``; ``{k: [m, p * p]}`` on the CPU. ``keep`` (a boolean per bank row) leaves rows out without copying
    the bank (at ADE20K scale a copy is 20 GB)."""
    if distance not in ("cosine", "L2"):
        raise ValueError(f"distance must be 'cosine' or 'L2', got {distance!r}")
    device = torch.device(device)
    kmax = min(max(ks), len(bank) if keep is None else int(keep.sum()))
    if device.type == "cuda" and torch.cuda.mem_get_info(device)[0] > 2 * bank.numel() * bank.element_size():
        bank = bank.to(device)  # once, rather than every bank chunk for every query chunk
        keep = keep.to(device) if keep is not None else None
    out = {k: torch.empty((len(queries), bank_labels.shape[1]), dtype=bank_labels.dtype) for k in ks}
    for q0 in range(0, len(queries), query_chunk):
        q = queries[q0 : q0 + query_chunk].to(device)
        if distance == "cosine":
            q = torch.nn.functional.normalize(q, dim=1)
        best_d = best_i = None
        for b0 in range(0, len(bank), bank_chunk):
            b = bank[b0 : b0 + bank_chunk].to(device)
            rows = None
            if keep is not None:
                rows = keep[b0 : b0 + bank_chunk].to(device).nonzero().squeeze(1)
                if len(rows) == 0:
                    continue
                b = b[rows]
            d = 1 - q @ torch.nn.functional.normalize(b, dim=1).T if distance == "cosine" else torch.cdist(q, b)
            dk, ik = d.topk(min(kmax, d.shape[1]), dim=1, largest=False)
            ik = (ik if rows is None else rows[ik]) + b0
            if best_d is not None:
                dk, ik = torch.cat([best_d, dk], 1), torch.cat([best_i, ik], 1)
                dk, pos = dk.topk(kmax, dim=1, largest=False)
                ik = ik.gather(1, pos)
            best_d, best_i = dk, ik
        neighbours = bank_labels[best_i.cpu()]  # [q, kmax, p * p]
        for k in ks:
            out[k][q0 : q0 + len(q)] = neighbours[:, : min(k, kmax)].long().mode(dim=1).values.to(out[k].dtype)
    return out


def fit_logreg(
    x: torch.Tensor, y: torch.Tensor, c: float, max_iter: int = 1000, device: str | torch.device = "cpu",
    history: int = 5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Multinomial L2 logistic regression by full-batch L-BFGS, with scikit-learn's (and cuML's) objective
    ``C * sum(log-loss) + |W|^2 / 2`` (intercept not penalised), divided by ``C * n`` for conditioning. Returns
    ``(W [d, K], b [K], classes [K])``; the classes are the labels present in ``y``."""
    device = torch.device(device)
    classes, yi = torch.unique(y.long(), return_inverse=True)
    xs = x.to(device)
    yi = yi.to(device)
    w = torch.zeros((x.shape[1], len(classes)), device=device, requires_grad=True)
    b = torch.zeros(len(classes), device=device, requires_grad=True)
    reg = 1.0 / (2.0 * c * len(x))
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=history, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ w + b, yi) + reg * (w * w).sum()
        loss.backward()
        return loss

    if len(classes) > 1:
        opt.step(closure)
    return w.detach(), b.detach(), classes.to(device)


@torch.no_grad()
def logreg_predict(model: tuple[torch.Tensor, torch.Tensor, torch.Tensor], x: torch.Tensor, chunk: int = 1 << 16):
    """The class of each row of ``x`` under a :func:`fit_logreg` model."""
    w, b, classes = model
    out = [classes[(x[i : i + chunk].to(w.device) @ w + b).argmax(1)].cpu() for i in range(0, len(x), chunk)]
    return torch.cat(out)


# ----------------------------------------------------------------------------- protocols

KNN_GRID = {"k": (1, 3, 10, 30), "distance": ("cosine", "L2")}
"""The authors' k-NN grid (``eval_segmentation.py``, ``KNNClassifier``): every pair is scored on validation."""
LOGREG_C = tuple(float(c) for c in 10 ** np.linspace(-6, 5, 8))
"""The authors' logistic-regression C grid (``LogregClassifier``): 1e-6 ... 1e5, 8 values."""


def _keep_labelled(labels: torch.Tensor, ignore: tuple[int, ...]) -> torch.Tensor:
    """Rows (patches) whose majority label is not ignored (the authors' ``Classifier.fit``)."""
    if not ignore:
        return torch.ones(len(labels), dtype=torch.bool)
    return ~torch.isin(majority(labels), torch.tensor(ignore))


def validation_split(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` image indices: a seeded permutation, its first tenth (at least one image) validation."""
    if n < 2:
        raise ValueError(f"a validation split needs at least 2 train images, got {n}")
    order = np.random.RandomState(seed).permutation(n)
    n_val = max(1, n // 10)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _subset(ds, idx: np.ndarray):
    return ds.subset(idx) if hasattr(ds, "subset") else _IndexedSubset(ds, idx)


class _IndexedSubset:
    def __init__(self, ds, idx):
        self.ds, self.idx = ds, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int):
        return self.ds[int(self.idx[i])]


def evaluate_capi(
    model, train, test, size: int, val=None, classifiers: tuple[str, ...] = ("knn",),
    ignore: tuple[int, ...] = (255,), seed: int = 0, batch_size: int = 32, device: str | torch.device | None = None,
    dtype: str = "fp32", num_workers: int = 0, logreg_max_iter: int = 1000,
) -> dict:  # fmt: skip
    """The authors' segmentation protocol (``eval_segmentation.py``), point by point in ``docs/evaluation.md``:
    features of the resized images; a seeded 10 % of train as validation when there is no ``val``; standardisation
    fitted on train; train patches whose majority label is ignored dropped; each classifier's grid scored by
    validation mIoU; the best refitted on train + validation and scored on ``test`` (mIoU and pixel accuracy over
    the pixels whose label is not in ``ignore``)."""
    from capi_lab.features import default_device

    device = torch.device(device) if device is not None else default_device()
    if val is None:
        tr_idx, va_idx = validation_split(len(train), seed)
        train, val = _subset(train, tr_idx), _subset(train, va_idx)
    kw = dict(batch_size=batch_size, device=device, dtype=dtype, num_workers=num_workers)
    bank = patch_set(model, [train, val], size, desc="features (train + val)", **kw)
    queries = patch_set(model, [test], size, desc="features (test)", **kw)
    n_tr = len(train) * bank.grid[0] * bank.grid[1]
    scaler = Standardizer().fit(bank.features[:n_tr])
    scaler.apply_(bank.features)
    scaler.apply_(queries.features)
    x_tr, y_tr = bank.features[:n_tr], bank.labels[:n_tr]
    x_va, y_va = bank.features[n_tr:], bank.labels[n_tr:]
    keep_tr, keep_all = _keep_labelled(y_tr, ignore), _keep_labelled(bank.labels, ignore)
    if not keep_tr.any():
        raise ValueError("every train patch's majority label is ignored; nothing to fit")
    row: dict = {"protocol": "capi", "ignore_labels": list(ignore), "n_train_images": len(train),
                 "n_val_images": len(val), "n_test_images": len(test), "grid": list(bank.grid)}  # fmt: skip
    for name in classifiers:
        scores: dict[str, float] = {}
        if name == "knn":
            for dist in KNN_GRID["distance"]:
                preds = knn_segment(x_tr, y_tr, x_va, KNN_GRID["k"], dist, device, keep=keep_tr)
                for k, p in preds.items():
                    scores[f"k={k},distance={dist}"] = mean_iou(p, y_va, ignore=ignore)[0]
            best = max(scores, key=scores.get)
            k, dist = int(best.split(",")[0][2:]), best.split("=")[-1]
            pred = knn_segment(bank.features, bank.labels, queries.features, (k,), dist, device, keep=keep_all)[k]
            best_params = {"k": k, "distance": dist}
        elif name == "linear":
            pl_tr = majority(y_tr[keep_tr])
            for c in LOGREG_C:
                m = fit_logreg(x_tr[keep_tr], pl_tr, c, logreg_max_iter, device)
                scores[f"C={c:.3g}"] = mean_iou(_upscale(logreg_predict(m, x_va), y_va), y_va, ignore=ignore)[0]
            best = max(scores, key=scores.get)
            c = LOGREG_C[list(scores).index(best)]
            m = fit_logreg(bank.features[keep_all], majority(bank.labels[keep_all]), c, logreg_max_iter, device)
            pred = _upscale(logreg_predict(m, queries.features), queries.labels)
            best_params = {"C": c}
        else:
            raise ValueError(f"unknown classifier {name!r}: 'knn' or 'linear'")
        miou, acc = mean_iou(pred, queries.labels, ignore=ignore)
        row[name] = {"miou": miou, "pixel_acc": acc, "best": best_params, "val_miou": scores}
    return row


def _upscale(patch_pred: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One label per patch -> the same label on each of its pixels."""
    return patch_pred[:, None].expand(-1, like.shape[1])


def evaluate_quick(
    model, train, test, size: int, k: int = 10, temperature: float = 0.07, ignore: tuple[int, ...] = (255,),
    batch_size: int = 32, device: str | torch.device | None = None, dtype: str = "fp32", num_workers: int = 0,
    background: bool = False, progress: bool = True,
) -> dict:  # fmt: skip
    """capi_lab's quick protocol: no standardisation and no validation; each train patch gets its majority label
    (patches whose majority is ignored dropped), each test patch the temperature-weighted cosine vote of its ``k``
    nearest train patches, on all its pixels. With ``background`` (label 0 is background, as in the generated
    scenes) the row also has ``fg_bg_miou``: the same predictions read as object vs background."""
    from capi_lab.evaluation.classification import knn_predict
    from capi_lab.features import default_device

    device = torch.device(device) if device is not None else default_device()
    kw = dict(batch_size=batch_size, device=device, dtype=dtype, num_workers=num_workers, progress=progress)
    bank = patch_set(model, [train], size, desc="features (train)", **kw)
    queries = patch_set(model, [test], size, desc="features (test)", **kw)
    keep = _keep_labelled(bank.labels, ignore)
    y = majority(bank.labels[keep])
    n_cls = int(max(int(y.max()), int(queries.labels.max()))) + 1
    pred = knn_predict(bank.features[keep], y, queries.features, k, temperature, n_cls, device=device)
    pred_px = _upscale(pred, queries.labels)
    miou, acc = mean_iou(pred_px, queries.labels, ignore=ignore)
    row = {"protocol": "quick", "miou": miou, "pixel_acc": acc, "k": k, "temperature": temperature,
           "ignore_labels": list(ignore), "n_train_images": len(train), "n_test_images": len(test),
           "grid": list(bank.grid)}  # fmt: skip
    if background:
        row["fg_bg_miou"] = mean_iou((pred_px > 0).long(), (queries.labels > 0).long(), 2, ignore)[0]
    return row


def seg_knn_miou(
    model, train: StampSegmentation, test: StampSegmentation, k: int = 10, temperature: float = 0.07,
    batch_size: int = 32, device: str | torch.device | None = None,
) -> dict[str, float]:  # fmt: skip
    """The quick protocol on generated scenes (nothing ignored): mIoU, pixel accuracy and the object-vs-background
    mIoU (any class against label 0: does the model find objects, whatever their class?)."""
    if train.image_size % model.patch_size:
        raise ValueError(f"image size {train.image_size} is not a multiple of the patch size {model.patch_size}")
    row = evaluate_quick(model, train, test, train.image_size, k, temperature, (), batch_size, device, background=True)
    return {"miou": row["miou"], "pixel_acc": row["pixel_acc"], "fg_bg_miou": row["fg_bg_miou"],
            "num_classes": train.num_classes, "k": k}  # fmt: skip
