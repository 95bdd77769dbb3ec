#!/usr/bin/env bash
# Everything that needs the lent GPU, in one go, most important first (a lease can run out part-way):
# the fused Sinkhorn kernels alone (agreement at full scale, timings, tile sweep), the training-step
# benchmarks, the GPU tests, and last the PyTorch-Sinkhorn baseline on the same machine.
# Usage on the device machine:  bash benchmarks/gpu_run.sh   (writes under $OUT, or ./gpu_out)
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning, timm, triton; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 120 python3 benchmarks/sinkhorn_kernels.py --sweep --best-out "$OUT/blocks.json" 2>"$OUT/kernels_err.txt" \
  | tee "$OUT/kernels.jsonl" || tail -20 "$OUT/kernels_err.txt"
BLOCKS=(); [ -s "$OUT/blocks.json" ] && BLOCKS=(--kernel-blocks "$OUT/blocks.json")
B=benchmarks/train_throughput.py
bench() { local t=$1; shift
  timeout "$t" python3 $B "$@" --steps 20 --warmup 4 2>"$OUT/bench_err.txt" | tee -a "$OUT/bench.jsonl" \
    || { echo "FAILED: $*"; tail -5 "$OUT/bench_err.txt"; }; }
bench 150 --preset vit_b16 --batch-size 256 --compile "${BLOCKS[@]}" --profile "$OUT/profile_b16.txt"
bench 170 --preset vit_l14 --batch-size 128 --compile "${BLOCKS[@]}"
timeout 150 python3 -m pytest -q -x -m "gpu or not gpu" tests/test_gpu.py tests/test_fused_clustering.py \
  -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
bench 130 --preset vit_b16 --batch-size 256 --compile --sinkhorn single-pass
cat "$OUT/bench.jsonl"
