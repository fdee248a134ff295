#!/usr/bin/env bash
# The demo walk-through: prepare built-in scenes, synthesize with the shipped demo models, inspect,
# benchmark. Usage: examples/quickstart.sh [WORKDIR]     (default ./specdm-demo)
# About 3 min on 2 CPU cores. CI runs it smaller through the environment variables below
# (N scenes per store, SAMPLES synthetic pairs, FEATURE_STEPS of the benchmark's feature network).
set -euo pipefail
out=${1:-./specdm-demo}
n=${N:-256}
samples=${SAMPLES:-64}
feature_steps=${FEATURE_STEPS:-400}
# The shipped demo models make 64 px pairs (README, synthesize); the benchmark compares stores of
# one size, so the real scenes are 64 px too.
size=64
mkdir -p "$out"
specdm prepare demo --task ss --n "$n" --size "$size" --out "$out/demo-ss.zarr" --overwrite
specdm prepare demo --task cd --n "$n" --size "$size" --out "$out/demo-cd" --overwrite --format geotiff
specdm synthesize --model demo --task ss --n "$samples" --out "$out/syn-ss.zarr" --overwrite --preview "$out/syn-ss.png"
specdm synthesize --model demo --task cd --n "$samples" --out "$out/syn-cd.zarr" --overwrite --preview "$out/syn-cd.png"
specdm inspect "$out/syn-ss.zarr"
specdm inspect "$out/demo-cd" --json > "$out/demo-cd.json"
# The walk-through ends with a report: quality, reconstruction, pairs/s (README, Benchmark).
specdm benchmark --real "$out/demo-ss.zarr" --synthetic "$out/syn-ss.zarr" --model demo \
  --feature-steps "$feature_steps" --out "$out/syn-ss-benchmark" --overwrite
echo "stores, previews and the report ($out/syn-ss-benchmark/report.md) in $out"
