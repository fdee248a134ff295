#!/usr/bin/env bash
# How the demo models shipped in specdm_cli/assets/ were made (CPU, 2 cores, both tasks side by side).
# Usage: examples/train_demo_models.sh WORKDIR   then   python examples/export_demo_models.py WORKDIR
set -euo pipefail
work=${1:?work directory}
mkdir -p "$work"
export SPECDM_HOME="$work/home"
train() {
  local task=$1
  specdm prepare demo --task "$task" --n 1024 --size 32 --seed 11 --out "$work/demo-$task.zarr" --quiet --overwrite
  specdm fit-vae "$work/demo-$task.zarr" --run "$work/run-$task" --overwrite --quiet \
    --image-blocks 32,64,64 --mask-blocks 16,32,32 --norm-groups 8 \
    --batch-size 16 --lr 2e-3 --steps "${VAE_STEPS:-700}" --val-every 350 --checkpoint-every 350 --threads 1
  specdm fit-diffusion "$work/run-$task" --quiet \
    --unet-blocks 64,128,128 --norm-groups 16 --head-dim 32 --layers-per-block 2 \
    --batch-size 32 --lr 5e-4 --steps "${UNET_STEPS:-1200}" --checkpoint-every 400 --threads 1
}
# The two tasks train side by side, one thread each.
train ss &
train cd &
wait
