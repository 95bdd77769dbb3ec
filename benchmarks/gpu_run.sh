#!/usr/bin/env bash
# Everything that needs the lent GPU, in one go: GPU tests, then the throughput benchmarks.
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
timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
B=benchmarks/train_throughput.py
for args in "--preset vit_b16 --batch-size 256" "--preset vit_b16 --batch-size 256 --compile --profile $OUT/profile_b16.txt" \
            "--preset vit_l14 --batch-size 128" "--preset vit_l14 --batch-size 128 --compile --profile $OUT/profile_l14.txt"; do
  timeout 150 python3 $B $args --steps 20 --warmup 4 2>"$OUT/bench_err.txt" | tee -a "$OUT/bench.jsonl" \
    || { echo "FAILED: $args"; tail -5 "$OUT/bench_err.txt"; }
done
cat "$OUT/bench.jsonl"
