#!/usr/bin/env bash
# Everything that needs the lent GPU, in one go: the throughput benchmarks (most important first), then GPU tests.
# Usage on the device machine:  bash benchmarks/gpu_run.sh   (writes under $OUT, or ./gpu_out)
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning, timm; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
B=benchmarks/train_throughput.py
# most important first: a lease can run out part-way
bench() { local t=$1; shift
  timeout "$t" python3 $B "$@" --steps 20 --warmup 4 2>"$OUT/bench_err.txt" | tee -a "$OUT/bench.jsonl" \
    || { echo "FAILED: $*"; tail -5 "$OUT/bench_err.txt"; }; }
bench 150 --preset vit_b16 --batch-size 256 --compile --profile "$OUT/profile_b16.txt"
bench 170 --preset vit_l14 --batch-size 128 --compile
bench 130 --preset vit_b16 --batch-size 256 --compile --sinkhorn max-every-step
bench 60 --preset vit_b16 --batch-size 256
bench 60 --preset vit_l14 --batch-size 128
timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
cat "$OUT/bench.jsonl"
