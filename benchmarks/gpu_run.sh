#!/usr/bin/env bash
# Everything that needs the lent GPU, in one go, most important first (a lease can run out part-way).
# Usage on the device machine:  bash benchmarks/gpu_run.sh [STEP ...]   (writes under $OUT, or ./gpu_out)
# Steps (default: all, in this order):
#   sweep     fused Sinkhorn kernels alone: agreement at full scale, timings vs compiled PyTorch, tile sweep
#   kernels   the same without the sweep and the PyTorch baseline (quick)
#   tests     the GPU tests and the fused-kernel tests on CUDA
#   cgtests   only the GPU tests of --cuda-graphs (same losses as without graphs, no graph skipped, stochastic
#             depth redrawn on every replay): what making CUDA graphs the default needs
#   rope      the fused RoPE kernel alone against Inductor's kernel for the PyTorch form; a tile sweep whose
#             best tiles the later steps use
#   b16       training step, ViT-B/16 batch 256, compiled (kernel table, trace and its GPU-gap analysis)
#   b16pt     the same with RoPE in PyTorch (--rope pytorch), the default before the fused RoPE kernel
#   b16cg     the same with CUDA graphs (--cuda-graphs)
#   b16rope   ViT-B/16 compiled with the fused RoPE kernel (--rope fused, the library default since it was timed)
#   b16ropet  the same kernel launched by Inductor (--rope traceable: less host time per call)
#   b16cgrope CUDA graphs and the fused RoPE kernel
#   b16combo  ViT-B/16 compiled with Inductor's combo kernels (small independent kernels fused into one launch)
#   b16cpp    ViT-B/16 compiled with Inductor's C++ wrapper (cpp_wrapper: less host time per launch, any
#             number of processes, unlike CUDA graphs)
#   b16mxa    ViT-B/16 compiled with Inductor's autotuned Triton matrix products (max_autotune_gemm), which can
#             take the exact-erf GELU after fc1 into the product's epilogue (slow to compile: a call of its own)
#   l14       training step, ViT-L/14 batch 128, compiled
#   l14cg     the same with CUDA graphs
#   baseline  ViT-B/16 again with the compiled PyTorch Sinkhorn instead of the kernels (same machine)
#   eager     both models without torch.compile
#   loop      the whole training command, ViT-B/16 compiled, on synthetic JPEGs with the default loader workers,
#             against its loader alone: does the loader feed the GPU? (benchmarks/loop_throughput.py)
#   snap      what the training snapshots cost at ViT-B/16 batch 256, compiled, against its step
#             (benchmarks/snapshot_cost.py; the default interval of a 100k-step run)
# Files under $OUT (at most 8 come back): env_tests.txt, bench.jsonl, gaps.jsonl, kernels.jsonl, err.txt,
# profile_b16.txt, trace_b16.json.gz, trace_b16cg.json.gz (and blocks.json after a sweep).
set -u -o pipefail  # a benchmark that fails says so (its status, not tee's)
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# GPU_RUN_DRY=1: the same plumbing on a CPU in seconds (the tiny model, two steps a round), which the tests run
DRY=()
DRY_LOOP=()
DRY_SNAP=()
SNAP_COMPILE=(--compile)
[ -n "${GPU_RUN_DRY:-}" ] \
  && DRY=(--preset tiny --batch-size 8 --image-size 28 --device cpu --steps 2 --rounds 2 --warmup 1) \
  && DRY_LOOP=(--preset tiny --batch-size 8 --image-size 28 --accelerator cpu --compile false --max-steps 4
               --log-every 2 --images 40) \
  && DRY_SNAP=(--preset tiny --batch-size 8 --data-size 28 --device cpu --steps 2 --snapshots 2) && SNAP_COMPILE=()
if [ -z "${GPU_RUN_DRY:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee -a "$OUT/env_tests.txt"
python3 -c "import torch, lightning, timm, triton; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env_tests.txt"
B=benchmarks/train_throughput.py
BLOCKS=()
ROPE_OK=1
bench() { local t=$1; shift
  timeout "$t" python3 $B "$@" --steps 20 --rounds 3 --warmup 4 "${DRY[@]}" 2>>"$OUT/err.txt" \
    | tee -a "$OUT/bench.jsonl" || { echo "FAILED: $*"; tail -5 "$OUT/err.txt"; }; }
gaps() { [ -s "$1" ] && python3 benchmarks/trace_gaps.py "$1" --top 8 2>>"$OUT/err.txt" | tee -a "$OUT/gaps.jsonl"; }
kernels() { timeout "$1" python3 benchmarks/sinkhorn_kernels.py "${@:2}" 2>>"$OUT/err.txt" \
  | tee -a "$OUT/kernels.jsonl" || tail -20 "$OUT/err.txt"; }
for step in "${@:-sweep tests rope b16 b16pt b16rope b16ropet b16cg b16cgrope b16cpp b16combo l14 l14cg baseline eager loop snap}"; do for s in $step; do case $s in
  sweep) kernels 150 --sweep --best-out "$OUT/blocks.json"
         [ -s "$OUT/blocks.json" ] && BLOCKS=(--kernel-blocks "$OUT/blocks.json") ;;
  kernels) kernels 60 --no-baseline ;;
  tests) timeout 360 python3 -m pytest -q -m "gpu or not gpu" tests/test_gpu.py tests/test_fused_clustering.py \
           tests/test_fused_rope.py -p no:cacheprovider 2>&1 | tail -15 | tee -a "$OUT/env_tests.txt" ;;
  cgtests) timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py -k cuda_graph -p no:cacheprovider 2>&1 \
             | tail -15 | tee -a "$OUT/env_tests.txt" ;;
  b16) bench 150 --preset vit_b16 --batch-size 256 --compile "${BLOCKS[@]}" --profile "$OUT/profile_b16.txt" \
         --trace "$OUT/trace_b16.json.gz"; gaps "$OUT/trace_b16.json.gz" ;;
  b16pt) bench 150 --preset vit_b16 --batch-size 256 --compile --rope pytorch "${BLOCKS[@]}" ;;
  b16cg) bench 170 --preset vit_b16 --batch-size 256 --compile --cuda-graphs "${BLOCKS[@]}" \
         --trace "$OUT/trace_b16cg.json.gz"; gaps "$OUT/trace_b16cg.json.gz" ;;
  rope) timeout 120 python3 benchmarks/rope_kernel.py --sweep --best-out /tmp/rope_blocks.json 2>>"$OUT/err.txt" \
          | tee -a "$OUT/kernels.jsonl"
        if [ "${PIPESTATUS[0]}" = 0 ]; then BLOCKS+=(--rope-blocks /tmp/rope_blocks.json)
        else echo "RoPE kernel failed: the steps with it are skipped, the others use PyTorch's RoPE"
             tail -5 "$OUT/err.txt"; ROPE_OK=0; BLOCKS+=(--rope pytorch); fi ;;
  b16rope) [ "$ROPE_OK" = 1 ] && bench 150 --preset vit_b16 --batch-size 256 --compile --rope fused "${BLOCKS[@]}" ;;
  b16ropet) [ "$ROPE_OK" = 1 ] && bench 150 --preset vit_b16 --batch-size 256 --compile --rope traceable \
              "${BLOCKS[@]}" ;;
  b16cgrope) [ "$ROPE_OK" = 1 ] && bench 170 --preset vit_b16 --batch-size 256 --compile --cuda-graphs \
               --rope fused "${BLOCKS[@]}" ;;
  b16combo) bench 170 --preset vit_b16 --batch-size 256 --compile --inductor combo_kernels=True "${BLOCKS[@]}" ;;
  b16cpp) bench 240 --preset vit_b16 --batch-size 256 --compile --inductor cpp_wrapper=True "${BLOCKS[@]}" ;;
  b16mxa) bench 420 --preset vit_b16 --batch-size 256 --compile --inductor max_autotune_gemm=True "${BLOCKS[@]}" ;;
  l14) bench 170 --preset vit_l14 --batch-size 128 --compile "${BLOCKS[@]}" ;;
  l14cg) bench 190 --preset vit_l14 --batch-size 128 --compile --cuda-graphs "${BLOCKS[@]}" ;;
  baseline) bench 130 --preset vit_b16 --batch-size 256 --compile --sinkhorn single-pass ;;
  loop) timeout 300 python3 benchmarks/loop_throughput.py --preset vit_b16 --compile --max-steps 100 --log-every 20 \
          "${DRY_LOOP[@]}" 2>>"$OUT/err.txt" | tail -1 | tee -a "$OUT/bench.jsonl" \
          || { echo "FAILED: loop"; tail -5 "$OUT/err.txt"; } ;;
  snap) timeout 240 python3 benchmarks/snapshot_cost.py --preset vit_b16 --batch-size 256 --max-steps 100000 \
          "${SNAP_COMPILE[@]}" "${DRY_SNAP[@]}" 2>>"$OUT/err.txt" | tail -1 | tee -a "$OUT/bench.jsonl" \
          || { echo "FAILED: snap"; tail -5 "$OUT/err.txt"; } ;;
  eager) bench 60 --preset vit_b16 --batch-size 256; bench 60 --preset vit_l14 --batch-size 128 ;;
  *) echo "unknown step: $s"; exit 2 ;;
esac; done; done
cat "$OUT/bench.jsonl"
