#!/usr/bin/env bash
# The demo walk-through: prepare built-in scenes, synthesize with the shipped demo models, inspect.
set -euo pipefail
out=${1:-./specdm-demo}
mkdir -p "$out"
specdm prepare demo --task ss --n 256 --out "$out/demo-ss.zarr" --overwrite
specdm prepare demo --task cd --n 256 --out "$out/demo-cd.zarr" --overwrite --format geotiff
specdm synthesize --model demo --task ss --n 64 --out "$out/syn-ss.zarr" --overwrite --preview "$out/syn-ss.png"
specdm synthesize --model demo --task cd --n 64 --out "$out/syn-cd.zarr" --overwrite --preview "$out/syn-cd.png"
specdm inspect "$out/syn-ss.zarr"
specdm inspect "$out/demo-cd.zarr" --json > "$out/demo-cd.json"
echo "stores and previews in $out"
