"""RoPE on q and k alone: the fused Triton kernel against Inductor's kernel for the PyTorch form.

    python benchmarks/rope_kernel.py            # ViT-B/16 shapes at batch 256
    python benchmarks/rope_kernel.py --sweep --best-out rope_blocks.json   # also other tile sizes

Two shapes from a ViT-B/16 training step: the teacher's self-attention (256 images x 212 tokens, forward
only, under no_grad) and the student's (230 images kept by stochastic depth x 85 visible tokens, forward +
backward). q and k are the first two thirds of a fused q/k/v projection output, as in the model. Prints, per
shape, the median milliseconds of both forms (CUDA events), the bandwidth the kernel reaches (bytes of q, k
read and written per second) and how far the results are apart. On a machine without a GPU it runs a small
shape through Triton's interpreter (a smoke test of the script, not a timing).
"""

from __future__ import annotations

import argparse
import json

import torch
from sinkhorn_kernels import timed  # also switches Triton's interpreter on where there is no GPU

from capi_lab.config import get_preset
from capi_lab.kernels import fused_rope
from capi_lab.model.rope import Rope

SWEEP = [(8, 4), (16, 2), (16, 4), (32, 4), (32, 8), (64, 8)]  # (BLOCK_T, num_warps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vit_b16")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--sweep", action="store_true", help="try the tile sizes in SWEEP")
    p.add_argument("--best-out", default=None, help="write the fastest BLOCKS (both shapes together) here (JSON)")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    m = get_preset(args.preset).model
    heads, hd = m.num_heads, m.embed_dim // m.num_heads
    grid = (get_preset(args.preset).image_size // m.patch_size) ** 2
    b = args.batch_size if cuda else 2
    keep = max(int(b * (1 - m.drop_path_rate)), 1)
    visible = round(grid * (1 - get_preset(args.preset).mask.ratio))
    shapes = {"teacher": (b, grid + m.num_registers, False), "student": (keep, visible + m.num_registers, True)}
    if not cuda:
        shapes = {"teacher": (2, 21, False), "student": (2, 9, True)}
    reps = args.reps if cuda else 1
    dtype = torch.bfloat16 if cuda else torch.float32
    rope = Rope(hd).to(dev)
    torch.manual_seed(0)

    def pytorch_form(x, coords):
        return rope.split(x, coords, 2)

    compiled = torch.compile(pytorch_form) if cuda else pytorch_form
    enabled = fused_rope.ENABLED

    def runner(fused: bool, qkv, coords, grads):
        def run():
            fused_rope.ENABLED = fused
            x = qkv[..., : 2 * heads * hd].unflatten(-1, (2 * heads, hd))
            if grads is None:
                with torch.no_grad():
                    return (fused_rope.rotate(x, coords, rope.freqs, 2) if fused else compiled(x, coords)), None
            outs = fused_rope.rotate(x, coords, rope.freqs, 2) if fused else compiled(x, coords)
            return outs, torch.autograd.grad(outs, qkv, grads)[0]

        return run

    configs = SWEEP if args.sweep else [(fused_rope.BLOCKS["BLOCK_T"], fused_rope.BLOCKS["num_warps"])]
    totals = dict.fromkeys(configs, 0.0)
    for name, (bb, t, backward) in shapes.items():
        qkv = torch.randn(bb, t, 3 * heads * hd, device=dev, dtype=dtype, requires_grad=backward)
        coords = torch.rand(bb, t, 2, device=dev)
        grads = [torch.randn(bb, t, heads, hd, device=dev, dtype=dtype) for _ in range(2)] if backward else None
        (ref, ref_grad), (got, got_grad) = runner(False, qkv, coords, grads)(), runner(True, qkv, coords, grads)()
        diff = max(
            float((a.detach().float() - b_.detach().float()).abs().max()) for a, b_ in zip(ref, got, strict=True)
        )
        # q and k read and written once forward, their gradients once more backward
        gb = 2 * qkv[..., : 2 * heads * hd].numel() * qkv.element_size() / 1e9 * (2 if backward else 1)
        device = torch.cuda.get_device_name() if cuda else "cpu (interpreter)"
        row = {"shape": name, "batch": bb, "tokens": t, "heads": 2 * heads, "head_dim": hd, "backward": backward,
               "max_abs_diff": diff, "device": device}  # fmt: skip
        if backward:
            row["grad_max_abs_diff"] = float((ref_grad.float() - got_grad.float()).abs().max())
        row["pytorch_compiled_ms"] = round(timed(runner(False, qkv, coords, grads), reps), 4)
        default = dict(fused_rope.BLOCKS)
        for block_t, warps in configs:
            fused_rope.BLOCKS.update(BLOCK_T=block_t, num_warps=warps)
            ms = timed(runner(True, qkv, coords, grads), reps)
            totals[block_t, warps] += ms
            print(json.dumps({**row, "blocks": dict(fused_rope.BLOCKS), "fused_ms": round(ms, 4),
                              "fused_GBps": round(gb / ms * 1e3, 1),
                              "speedup": round(row["pytorch_compiled_ms"] / ms, 2)}))  # fmt: skip
        fused_rope.BLOCKS.update(default)
    fused_rope.ENABLED = enabled
    block_t, warps = min(totals, key=totals.get)
    best = {"BLOCK_T": block_t, "num_warps": warps}
    print(json.dumps({"best_rope_blocks": best, "fused_ms_both_shapes": round(totals[block_t, warps], 4)}))
    if args.best_out:
        with open(args.best_out, "w") as f:
            json.dump(best, f)


if __name__ == "__main__":
    main()
