"""The attentive probe: one learned query attends over the frozen patch tokens (multi-head
cross-attention), then a linear classifier. Only the probe is trained."""

from __future__ import annotations

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
