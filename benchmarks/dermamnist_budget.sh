#!/usr/bin/env bash
# The budget IOIS needs: IOIS on real DermaMNIST (CPU) at several synthesis.budget values, one
# seed, the rest as configs/dermamnist_iois.yaml (15 epochs, 7,007 real training images).
#   usage: BUDGETS="256 512 1024 2048 4096" SEED=0 benchmarks/dermamnist_budget.sh DATA_ROOT UNET_DIR [OUT_DIR]
# Runs are named dermamnist_iois_b<budget>_s<seed>; finished ones are skipped (rerun to resume the sweep).
set -euo pipefail
root=${1:?usage: $0 DATA_ROOT UNET_DIR [OUT_DIR]}; unet=${2:?UNET_DIR}; out=${3:-outputs/benchmarks}
seed=${SEED:-0}
for b in ${BUDGETS:-256 512 1024 2048 4096}; do
  run="dermamnist_iois_b${b}_s${seed}"
  [ -f "$out/$run/metrics.json" ] && continue
  ioisray train configs/dermamnist_iois.yaml data.root="$root" diffusion.model_dir="$unet" output_dir="$out" \
    seed="$seed" name="$run" synthesis.budget="$b"
done
python benchmarks/summarize.py "$out"/dermamnist_iois_b*_s"$seed"/metrics.json
