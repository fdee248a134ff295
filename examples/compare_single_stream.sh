#!/usr/bin/env bash
# Two-stream SpecDM against the single-stream LDM baseline (paper Tables 1, 2, 5), at one small,
# equal CPU budget: the same demo store, seed, steps and network widths for both arms.
# Usage: examples/compare_single_stream.sh WORKDIR [TASK]      (TASK: ss, the default, or cd)
# Trains (a) the two-stream model and (b) `fit-vae --single-stream`, synthesizes SAMPLES pairs
# with each, benchmarks both against the demo store's held-out splits (the second with
# --compare on the first report) and prints the side-by-side table of
# WORKDIR/bench-TASK-single-stream/report.md. About 20 min on 2 shared CPU cores for ss.
# The budget is small on purpose: it compares the two designs at equal cost, it does not reach
# the paper's quality. Override with the environment variables below (e.g. DOWNSTREAM_STEPS=0
# to skip the downstream rows, THREADS=2 on an idle machine).
set -euo pipefail

work=${1:?usage: $0 WORKDIR [ss|cd]}
task=${2:-ss}
case "$task" in
  ss | cd) ;;
  *) echo "TASK must be ss or cd, not '$task'" >&2; exit 2 ;;
esac

n=${N:-512}                              # demo scenes (about 82% train, the rest val + test)
size=${SIZE:-32}                         # scene size: 32 px -> 8x8 latents (f = 4)
seed=${SEED:-11}                         # demo scenes; training and sampling use seed 0
vae_steps=${VAE_STEPS:-300}
vae_lr=${VAE_LR:-2e-3}                   # 1e-3 for runs past ~1,000 steps (train_demo_models.sh)
unet_steps=${UNET_STEPS:-400}
prediction=${PREDICTION:-v_prediction}   # the demo models' U-Net target (README, fit-diffusion)
samples=${SAMPLES:-256}
downstream_steps=${DOWNSTREAM_STEPS:-200}  # step cap per phase (a quick look; the CLI: 3000); 0: no rows
real_limit=${REAL_LIMIT:-100}
feature_steps=${FEATURE_STEPS:-400}       # the benchmark's feature network (its default)
threads=${THREADS:-1}                    # per process: the two arms train side by side
bench_threads=${BENCH_THREADS:-2}        # the benchmarks run one after the other

mkdir -p "$work"
work=$(cd "$work" && pwd)
export SPECDM_HOME="$work/home"         # runs and the feature cache stay out of the user's registry
store="$work/demo-$task.zarr"
start=$SECONDS

log() { printf '[%4ds] %s\n' "$((SECONDS - start))" "$*" >&2; }

log "prepare demo --task $task --n $n --size $size"
specdm prepare demo --task "$task" --n "$n" --size "$size" --seed "$seed" --out "$store" \
  --quiet --overwrite

# One arm: VAE, U-Net, samples. Everything but --single-stream is the same for both arms.
arm() {
  local name=$1
  shift
  local run="$work/run-$task-$name"
  log "$name: fit-vae ($vae_steps steps)"
  specdm fit-vae "$store" --run "$run" --overwrite --quiet "$@" \
    --image-blocks 16,32,32 --mask-blocks 8,16,16 --norm-groups 8 \
    --batch-size 16 --lr "$vae_lr" --steps "$vae_steps" --seed 0 \
    --val-every "$vae_steps" --checkpoint-every "$vae_steps" --workers 1 --threads "$threads" \
    --semantic-weight 0 --mask-latent-channels 3  # the paper's loss and layout, as README measured
  log "$name: fit-diffusion ($unet_steps steps)"
  specdm fit-diffusion "$run" --quiet \
    --unet-blocks 32,64,64 --layers-per-block 1 --norm-groups 16 --head-dim 32 \
    --batch-size 32 --lr 1e-3 --steps "$unet_steps" --seed 0 \
    --val-every "$unet_steps" --checkpoint-every "$unet_steps" --threads "$threads" \
    --prediction "$prediction"
  log "$name: synthesize $samples pairs"
  specdm synthesize --model "$run" --n "$samples" --seed 0 --out "$work/syn-$task-$name.zarr" \
    --overwrite --quiet --threads "$threads"
  log "$name: done"
}

arm two-stream &
two=$!
arm single-stream --single-stream &
single=$!
status=0
wait "$two" || status=$?
wait "$single" || status=$?
if [ "$status" -ne 0 ]; then
  echo "training failed (exit $status)" >&2
  exit "$status"
fi

downstream=()
if [ "$downstream_steps" -gt 0 ]; then
  downstream=(--downstream --real-limit "$real_limit" --synthetic-ratio 1,2
    --downstream-max-steps "$downstream_steps")
fi

bench() {
  local name=$1
  shift
  log "benchmark $name"
  specdm benchmark --real "$store" --synthetic "$work/syn-$task-$name.zarr" \
    --model "$work/run-$task-$name" --label "$name" --out "$work/bench-$task-$name" \
    ${downstream[@]+"${downstream[@]}"} --feature-steps "$feature_steps" \
    --threads "$bench_threads" --overwrite --quiet "$@" \
    >/dev/null
}

bench two-stream
bench single-stream --compare "$work/bench-$task-two-stream/report.json"

report="$work/bench-$task-single-stream/report.md"
log "done: $work/bench-$task-two-stream/report.md and $report"
echo "task $task; $n demo scenes of ${size}px (seed $seed); both arms: fit-vae $vae_steps steps (lr $vae_lr)," \
  "fit-diffusion $unet_steps steps ($prediction), $samples samples; downstream steps $downstream_steps;" \
  "wall $((SECONDS - start)) s"
# The comparison section: figure | single-stream | two-stream | difference (single - two).
awk '/^## Comparison with/ {on = 1} on && /^## / && !/^## Comparison/ {exit} on' "$report"
