"""Throughput of the real CAPI training step on a synthetic batch already on the device.

    python benchmarks/train_throughput.py --preset vit_l14 --batch-size 128 --compile
    python benchmarks/train_throughput.py --preset tiny --batch-size 256 --device cpu

Prints one JSON line: images/s (median over timed steps; with --rounds, also each round's), step time
percentiles, peak device memory and achieved TFLOP/s (FLOPs of one step counted with
torch.utils.flop_counter on the eager step), and with --cuda-graphs how many graphs Inductor declined.
The step is capi_lab.train.train_step, the very function the trainer runs (teacher forward,
clustering loss and backward, student forward/backward, AdamW, EMA, clustering-optimizer step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from lightning.fabric import Fabric
from torch.utils.flop_counter import FlopCounterMode

from capi_lab.config import get_preset, with_overrides
from capi_lab.masking import MaskBatch, sample_masks
from capi_lab.train import build_trainer, train_step


def _sinkhorn_potentials_max_every_step(z: torch.Tensor, n_iter: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The same Sinkhorn scalings with a max-stabilised log-sum-exp in every half-iteration (for --sinkhorn)."""
    from capi_lab.sinkhorn import _logsumexp_images

    z, log_v = z.float(), None
    for _ in range(n_iter):
        log_u = -_logsumexp_images(z if log_v is None else z + log_v)
        log_v = -torch.logsumexp(z + log_u, dim=2, keepdim=True)
    return log_u, log_v


def _inductor_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key, value), the value read as a Python literal when it is one."""
    import ast

    import torch._inductor.config as inductor_config

    key, sep, value = text.partition("=")
    if not sep or not hasattr(inductor_config, key):
        raise SystemExit(f"error: --inductor {text!r}: expected KEY=VALUE with KEY a torch._inductor.config field")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vit_l14")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cuda-graphs", action="store_true", help="with --compile: replay the steps as CUDA graphs")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "bf16-mixed", "32-true"])
    p.add_argument("--steps", type=int, default=20, help="timed steps (per round)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time the steps this many times in a row (compiled once): each round's images/s is reported, so "
        "one run shows the spread between timing windows; images/s is the median step over all rounds",
    )
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--profile", default=None, help="write a table of the top kernels of 3 profiled steps here")
    p.add_argument(
        "--trace", default=None, help="write a Chrome trace of 3 steps here (.json.gz; open in Perfetto) to see gaps"
    )
    p.add_argument(
        "--sinkhorn",
        default="fused",
        choices=["fused", "single-pass", "max-every-step"],
        help="'fused': the library default on CUDA (Triton kernels, capi_lab.kernels.fused_clustering); ablations: "
        "'single-pass' is the compiled PyTorch form (capi_lab.sinkhorn), 'max-every-step' that form with a "
        "max-stabilised log-sum-exp in every half-iteration (two passes over the logits each)",
    )
    p.add_argument(
        "--rope",
        default=None,
        choices=["fused", "traceable", "pytorch"],
        help="'fused': one Triton kernel for q and k (capi_lab.kernels.fused_rope; the library default on CUDA); "
        "'traceable': the same kernel launched by Inductor's generated code (CAPI_LAB_FUSED_ROPE=traceable); "
        "'pytorch': Rope's PyTorch form, compiled with the rest of the step (CAPI_LAB_FUSED_ROPE=0). "
        "Default: the library's setting",
    )
    p.add_argument("--rope-blocks", default=None, help="JSON file of fused_rope.BLOCKS (from rope_kernel.py)")
    p.add_argument(
        "--kernel-blocks", default=None, help="JSON file of fused_clustering.BLOCKS (from sinkhorn_kernels.py)"
    )
    p.add_argument(
        "--inductor",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set torch._inductor.config.KEY (repeatable), e.g. combo_kernels=True to fuse small independent kernels",
    )
    args = p.parse_args()
    if args.steps < 2 or args.rounds < 1:
        raise SystemExit("error: --steps must be at least 2 (percentiles) and --rounds at least 1")
    inductor_options = dict(_inductor_option(o) for o in args.inductor)
    import torch._inductor.config as inductor_config

    for key, value in inductor_options.items():  # read by torch.compile (--compile)
        setattr(inductor_config, key, value)
    import capi_lab.kernels.fused_clustering as fc

    if args.sinkhorn != "fused":
        fc.ENABLED = False
    import capi_lab.kernels.fused_rope as fr

    if args.rope is not None:
        fr.ENABLED = args.rope != "pytorch"
        fr.TRACEABLE = args.rope == "traceable"
    if args.rope_blocks:
        with open(args.rope_blocks) as f:
            fr.BLOCKS.update(json.load(f))
    if args.kernel_blocks:
        with open(args.kernel_blocks) as f:
            fc.BLOCKS.update(json.load(f))
    if args.sinkhorn == "max-every-step":
        import capi_lab.sinkhorn as sk

        sk.sinkhorn_potentials = _sinkhorn_potentials_max_every_step
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    over = {}
    if args.batch_size:
        over["batch_size"] = args.batch_size
    if args.image_size:
        over["image_size"] = args.image_size
    cfg = with_overrides(cfg, **over) if over else cfg
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    precision = args.precision if args.precision != "auto" else ("bf16-mixed" if device == "cuda" else "32-true")
    fabric = Fabric(accelerator=device, devices=1, precision=precision)
    b, g = cfg.batch_size, cfg.image_size // cfg.model.patch_size
    images = fabric.to_device(torch.randn(b, 3, cfg.image_size, cfg.image_size))
    masks = [MaskBatch(*(fabric.to_device(t) for t in sample_masks(b, g, g, cfg.mask, rng=i))) for i in range(4)]

    # FLOPs of one eager step (the compiled step does the same math)
    tr = build_trainer(fabric, cfg, max_steps=10**6, compile=False)
    train_step(tr, images, masks[0])
    with FlopCounterMode(display=False) as counter:
        train_step(tr, images, masks[1])
    flops = counter.get_total_flops()
    from torch._dynamo.utils import counters

    skips_before = counters["inductor"]["cudagraph_skips"]
    if args.compile:
        del tr
        tr = build_trainer(fabric, cfg, max_steps=10**6, compile=True, cuda_graphs=args.cuda_graphs)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    t_compile = time.perf_counter()
    for i in range(args.warmup):
        train_step(tr, images, masks[i % 4])
    sync()
    warmup_s = time.perf_counter() - t_compile
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rounds = []
    for _ in range(args.rounds):
        rounds.append([])
        for i in range(args.steps):
            t0 = time.perf_counter()
            out = train_step(tr, images, masks[i % 4])
            sync()
            rounds[-1].append(time.perf_counter() - t0)
    times = [t for r in rounds for t in r]
    loss = float(out["capi_loss"])
    # the same steps back to back with one synchronisation at the end, as the trainer runs them (it never
    # waits for the GPU between steps): shows how much of the per-step time is host-side gap
    t0 = time.perf_counter()
    for i in range(args.steps):
        train_step(tr, images, masks[i % 4])
    sync()
    back_to_back = (time.perf_counter() - t0) / args.steps
    if args.profile or args.trace:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=acts) as prof:
            for i in range(3):
                train_step(tr, images, masks[i % 4])
            sync()
        if args.trace:
            prof.export_chrome_trace(args.trace)
        if args.profile:
            key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
            with open(args.profile, "w") as f:
                f.write(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=90))
    med = statistics.median(times)
    q = statistics.quantiles(times, n=10)
    result = {
        "preset": args.preset,
        "batch_size": b,
        "image_size": cfg.image_size,
        "compile": args.compile,
        "cuda_graphs": tr.cuda_graphs,
        # graphs Inductor declined to build (the reason is logged): with --cuda-graphs anything but 0 means
        # part of the step ran without them
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips_before if tr.cuda_graphs else None,
        "inductor": inductor_options or None,
        "sinkhorn": args.sinkhorn if device == "cuda" or args.sinkhorn != "fused" else "single-pass (no CUDA)",
        "rope": ("traceable" if fr.TRACEABLE else "fused") if fr.ENABLED and device == "cuda" else "pytorch",
        "rope_blocks": fr.BLOCKS if fr.ENABLED and device == "cuda" else None,
        "kernel_blocks": fc.BLOCKS if args.sinkhorn == "fused" and device == "cuda" else None,
        "precision": precision,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "images_per_s": round(b / med, 1),
        "step_ms_median": round(med * 1e3, 2),
        "step_ms_p10": round(q[0] * 1e3, 2),
        "step_ms_p90": round(q[-1] * 1e3, 2),
        "images_per_s_rounds": [round(b / statistics.median(r), 1) for r in rounds] if args.rounds > 1 else None,
        "images_per_s_back_to_back": round(b / back_to_back, 1),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device == "cuda" else None,
        # what the caching allocator holds: with --cuda-graphs the graphs' private pools, which the figure above
        # leaves out (their tensors were allocated when the graphs were captured, during the warm-up steps)
        "peak_memory_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2) if device == "cuda" else None,
        "tflop_per_step": round(flops / 1e12, 3),
        "achieved_tflops": round(flops / med / 1e12, 1),
        "warmup_s": round(warmup_s, 1),
        "loss_finite": bool(torch.isfinite(torch.tensor(loss))),
        "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
