#!/usr/bin/env bash
# The Fashion-MNIST evaluation table (README): k-NN (k=20, T=0.07; 10k-image train bank, the 10k test
# images) and logistic regression (trained on the same 10k), for raw pixels, a random `tiny`, a `tiny`
# pretrained on Fashion-MNIST and the default model.
#   bash benchmarks/fmnist_eval.sh [TINY_CKPT]     (default TINY_CKPT: runs/fmnist_tiny_20min/checkpoints/last.ckpt)
# To make TINY_CKPT, the recipe study's 20-minute recipe (benchmarks/recipe_study.md): the protocol's 486k images
# (once 1900 steps of 256) as 7600 steps of 64, with a slower teacher than the preset's 600-step default and
# every masked patch predicted (15.3-17.4 min with evaluation on this project's 2-core machine, compiled):
#   python -m capi_lab.train --preset tiny --data fashion-mnist --output-dir runs/fmnist_tiny_20min \
#       --max-steps 7600 --batch-size 64 --optim.momentum-peak 0.99 --mask.prediction-subsampling 1.0 \
#       --compile --log-every 50
set -euo pipefail
TINY=${1:-runs/fmnist_tiny_20min/checkpoints/last.ckpt}
E="python -m capi_lab.evaluation"
COMMON="--dataset fashion-mnist --limit-train 10000"
for ck in raw-pixels random:tiny "$TINY" default; do
  $E classification --checkpoint "$ck" $COMMON
done
