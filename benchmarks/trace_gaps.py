"""Where does the GPU wait? Idle gaps between kernels in a profiler trace, and the host work behind them.

    python benchmarks/train_throughput.py --preset vit_b16 --batch-size 256 --compile --trace b16.json.gz
    python benchmarks/trace_gaps.py b16.json.gz

Reads a Chrome trace written by ``torch.profiler`` (``.json`` or ``.json.gz``) and prints one JSON line: the
span from the first to the last GPU kernel, the time some kernel was running (all streams merged), the idle
time, that idle time summed by the host operator that launched the kernel ending each gap, and the calls
that made the host wait for the GPU (stream/device synchronisations, blocking copies) with the operator
that made them. A gap whose
next kernel was launched only after the GPU had gone idle is "host-bound": the host, not the GPU, set the pace
there, and fewer launches (CUDA graphs) or less Python per step is what closes it. ``--top N`` also lists the
N longest gaps. The profiler slows the host down, so the gaps in a trace are an upper bound on the gaps of
an unprofiled run; compare runs traced the same way.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
BLOCKING_COPIES = ("cudaMemcpy", "cuMemcpyDtoH_v2", "cuMemcpyHtoD_v2")


def load_events(path: str | Path) -> list[dict[str, Any]]:
    """The trace's complete ('X') events."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def _correlation(e: dict[str, Any]) -> Any:
    return (e.get("args") or {}).get("correlation")


def _host_op_at(ops_by_tid: dict[Any, tuple[list[float], list[dict]]], tid: Any, ts: float) -> str | None:
    """The innermost host operator on thread ``tid`` that was running at time ``ts`` (of those sorted by
    start, the last one that started before ``ts`` and still ran then)."""
    starts, ops = ops_by_tid.get(tid, ([], []))
    for o in reversed(ops[: bisect.bisect_right(starts, ts)]):
        if o["ts"] + o["dur"] >= ts:
            return o["name"]
    return None


def gpu_gaps(events: list[dict[str, Any]], min_gap_us: float = 5.0) -> dict[str, Any]:
    """Busy/idle accounting of the GPU between its first and last kernel, and the gaps of at least
    ``min_gap_us`` with the kernels around them and the host operator that launched the next kernel."""
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    if not gpu:
        raise ValueError("the trace has no GPU kernels: profile a CUDA run (ProfilerActivity.CUDA)")
    launches = {  # runtime launches (cudaLaunchKernel, cudaGraphLaunch) and driver ones (Triton's cuLaunchKernel)
        _correlation(e): e for e in events if e.get("cat") in LAUNCH_CATEGORIES and _correlation(e) is not None
    }
    host_ops: dict[Any, list[dict]] = defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation"):
            host_ops[e.get("tid")].append(e)
    ops_by_tid = {}
    for tid, ops in host_ops.items():
        ops.sort(key=lambda o: o["ts"])
        ops_by_tid[tid] = ([o["ts"] for o in ops], ops)

    start, end = gpu[0]["ts"], max(e["ts"] + e["dur"] for e in gpu)
    busy, gaps = 0.0, []
    cur_start, cur_end, last = gpu[0]["ts"], gpu[0]["ts"] + gpu[0]["dur"], gpu[0]
    for e in gpu[1:]:
        if e["ts"] > cur_end:  # the GPU was idle from cur_end to e["ts"]
            busy += cur_end - cur_start
            gap = e["ts"] - cur_end
            if gap >= min_gap_us:
                launch = launches.get(_correlation(e))
                gaps.append({
                    "at_us": round(cur_end - start, 1),
                    "gap_us": round(gap, 1),
                    "before": last["name"],
                    "after": e["name"],
                    "launched_by": _host_op_at(ops_by_tid, launch.get("tid"), launch["ts"]) if launch else None,
                    "host_bound": bool(launch) and launch["ts"] >= cur_end,
                })  # fmt: skip
            cur_start = e["ts"]
        if e["ts"] + e["dur"] >= cur_end:
            cur_end, last = e["ts"] + e["dur"], e
    busy += cur_end - cur_start
    by_op: dict[str, float] = defaultdict(float)
    for g in gaps:
        by_op[g["launched_by"] or "?"] += g["gap_us"]
    # calls that make the host wait for the GPU: every one drains the queue the host had built up
    syncs: dict[str, int] = defaultdict(int)
    for e in events:
        name = e.get("name", "")
        if e.get("cat") in LAUNCH_CATEGORIES and ("Synchronize" in name or name in BLOCKING_COPIES):
            syncs[f"{name} in {_host_op_at(ops_by_tid, e.get('tid'), e['ts']) or '?'}"] += 1
    span = end - start
    return {
        "span_ms": round(span / 1e3, 3),
        "gpu_busy_ms": round(busy / 1e3, 3),
        "gpu_idle_ms": round((span - busy) / 1e3, 3),
        "kernels": len(gpu),
        "gaps": len(gaps),
        "idle_in_gaps_ms": round(sum(g["gap_us"] for g in gaps) / 1e3, 3),
        "host_bound_ms": round(sum(g["gap_us"] for g in gaps if g["host_bound"]) / 1e3, 3),
        "host_waits": dict(sorted(syncs.items(), key=lambda kv: -kv[1])),
        "idle_by_launching_op_ms": {k: round(v / 1e3, 3) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:12]},
        "longest": sorted(gaps, key=lambda g: -g["gap_us"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", help="Chrome trace from torch.profiler (.json or .json.gz)")
    p.add_argument("--min-gap-us", type=float, default=5.0, help="shorter idle stretches are not listed")
    p.add_argument("--top", type=int, default=15, help="list this many of the longest gaps")
    args = p.parse_args()
    try:
        result = gpu_gaps(load_events(args.trace), args.min_gap_us)
    except ValueError as e:
        raise SystemExit(f"error: {args.trace}: {e}") from None
    result["longest"] = result["longest"][: args.top]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
