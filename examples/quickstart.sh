#!/usr/bin/env bash
# The demo walk-through: prepare built-in scenes for both tasks and inspect them.
set -euo pipefail
out=${1:-./specdm-demo}
mkdir -p "$out"
specdm prepare demo --task ss --n 256 --out "$out/demo-ss.zarr" --overwrite
specdm prepare demo --task cd --n 256 --out "$out/demo-cd.zarr" --overwrite --format geotiff
specdm inspect "$out/demo-ss.zarr"
specdm inspect "$out/demo-cd.zarr" --json > "$out/demo-cd.json"
echo "stores in $out"
