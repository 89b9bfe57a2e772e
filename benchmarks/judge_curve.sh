#!/usr/bin/env bash
# The generator's quality against its training length: benchmarks/sample_quality.py on every
# snapshot a pretraining run kept (pretrain.snapshot_every), guided by one CE run and judged by another.
#   usage: benchmarks/judge_curve.sh PRETRAIN_RUN GUIDE_RUN JUDGE_RUN [PER_CLASS] [STEPS]
# e.g.  benchmarks/judge_curve.sh outputs/dermamnist_diffusion outputs/dermamnist_ce_s0 outputs/dermamnist_ce_s1
set -euo pipefail
run=${1:?usage: $0 PRETRAIN_RUN GUIDE_RUN JUDGE_RUN [PER_CLASS] [STEPS]}; guide=${2:?GUIDE_RUN}; judge=${3:?JUDGE_RUN}
for unet in "$run"/snapshots/epoch_* "$run"/unet; do
  [ -f "$unet/diffusion_pytorch_model.safetensors" ] || continue
  echo "## $(basename "$unet")"
  python benchmarks/sample_quality.py --unet "$unet" --guide "$guide" --judge "$judge" \
    --per-class "${4:-32}" --steps "${5:-20}" --scales 1.0
done
