"""Parameter groups (who gets which learning rate and weight decay) and the teacher's EMA update."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


def param_groups(
    modules: dict[str, nn.Module], patch_embed_lr_mult: float = 0.2, norm_wd_mult: float = 0.1
) -> list[dict]:
    """AdamW groups with ``lr_mult`` / ``wd_mult`` keys (the trainer multiplies the scheduled values).

    Rules (capi-method.md §4): patch embedding lr x``patch_embed_lr_mult``; RoPE frequency tables lr x0
    (they are also created frozen, so no gradient is computed for them); norm scales wd x``norm_wd_mult``;
    biases wd 0; everything else wd x1. Group names say which rule applied.
    """
    groups: dict[tuple[float, float], dict] = {}
    for prefix, module in modules.items():
        for name, p in module.named_parameters():
            full = f"{prefix}.{name}" if prefix else name
            lr_mult, wd_mult = 1.0, 1.0
            if "rope.freqs" in name:
                lr_mult, wd_mult = 0.0, 0.0
            if "patch_embed" in name:
                lr_mult = patch_embed_lr_mult
            if name.endswith("bias"):
                wd_mult = 0.0
            elif ".norm." in f".{name}":
                wd_mult = norm_wd_mult
            group = groups.setdefault(
                (lr_mult, wd_mult), {"params": [], "names": [], "lr_mult": lr_mult, "wd_mult": wd_mult}
            )
            group["params"].append(p)
            group["names"].append(full)
    return list(groups.values())


def set_hparams(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Apply the scheduled lr / weight decay to every group through its multipliers."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


@torch.no_grad()
def ema_update_(teacher: Iterable[Tensor], student: Iterable[Tensor], momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, in place, as one fused foreach op.
    With ``momentum == 1`` the teacher is left exactly unchanged."""
    t, s = [_local(p) for p in teacher], [_local(p) for p in student]
    if momentum == 1.0 or not t:
        return
    torch._foreach_lerp_(t, s, 1.0 - momentum)


def _local(p: Tensor) -> Tensor:
    """This rank's shard of an FSDP2 (DTensor) parameter; teacher and student shards line up because
    FSDP2 shards every parameter the same way along its first axis."""
    return p.to_local() if hasattr(p, "to_local") else p
