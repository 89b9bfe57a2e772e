#!/usr/bin/env bash
# The lesion-grouped HAM10000 runs at CPU scale (configs/ham10000_cpu_benchmark.yaml), one after another,
# resumable: a run whose metrics.json exists is skipped, and an interrupted one resumes from its last
# checkpoint when rerun.
#   usage: benchmarks/ham10000_cpu.sh DATA_ROOT OUT_DIR STEP...
# STEP is one of
#   METHOD:SEEDS        e.g. ce:0,1,2  -> runs ham10000_cpu_<METHOD>_s<seed> with the overrides that
#                       configs/ham10000_cpu_benchmark.yaml gives METHOD
#   pretrain:EPOCHS     the diffusion model (configs/pretrain_ham10000_cpu.yaml, in-process), EMA
#                       snapshots every 10 epochs in OUT_DIR/ham10000_cpu_diffusion/snapshots/; with
#                       PRESET=small32 (any diffusion.preset but tiny) in OUT_DIR/ham10000_cpu_diffusion_small32/
#   judge:GUIDE,JUDGE   benchmarks/judge_curve.sh on those snapshots, guided by run GUIDE, judged by JUDGE
# EXTRA='key=value ...' are added to every train run of the queue (after the method's own), e.g. the
# judge of diffult's filter: EXTRA='synthesis.filter=0.3 synthesis.filter_model=OUT_DIR/<a real-data run>'.
# IOIS methods use the generator in $UNET (default: the pretraining run's epoch-10 snapshot, or its final
# model when it ran 10 epochs: pretraining keeps no snapshot of its last epoch).
set -euo pipefail
root=${1:?usage: $0 DATA_ROOT OUT_DIR STEP...}; out=${2:?OUT_DIR}; shift 2
read -r -a common <<< "${EXTRA:-}"  # as dermamnist_iois.sh takes them
preset=${PRESET:-tiny}
diffusion="$out/ham10000_cpu_diffusion"; [ "$preset" = tiny ] || diffusion="${diffusion}_$preset"
generator() {  # resolved at each run: a pretrain step earlier in the same queue makes it
  if [ -n "${UNET:-}" ]; then echo "$UNET"
  elif [ -d "$diffusion/snapshots/epoch_00010" ]; then echo "$diffusion/snapshots/epoch_00010"
  else echo "$diffusion/unet"; fi
}
overrides() {  # the benchmark file's overrides for one method, one per line
  python - "$1" <<'PY'
import sys, yaml
methods = yaml.safe_load(open("configs/ham10000_cpu_benchmark.yaml"))["benchmark"]["methods"]
if sys.argv[1] not in methods:
    sys.exit(f"configs/ham10000_cpu_benchmark.yaml has no method {sys.argv[1]!r}: {sorted(methods)}")
for override in methods[sys.argv[1]]:
    print(override)
PY
}
for step in "$@"; do
  kind=${step%%:*}; arg=${step#*:}
  case $kind in
    pretrain)
      [ -f "$diffusion/unet/diffusion_pytorch_model.safetensors" ] && continue
      ioisray pretrain-diffusion configs/pretrain_ham10000_cpu.yaml data.root="$root" output_dir="$out" \
        name="$(basename "$diffusion")" diffusion.preset="$preset" pretrain.epochs="$arg" ray.num_workers=0 ;;
    judge)
      benchmarks/judge_curve.sh "$diffusion" "$out/${arg%,*}" "$out/${arg#*,}" | tee "$diffusion/judge_curve.md" ;;
    *)
      list=$(overrides "$kind")  # stops the queue (set -e) on a method the config lacks, before any run
      extra=(); [ -z "$list" ] || mapfile -t extra <<< "$list"
      for s in ${arg//,/ }; do
        name="ham10000_cpu_${kind}_s${s}"
        [ -f "$out/$name/metrics.json" ] && continue
        ioisray train configs/ham10000_cpu.yaml data.root="$root" diffusion.model_dir="$(generator)" \
          output_dir="$out" seed="$s" name="$name" "${extra[@]}" "${common[@]}"
      done ;;
  esac
done
