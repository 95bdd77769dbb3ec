"""The teacher's Sinkhorn + clustering loss alone: fused Triton kernels against the compiled PyTorch form.

    python benchmarks/sinkhorn_kernels.py                      # ViT-B/16 at batch 256: [256, 196, 16384] bf16
    python benchmarks/sinkhorn_kernels.py --sweep --best-out blocks.json

Times forward + backward of ``capi_lab.losses.clustering_outputs`` both ways (CUDA events, medians), each
kernel of the fused form with the bandwidth it reaches (bytes of logits read and gradient written per
second), and how far the two forms' outputs are apart. ``--sweep`` also tries other tile sizes
(``capi_lab.kernels.fused_clustering.BLOCKS``) and prints / saves the fastest. On a machine without a GPU it runs a
small shape through Triton's interpreter (a smoke test of the script, not a timing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from capi_lab.kernels import fused_clustering as fc  # noqa: E402
from capi_lab.losses import clustering_outputs  # noqa: E402

# (rows, prototypes, warps) per tile. Column kernel: with BLOCK_K >= 256 * warps the warps sit side by side
# along K and the sum over images stays inside each thread. Row kernels: with ROWS == warps and BLOCK_K == 256
# each warp owns a row and reduces it with shuffles only.
COL = [(8, 256, 4), (4, 1024, 4), (8, 1024, 4), (8, 2048, 8), (16, 512, 4), (16, 256, 4)]
ROW = [(4, 1024, 4), (8, 256, 8), (4, 256, 4), (8, 512, 4), (2, 2048, 8), (16, 256, 8), (4, 2048, 8)]


def timed(fn, reps: int) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU, wall clock otherwise)."""
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time

            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("B", "N", "K"))
    p.add_argument("--predict-per-image", type=int, default=6)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--sweep", action="store_true", help="try the tile sizes in COL / ROW")
    p.add_argument("--best-out", default=None, help="write the fastest BLOCKS here (JSON)")
    p.add_argument("--no-baseline", action="store_true", help="skip timing the compiled PyTorch form")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    b, n, k = args.shape or ((256, 196, 16384) if cuda else (6, 10, 40))
    dev = "cuda" if cuda else "cpu"
    reps = args.reps if cuda else 1
    torch.manual_seed(0)
    # logits as the clustering head makes them: l2-normalised features against N(0, 1) prototypes
    feats = torch.nn.functional.normalize(torch.randn(b * n, 64, device=dev), dim=-1)
    logits = (feats @ torch.randn(64, k, device=dev)).view(b, n, k).to(torch.bfloat16 if cuda else torch.float32)
    idx = torch.cat([i * n + torch.randperm(n, device=dev)[: args.predict_per_image] for i in range(b)])
    gb = logits.numel() * logits.element_size() / 1e9

    def fwd_bwd(fused: bool):
        def run():
            x = logits.detach().requires_grad_()
            out = step[fused](x)
            out.clustering_loss.backward()
            return out, x.grad

        return run

    step = {
        True: lambda x: clustering_outputs(x, idx, impl="fused"),
        False: torch.compile(lambda x: clustering_outputs(x, idx, impl="potentials"))
        if cuda and not args.no_baseline else (lambda x: clustering_outputs(x, idx, impl="eager")),
    }  # fmt: skip
    (ref, ref_grad), (got, got_grad) = fwd_bwd(False)(), fwd_bwd(True)()
    agreement = {
        "targets_max_abs_diff": float((ref.targets - got.targets).abs().max()),
        "loss_diff": float((ref.clustering_loss - got.clustering_loss).detach()),
        "entropy_diff": float(ref.target_entropy - got.target_entropy),
        # the two argmaxes differ only between tied rows' top prototypes (ties are the rule with B << K):
        # how far below each row's best assignment the fused kernels' choice is, on the predicted rows
        "argmax_value_gap": float(
            (
                ref.targets.flatten(0, 1).amax(-1)
                - ref.targets.flatten(0, 1).gather(-1, got.assignments.flatten()[idx][:, None])[:, 0]
            )
            .abs()
            .max()
        ),  # fmt: skip
        "grad_max_abs_diff": float((ref_grad.float() - got_grad.float()).abs().max()),
        "grad_max_abs": float(ref_grad.float().abs().max()),
    }
    print(json.dumps({"shape": [b, n, k], "dtype": str(logits.dtype), "device": torch.cuda.get_device_name() if cuda
                      else "cpu (Triton interpreter: not a timing)", **agreement}))  # fmt: skip

    x = logits.detach()
    scale = 1 / 0.06

    def stages(col_only: bool = False) -> dict[str, float]:
        lu = fc._col_step(x, None, scale)
        lv = fc._row_step(x, lu, scale)
        if col_only:
            t = timed(lambda: fc._col_step(x, lv, scale), reps)
            return {"col_step_ms": round(t, 3), "col_GBps": round(gb / t * 1e3, 1)}
        dest = torch.full((b * n,), -1, device=dev, dtype=torch.int32)
        dest[idx] = torch.arange(idx.numel(), device=dev, dtype=torch.int32)
        args_ = (x, dest, idx.numel(), 0.06, 0.12, 3)
        outs = fc._teacher_op(*args_, True)
        go = torch.ones((), device=dev)
        t = {
            "col_step_ms": timed(lambda: fc._col_step(x, lv, scale), reps),
            "row_step_ms": timed(lambda: fc._row_step(x, lu, scale), reps),
            "forward_ms": timed(lambda: fc._teacher_op(*args_, True), reps),
            "backward_ms": timed(lambda: fc._backward_op(x, *outs[4:], go, 0.06, 0.12, True), reps),
        }
        t["final_ms"] = t["forward_ms"] - 3 * t["col_step_ms"] - 2 * t["row_step_ms"]
        t["col_GBps"] = gb / t["col_step_ms"] * 1e3
        t["row_GBps"] = gb / t["row_step_ms"] * 1e3
        t["backward_GBps"] = 2 * gb / t["backward_ms"] * 1e3
        return {key: round(v, 3) for key, v in t.items()}

    results = {"fused_fwd_bwd_ms": round(timed(fwd_bwd(True), reps), 3)}
    if not args.no_baseline:
        results["pytorch_compiled_fwd_bwd_ms"] = round(timed(fwd_bwd(False), reps), 3)
    print(json.dumps({"blocks": fc.BLOCKS, **results, **stages()}))
    if args.sweep:
        best = {}
        for part, configs, names in (("col", COL, ("BLOCK_B", "BLOCK_K")), ("row", ROW, ("ROWS", "BLOCK_K"))):
            scores = []
            for c in configs:
                fc.BLOCKS[part] = {names[0]: c[0], names[1]: c[1], "num_warps": c[2]}
                t = stages(col_only=part == "col")
                score = t["col_step_ms"] if part == "col" else t["forward_ms"] + t["backward_ms"]
                scores.append((score, dict(fc.BLOCKS[part])))
                print(json.dumps({"sweep": part, "blocks": fc.BLOCKS[part], **t}))
            best[part] = min(scores, key=lambda s: s[0])[1]
            fc.BLOCKS[part] = best[part]
        final = {"best_blocks": best, "fused_fwd_bwd_ms": round(timed(fwd_bwd(True), reps), 3)}
        print(json.dumps(final))
        if args.best_out:
            with open(args.best_out, "w") as f:
                json.dump(best, f)


if __name__ == "__main__":
    main()
