#!/usr/bin/env bash
# The main job on a built-in example: write a small official-format checkpoint,
# inspect it, convert it, and verify the result against TensorFlow.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --main-only
export TF_CPP_MIN_LOG_LEVEL=2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/effconv synth --arch b0 --out "$work/efficientnet-b0" --seed 1
.venv/bin/effconv inspect --src "$work/efficientnet-b0"
.venv/bin/effconv convert --src "$work/efficientnet-b0" --out "$work/b0.pth" --variant standard
.venv/bin/effconv verify --src "$work/efficientnet-b0" --weights "$work/b0.pth" --per-layer
