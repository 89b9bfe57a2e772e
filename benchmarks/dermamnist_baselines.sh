#!/usr/bin/env bash
# Loss baselines on real DermaMNIST (28x28, official split) on CPU with 2 Ray Train workers.
#   usage: benchmarks/dermamnist_baselines.sh DATA_ROOT [OUT_DIR] [METHOD ...]
# Each method is a run named dermamnist_<method>_s<seed>; results land in OUT_DIR/<run>/metrics.json.
set -euo pipefail
root=${1:?usage: $0 DATA_ROOT [OUT_DIR] [METHOD ...]}; out=${2:-outputs/benchmarks}; shift $(( $# > 1 ? 2 : 1 ))
methods=("${@:-ce ldam_drw}"); seeds=${SEEDS:-0}
for m in ${methods[@]}; do
  for s in $seeds; do
    ioisray train configs/dermamnist.yaml data.root="$root" output_dir="$out" seed="$s" \
      name="dermamnist_${m}_s${s}" method.loss="$m" ${EXTRA:-}
  done
done
python benchmarks/summarize.py "$out"/dermamnist_*/metrics.json
