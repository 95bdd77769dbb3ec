"""The attentive probe: one learned query attends over the frozen patch tokens (multi-head
cross-attention), then a linear classifier. Only the probe is trained."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm


class AttentiveProbe(nn.Module):
    def __init__(self, dim: int, num_classes: int, num_heads: int = 4):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: Float[Tensor, "b n d"]) -> Float[Tensor, "b c"]:
        q = self.query.expand(tokens.shape[0], -1, -1)
        pooled, _ = self.attn(q, tokens, tokens, need_weights=False)
        return self.head(self.norm(pooled[:, 0]))


def attentive_accuracy(
    train: Float[Tensor, "n t d"],
    train_labels: Int[Tensor, " n"],
    test: Float[Tensor, "m t d"],
    test_labels: Int[Tensor, " m"],
    epochs: int = 20,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    batch_size: int = 256,
    num_heads: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> float:
    """Train an :class:`AttentiveProbe` on ``train`` tokens (AdamW, cosine schedule) and return its
    top-1 accuracy on ``test``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    dim = train.shape[-1]
    heads = num_heads if dim % num_heads == 0 else 1
    probe = AttentiveProbe(dim, num_classes, heads)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-train.shape[0] // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(total=steps, desc="attentive probe", disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(train.shape[0], generator=g)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(probe(train[idx].float()), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    probe.eval()
    with torch.no_grad():
        pred = torch.cat([probe(test[i : i + 1024].float()).argmax(1) for i in range(0, test.shape[0], 1024)])
    return float((pred == test_labels).float().mean())


# ----------------------------------------------------------------------------- the authors' protocol

PROBE_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2)
"""The authors' learning-rate grid (``eval_classification.py``, ``eval_model``), for a global batch of 256."""
PROBE_WDS = (5e-4, 1e-3, 5e-2)
"""The authors' weight-decay grid."""
PROBE_SOURCES = ("cls", "avg_patch", "cls_avg_patch", "patch")
"""The feature sources the authors' probe trains heads on: linear heads on the pooled representation, the mean
patch token and their concatenation (their code adds the last whatever is asked), an attention-pooling head on the
patch tokens."""


class AttnPoolHead(nn.Module):
    """The authors' attention-pooling classifier: one learned query (not projected) attends, with heads of 64
    channels, over keys and values from one linear map of the tokens; the pooled vector goes to a linear layer.
    No normalisation and no output projection."""

    def __init__(self, dim: int, num_classes: int, head_dim: int = 64):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"the attention-pooling head needs a width divisible by {head_dim}, got {dim}")
        self.num_heads = dim // head_dim
        self.query_token = nn.Parameter(torch.empty(dim))
        self.kv = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, num_classes)
        for p in (self.query_token, self.kv.weight, self.linear.weight):
            nn.init.trunc_normal_(p, std=0.02)
        nn.init.zeros_(self.kv.bias)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: Float[Tensor, "b n d"]) -> Float[Tensor, "b c"]:
        b, n, d = tokens.shape
        h = self.num_heads
        q = self.query_token.view(1, h, 1, d // h).expand(b, -1, -1, -1)
        k, v = self.kv(tokens).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        return self.linear(F.scaled_dot_product_attention(q, k, v).reshape(b, d))


class LinearHead(nn.Linear):
    """A linear classifier, initialised as the authors' (truncated normal 0.02, zero bias)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__(dim, num_classes)
        nn.init.trunc_normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)


def probe_inputs(model, x: Tensor, sources: tuple[str, ...]) -> dict[str, Tensor]:
    """The frozen model's features for each feature source (fp32)."""
    gr, _, fm = model(x)
    patches = fm.float().flatten(1, 2)
    out = {"cls": gr.float(), "avg_patch": patches.mean(1)}
    out["cls_avg_patch"] = torch.cat([out["cls"], out["avg_patch"]], -1)
    out["patch"] = patches
    return {s: out[s] for s in sources}


def warmup_cosine(iters: int, warmup: int) -> np.ndarray:
    """The authors' probe schedule (a multiplier of each group's lr): linear 0 -> 1 over ``warmup`` iterations
    (both ends included), then half a cosine 1 -> 0 over the rest (both ends included)."""
    if not 0 <= warmup < iters:
        raise ValueError(f"warmup iterations must be in [0, iters), got {warmup} of {iters}")
    return np.concatenate([np.linspace(0.0, 1.0, warmup), (np.cos(np.linspace(0, np.pi, iters - warmup)) + 1) / 2])


class _Stream(torch.utils.data.Dataset):
    """Position ``pos`` of the seeded infinite train stream: epoch ``pos // n`` visits the train images in a
    permutation seeded by (seed, epoch); the augmentation of a position is seeded by (seed, pos), so a resumed
    probe sees exactly the images and crops it would have seen."""

    def __init__(self, source, labels: Tensor, transform, seed: int):
        self.source, self.labels, self.transform, self.seed = source, labels, transform, seed
        self._perm: dict[int, Tensor] = {}

    def index(self, pos: int) -> int:
        n = len(self.source)
        epoch = pos // n
        if epoch not in self._perm:
            self._perm = {
                epoch: torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            }
        return int(self._perm[epoch][pos % n])

    def __len__(self) -> int:  # positions are unbounded; the sampler decides which
        return 1 << 62

    def __getitem__(self, pos: int):
        from capi_lab.data import _mix, seeded_cpu_rng

        i = self.index(pos)
        try:
            img = self.source.load(i)
        except Exception:
            return None
        with seeded_cpu_rng(_mix(self.seed, pos)):
            return self.transform(img), int(self.labels[i])


class _Positions(torch.utils.data.Sampler):
    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def _batches(stream: _Stream, start: int, stop: int, batch: int, workers: int):
    def collate(items):
        items = [it for it in items if it is not None]
        return (torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])) if items else None

    return torch.utils.data.DataLoader(stream, batch_size=batch, sampler=_Positions(start, stop),
                                       num_workers=workers, collate_fn=collate)  # fmt: skip


def probe_eval_transform(size: int):
    """The authors' probe evaluation transform: resize the shorter side to ``size * 256 / 224`` (bicubic), centre
    crop ``size``."""
    from torchvision.transforms import v2

    from capi_lab.data import to_input

    return v2.Compose([
        v2.Resize(round(size * 256 / 224), interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(size), to_input,
    ])  # fmt: skip


def probe_train_transform(size: int):
    """The authors' probe augmentation: RandomResizedCrop (default scale 0.08-1, bicubic) and a horizontal flip."""
    from torchvision.transforms import v2

    from capi_lab.data import to_input

    return v2.Compose([
        v2.RandomResizedCrop(size, interpolation=v2.InterpolationMode.BICUBIC), v2.RandomHorizontalFlip(), to_input,
    ])  # fmt: skip


def _save_probe(path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def probe_capi(
    model, train, train_labels: Tensor, test, test_labels: Tensor, *, image_size: int = 224,
    global_batch: int = 1024, batch_size: int = 128, iters: int = 12_500, warmup: int = 1250,
    lrs: tuple[float, ...] = PROBE_LRS, wds: tuple[float, ...] = PROBE_WDS, sources: tuple[str, ...] = PROBE_SOURCES,
    val_proportion: float = 0.1, split_seed: int = 42, seed: int = 0, device: str | torch.device | None = None,
    dtype: str = "fp32", num_workers: int = 0, output_dir=None, checkpoint_every: int = 1250, progress: bool = True,
) -> dict:  # fmt: skip
    """The authors' classification probe (``eval_classification.py``), point by point in docs/evaluation.md.

    The frozen ``model`` runs online on augmented train images; one head per feature source and (lr, wd) of the
    grid — linear on pooled features, attention pooling on patch tokens — is trained in the same pass with AdamW
    (0.9, 0.95), lr scaled by ``global_batch / 256``, no weight decay on biases, linear warmup then cosine, a
    global batch of ``global_batch`` images (``batch_size`` at a time, gradients accumulated). A seeded
    ``val_proportion`` of train picks each source's best head, which is then scored on ``test``. With
    ``output_dir`` the heads and optimiser are saved every ``checkpoint_every`` iterations and a rerun resumes
    from there (exactly: the data stream and its crops are seeded by position)."""
    from pathlib import Path

    from capi_lab.features import autocast, default_device

    device = torch.device(device) if device is not None else default_device()
    if global_batch % batch_size:
        raise ValueError(f"the global batch {global_batch} must be a multiple of the batch size {batch_size}")
    accum = global_batch // batch_size
    model = model.to(device).eval().requires_grad_(False)
    n = len(train)
    order = np.random.default_rng(split_seed).permutation(n)
    n_tr = round((1 - val_proportion) * n)
    if n_tr < 1 or n_tr >= n:
        raise ValueError(f"a validation split of {val_proportion:.0%} of {n} train images leaves one side empty")
    tr_idx, va_idx = np.sort(order[:n_tr]), np.sort(order[n_tr:])
    from capi_lab.evaluation.datasets import Subset

    train_src, val_src = Subset(train, tr_idx), Subset(train, va_idx)
    y_tr, y_va = train_labels[tr_idx], train_labels[va_idx]
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    x0 = probe_eval_transform(image_size)(train.load(0))[None].to(device)
    with torch.no_grad(), autocast(device, dtype):
        dims = {s: t.shape[-1] for s, t in probe_inputs(model, x0, sources).items()}
    keys = [(s, lr, wd) for s in sources for lr in lrs for wd in wds]
    heads = nn.ModuleList(
        [AttnPoolHead(dims[s], num_classes) if s == "patch" else LinearHead(dims[s], num_classes) for s, _, _ in keys]
    ).to(device)
    groups: dict[tuple[float, float], list] = {}  # one group per (lr, wd), as the authors fuse them
    for head, (_, lr, wd) in zip(heads, keys, strict=True):
        for name, p in head.named_parameters():
            groups.setdefault((lr * global_batch / 256, 0.0 if "bias" in name else wd), []).append(p)
    opt = torch.optim.AdamW(
        [{"params": ps, "base_lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()],
        lr=0.0, weight_decay=0.0, betas=(0.9, 0.95),
    )  # fmt: skip
    schedule = warmup_cosine(iters, warmup)
    settings = {"keys": [list(k) for k in keys], "iters": iters, "warmup": warmup, "global_batch": global_batch,
                "image_size": image_size, "n_train": n_tr, "seed": seed, "split_seed": split_seed}  # fmt: skip
    start = 0
    ckpt = Path(output_dir) / "probe_last.pt" if output_dir is not None else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state["settings"] != settings:
            raise ValueError(f"{ckpt} is a probe with other settings; give a new --output-dir or delete it")
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["optimizer"])
        start = state["iteration"]
    stream = _Stream(train_src, y_tr, probe_train_transform(image_size), seed)
    batches = iter(_batches(stream, start * global_batch, iters * global_batch, batch_size, num_workers))
    torch.manual_seed(seed)
    bar = tqdm(total=iters, initial=start, desc="attentive probe (capi)", disable=not progress)
    for it in range(start, iters):
        for g in opt.param_groups:
            g["lr"] = float(schedule[it]) * g["base_lr"]
        opt.zero_grad(set_to_none=True)
        for _ in range(accum):
            batch = next(batches)
            if batch is None:
                continue
            x, y = batch[0].to(device), batch[1].to(device)
            with torch.no_grad(), autocast(device, dtype):
                feats = probe_inputs(model, x, sources)
            logits = torch.stack([h(feats[s]) for h, (s, _, _) in zip(heads, keys, strict=True)], -1)
            loss = F.cross_entropy(logits, y[:, None].expand(-1, len(keys))) * len(x) / global_batch
            loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item() * global_batch / max(len(x), 1):.3f}")
        if ckpt is not None and ((it + 1) % checkpoint_every == 0 or it + 1 == iters):
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            _save_probe(ckpt, {"heads": heads.state_dict(), "optimizer": opt.state_dict(), "iteration": it + 1,
                               "settings": settings})  # fmt: skip
    bar.close()

    def accuracies(source, labels) -> Tensor:
        correct = torch.zeros(len(keys))
        tf = probe_eval_transform(image_size)
        seen = 0
        for start_i in range(0, len(source), batch_size):
            idx = range(start_i, min(start_i + batch_size, len(source)))
            x = torch.stack([tf(source.load(i)) for i in idx]).to(device)
            with torch.no_grad(), autocast(device, dtype):
                feats = probe_inputs(model, x, sources)
                pred = torch.stack(
                    [h(feats[s].float()).argmax(1) for h, (s, _, _) in zip(heads, keys, strict=True)], -1
                )
            correct += (pred.cpu() == labels[list(idx), None]).sum(0).float()
            seen += len(idx)
        return correct / seen

    heads.eval()
    val_acc = accuracies(val_src, y_va)
    best = {s: max((i for i, k in enumerate(keys) if k[0] == s), key=lambda i: float(val_acc[i])) for s in sources}
    test_acc = accuracies(test, test_labels)
    return {
        s: {"lr": keys[i][1], "wd": keys[i][2], "val_top1": float(val_acc[i]), "test_top1": float(test_acc[i])}
        for s, i in best.items()
    } | {"n_train": n_tr, "n_val": n - n_tr, "n_test": len(test), "iters": iters, "global_batch": global_batch}
