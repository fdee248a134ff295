#!/usr/bin/env bash
# How the demo models shipped in specdm_cli/assets/ were made (CPU, 2 cores, both tasks side by side).
# Usage: examples/train_demo_models.sh WORKDIR   then   python examples/export_demo_models.py WORKDIR
# 64x64 scenes, f = 4 (16x16 latents); networks small enough that both tasks ship in < 8 MB
# (fp16 on export) and train in < 60 min on 2 cores. examples/check_demo_models.py gates them.
set -euo pipefail
work=${1:?work directory}
mkdir -p "$work"
export SPECDM_HOME="$work/home"
# Steps: the cd image branch sees both phases of a pair, so 150 cd steps train it on as many
# images as 300 ss steps. 1000 U-Net steps of 32 latents (about two passes over the 8 D4 views
# of the train split) were what the session's time allowed; the figures gate them (see
# examples/check_demo_models.py).
train() {
  local task=$1 vae_steps=$2
  specdm prepare demo --task "$task" --n 2048 --size 64 --seed 11 --out "$work/demo-$task.zarr" --quiet --overwrite
  specdm fit-vae "$work/demo-$task.zarr" --run "$work/run-$task" --overwrite --quiet \
    --image-blocks 16,32,32 --mask-blocks 8,16,16 --norm-groups 8 \
    --batch-size 16 --lr 2e-3 --steps "$vae_steps" --val-every 300 --checkpoint-every 300 --threads 1
  specdm fit-diffusion "$work/run-$task" --quiet \
    --unet-blocks 32,64,64 --norm-groups 16 --head-dim 32 --layers-per-block 1 \
    --batch-size 32 --lr 1e-3 --steps "${UNET_STEPS:-1000}" --val-every 1000 --checkpoint-every 500 --threads 1
}
# The two tasks train side by side, one thread each.
train ss "${VAE_STEPS_SS:-300}" &
train cd "${VAE_STEPS_CD:-150}" &
wait
