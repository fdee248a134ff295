#!/bin/bash
# The CUDA paths and the GPU figures of one lent GPU machine, in one short run (issue 18, §5):
# synthesis of the shipped demo models in fp32 and bf16 (pairs/s, wall, cuda_peak_bytes), a
# 128 px model trained a few steps with the gpu preset (fit-vae, fit-diffusion, the latent-cache
# benchmark, its synthesis), and `specdm distill` with the distilled sampler. Each stage has its
# own time limit and the script goes on after a failure, so one run reports all it can; its
# first run on an H200 took over 560 s with 10,000-pair cd runs and a batch-512 row, so those
# are left out and the 128 px model samples N_128 pairs (about 8 minutes all told).
#
#     bash examples/gpu_check.sh [GPUS] [N] [TRAIN_STEPS] [N_128]  # defaults: 0 10000 50 2000
#
# GPUS "" runs the same commands on the CPU: a dry run of this script (.ci/run's), with a small
# N and SIZE=32 SCENES=32 PRESET=cpu DISTILL_STEPS=2 TRAJECTORIES=8 CACHE_STEPS=2 (the gpu
# preset takes minutes a step on a CPU), CACHE_BATCH=8 and VAE_FLAGS="--semantic-steps 2" (the
# cpu preset trains its semantic term's segmenter first: 40 s). The exit status is 1 when any
# stage failed.
set -u
gpus=${1-0}
n=${2:-10000}
train_steps=${3:-50}
n_128=${4:-2000}
work=$(mktemp -d "${TMPDIR:-/tmp}/specdm-gpu-XXXXXX")
device=()
[ -n "$gpus" ] && device=(--gpus "$gpus")
size=${SIZE:-128}
export PYTHONUNBUFFERED=1
failed=0

# One line of figures from a command's --json summary; its stderr tail when it fails.
run() {
    local label=$1 limit=$2
    shift 2
    local started=$SECONDS guard=()
    [ -n "$gpus" ] && guard=(timeout "$limit")  # device time is scarce; a dry run has no limits
    if "${guard[@]}" "$@" --json >"$work/out.json" 2>"$work/err.txt"; then
        python3 - "$label" "$((SECONDS - started))" "$work/out.json" <<'EOF'
import json, sys
label, wall, path = sys.argv[1], sys.argv[2], sys.argv[3]
summary = json.loads(open(path).read())
keys = ("n", "pairs_per_second", "seconds", "cuda_peak_bytes", "steps", "steps_per_second",
        "batch_size", "precision", "sampler", "validation", "write_seconds")
figures = {k: summary[k] for k in keys if k in summary}
if figures.get("cuda_peak_bytes"):
    figures["cuda_peak_mib"] = round(figures.pop("cuda_peak_bytes") / 2**20)
print(f"| {label} | {wall} s | {json.dumps(figures)[:400]} |")
EOF
    else
        echo "| $label | FAILED (exit $?) after $((SECONDS - started)) s |"
        failed=1
        tail -c 800 "$work/err.txt"
    fi
}

echo "# $(date -u +%FT%TZ) on $(hostname); work folder $work"
nvidia-smi -L 2>/dev/null
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers',
    diffusers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
echo "| stage | wall | figures |"
echo "|---|---|---|"

for precision in fp32 bf16; do
    run "synthesize demo ss $precision n=$n" 90 specdm synthesize --model demo --task ss \
        --n "$n" --precision "$precision" "${device[@]}" --out "$work/ss-$precision.zarr" --quiet
done
run "synthesize demo cd bf16 n=$n" 90 specdm synthesize --model demo --task cd --n "$n" \
    --precision bf16 "${device[@]}" --out "$work/cd-bf16.zarr" --quiet

# The distilled student of a copy of the shipped ss model, with distill's defaults.
demo_ss=$(python3 -c "from specdm_cli.pipeline.runs.choose import choose_model
print(choose_model('demo', 'ss').path)")
cp -r "$demo_ss" "$work/student"
distill=(--steps "${DISTILL_STEPS:-1000}" --trajectories "${TRAJECTORIES:-512}") # its defaults
run "distill demo ss ${distill[*]}" 120 specdm distill "$work/student" "${distill[@]}" \
    "${device[@]}" --quiet
run "synthesize student ss bf16 n=$n" 90 specdm synthesize --model "$work/student" \
    --sampler distilled --n "$n" --precision bf16 "${device[@]}" --out "$work/student.zarr" --quiet

# 128 x 128 x 10: the gpu preset trained a few steps (speed does not depend on the weights).
run "prepare demo ss $size px" 60 specdm prepare demo --task ss --n "${SCENES:-512}" \
    --size "$size" --out "$work/d128.zarr" --quiet
preset=${PRESET:-gpu}
train=(--preset "$preset" --precision bf16 --steps "$train_steps" "${device[@]}" --quiet)
run "fit-vae $size px $preset preset bf16, $train_steps steps" 120 specdm fit-vae \
    "$work/d128.zarr" --run "$work/run128" "${train[@]}" ${VAE_FLAGS:-}  # unquoted: options split
run "fit-diffusion $size px $preset preset bf16, $train_steps steps" 120 specdm fit-diffusion \
    "$work/run128" "${train[@]}"
for precision in fp32 bf16; do
    run "synthesize $size px $precision n=$n_128" 90 specdm synthesize --model "$work/run128" \
        --n "$n_128" --precision "$precision" "${device[@]}" --out "$work/s128-$precision.zarr" \
        --quiet
done
echo "## latent cache vs encoding every batch, the $size px run"
guard=()
[ -n "$gpus" ] && guard=(timeout 120)
if ! "${guard[@]}" python3 "$(dirname "$0")/bench_latent_cache.py" "$work/run128" \
    --steps "${CACHE_STEPS:-30}" --batch-size "${CACHE_BATCH:-48}" ${gpus:+--gpus "$gpus"} \
    >"$work/cache.txt" 2>&1; then
    echo "FAILED"
    failed=1
fi
tail -n 8 "$work/cache.txt"
rm -rf "$work"
exit "$failed"
