#!/usr/bin/env bash
# The demo walk-through: prepare built-in scenes, synthesize with the shipped demo models, inspect.
set -euo pipefail
out=${1:-./specdm-demo}
mkdir -p "$out"
specdm prepare demo --task ss --n 256 --size 32 --out "$out/demo-ss.zarr" --overwrite
specdm prepare demo --task cd --n 256 --out "$out/demo-cd.zarr" --overwrite --format geotiff
specdm synthesize --model demo --task ss --n 64 --out "$out/syn-ss.zarr" --overwrite --preview "$out/syn-ss.png"
specdm synthesize --model demo --task cd --n 64 --out "$out/syn-cd.zarr" --overwrite --preview "$out/syn-cd.png"
specdm inspect "$out/syn-ss.zarr"
specdm inspect "$out/demo-cd.zarr" --json > "$out/demo-cd.json"
# The walk-through ends with a report: quality, reconstruction, pairs/s (README, Benchmark).
specdm benchmark --real "$out/demo-ss.zarr" --synthetic "$out/syn-ss.zarr" --model demo --out "$out/syn-ss-benchmark" --overwrite
echo "stores, previews and the report ($out/syn-ss-benchmark/report.md) in $out"
