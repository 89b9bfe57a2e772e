#!/usr/bin/env bash
# IOIS, its ablations and offline synthesis next to CE and LDAM-DRW on real DermaMNIST (CPU), over seeds.
#   usage: SEEDS="0 1 2" benchmarks/dermamnist_iois.sh DATA_ROOT UNET_DIR [OUT_DIR]
# UNET_DIR: a tiny diffusion model pretrained on DermaMNIST's training split
# (ioisray pretrain-diffusion configs/pretrain_dermamnist.yaml data.root=DATA_ROOT).
# Runs are named dermamnist_<method>_s<seed>; finished ones are skipped; the table comes from summarize.py.
set -euo pipefail
root=${1:?usage: $0 DATA_ROOT UNET_DIR [OUT_DIR]}; unet=${2:?UNET_DIR}; out=${3:-outputs/benchmarks}
seeds=${SEEDS:-0 1 2}
declare -A methods=(
  [ce]="configs/dermamnist.yaml method.loss=ce"
  [ldam_drw]="configs/dermamnist.yaml method.loss=ldam_drw"
  [iois]="configs/dermamnist_iois.yaml"
  [iois_no_aas]="configs/dermamnist_iois.yaml aas.enabled=false"
  [iois_no_guidance]="configs/dermamnist_iois.yaml synthesis.guidance=false"
  [offline]="configs/dermamnist_iois.yaml synthesis.mode=offline"
)
todo=${METHODS:-ce ldam_drw iois iois_no_aas iois_no_guidance offline}
for m in $todo; do  # a typo would otherwise train the default config under its name
  [ -n "${methods[$m]+x}" ] || { echo "$0: METHODS: no method '$m' (${!methods[*]})" >&2; exit 2; }
done
for m in $todo; do
  for s in $seeds; do
    run="dermamnist_${m}_s${s}"
    [ -f "$out/$run/metrics.json" ] && continue
    # shellcheck disable=SC2086
    ioisray train ${methods[$m]} data.root="$root" diffusion.model_dir="$unet" output_dir="$out" \
      seed="$s" name="$run" ${EXTRA:-}
  done
done
python benchmarks/summarize.py "$out"/dermamnist_*/metrics.json
