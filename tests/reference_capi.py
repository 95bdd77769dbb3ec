"""An independent, deliberately plain re-statement of the published CAPI forward pass, computed
straight from an authors'-layout state dict (``backbone.*`` keys) with explicit float64 math.

It shares no code with capi_lab: it is written from capi-method.md §1 and §5 alone, so that
comparing the two checks capi_lab against the method rather than against itself.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def _rms(x, weight=None, eps=1e-5):
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y * weight if weight is not None else y


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _rope(x, coords, freqs):
    # x: (b, heads, t, hd); coords: (b, t, 2); freqs: (2, hd)
    angle = torch.einsum("btc,cd->btd", coords, freqs)[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * torch.cos(angle) + rotated * torch.sin(angle)


def _attention(sd, pre, x, xc, ctx, cc):
    freqs = sd[pre + "rope.freqs"]
    hd = freqs.shape[1]
    b, t, _ = x.shape
    m = ctx.shape[1]
    q = (x @ sd[pre + "q_proj.weight"].T).view(b, t, -1, hd).transpose(1, 2)
    k = (ctx @ sd[pre + "k_proj.weight"].T).view(b, m, -1, hd).transpose(1, 2)
    v = (ctx @ sd[pre + "v_proj.weight"].T).view(b, m, -1, hd).transpose(1, 2)
    q, k = _rope(q, xc, freqs), _rope(k, cc, freqs)
    scores = torch.einsum("bhtd,bhmd->bhtm", q, k) / math.sqrt(hd)
    out = torch.einsum("bhtm,bhmd->bhtd", scores.softmax(-1), v)
    return out.transpose(1, 2).reshape(b, t, -1) @ sd[pre + "proj.weight"].T


def _block(sd, pre, x, xc, ctx=None, cc=None):
    h = _rms(x, sd[pre + "residual1.norm.weight"])
    if ctx is None:
        ctx, cc = h, xc
    x = x + _attention(sd, pre + "residual1.fn.", h, xc, ctx, cc)
    h = _rms(x, sd[pre + "residual2.norm.weight"])
    h = _gelu(h @ sd[pre + "residual2.fn.fc1.weight"].T) @ sd[pre + "residual2.fn.fc2.weight"].T
    return x + h


def _n_blocks(sd, part):
    i = 0
    while f"backbone.{part}.blocks.{i}.residual1.norm.weight" in sd:
        i += 1
    return i


def reference_forward(state_dict, images):
    """``(global_repr, registers, feature_map)`` of the published models, in float64."""
    sd = {k: v.to(F64) for k, v in state_dict.items() if k.startswith("backbone.")}
    x = images.to(F64)
    w = sd["backbone.patch_embed.weight"]
    p = w.shape[-1]
    b, _, H, W = x.shape
    h, wd = H // p, W // p
    # patch embedding as an explicit matrix product over unfolded patches
    patches = x.unfold(2, p, p).unfold(3, p, p)  # b, 3, h, w, p, p
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, h * wd, -1)
    tokens = patches @ w.reshape(w.shape[0], -1).T + sd["backbone.patch_embed.bias"]
    # coordinates: row i of h -> i/(h-1), column j of w -> j/(w-1); row-major flattening
    coords = torch.tensor(
        [[i / (h - 1) if h > 1 else 0.0, j / (wd - 1) if wd > 1 else 0.0] for i in range(h) for j in range(wd)],
        dtype=F64,
    )
    reg = sd["backbone.registers"]
    r = reg.shape[1]
    s = r // 4
    edge = []
    for side in range(4):
        for t in range(s):
            c = t / s
            edge.append([(c, 0.0), (1.0, c), (1.0 - c, 1.0), (0.0, 1.0 - c)][side])
    # full image: the bounding box of the visible patches is the unit square, so no rescaling
    reg_coords = torch.tensor(edge, dtype=F64).reshape(r, 2)
    seq = torch.cat([reg.expand(b, -1, -1), tokens], dim=1)
    seq_coords = torch.cat([reg_coords, coords])[None].expand(b, -1, -1)
    for i in range(_n_blocks(sd, "encoder")):
        seq = _block(sd, f"backbone.encoder.blocks.{i}.", seq, seq_coords)
    seq = _rms(seq)
    registers, feats = seq[:, :r], seq[:, r:]
    queries = sd["backbone.mask_token"].reshape(1, 1, -1).expand(b, h * wd, -1)
    q_coords = coords[None].expand(b, -1, -1)
    first = _rms(_block(sd, "backbone.decoder.blocks.0.", queries, q_coords, seq, seq_coords))
    return first.mean(1), registers, feats.reshape(b, h, wd, -1)
