#!/usr/bin/env bash
# Create ./.venv (if needed) and install effconv with everything its tests need; then .venv-timm
# (skipped with --main-only, as the demo does). Safe to run again: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
.venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "is ignored" || true
# tf-keras (legacy Keras, which `verify` runs as the reference for Keras .h5 sources) for the installed
# TensorFlow's version, without its dependencies: it names the full `tensorflow` wheel, which would replace
# tensorflow-cpu with a CUDA build.
tf_minor=$(.venv/bin/python -c "import tensorflow as tf; print('.'.join(tf.__version__.split('.')[:2]))" 2>/dev/null)
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps "tf-keras==${tf_minor}.*" 2>&1 \
  | grep -v "is ignored" || true
.venv/bin/python -c "import effconv, torch, tensorflow, tf_keras" 2>/dev/null || {
  echo "bootstrap: installation incomplete" >&2
  exit 1
}
[ "${1:-}" = "--main-only" ] && exit 0

# A second environment, .venv-timm, for the tests that load converted files into timm and mmpretrain
# themselves. timm needs torchvision, whose only build here pairs with torch 2.14.1, a large CUDA build
# whose `import torch` alone costs ~650 MB: kept out of .venv so that conversion stays lean.
if [ ! -x .venv-timm/bin/python ]; then
  "$PYTHON" -m venv .venv-timm
fi
.venv-timm/bin/pip install --quiet --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" "timm>=1.0" \
  safetensors "mmpretrain==1.2.0" "mmengine==0.10.7" "mmcv-lite==2.2.0" numpy click google-crc32c isal tqdm pillow \
  onnx onnxruntime onnxscript "transformers==5.24.0" \
  2>&1 | grep -v "is ignored" || true
.venv-timm/bin/pip install --quiet --disable-pip-version-check --no-deps -e . 2>&1 | grep -v "is ignored" || true
.venv-timm/bin/python -c "import effconv, timm, torchvision, safetensors, mmpretrain.models, transformers" >/dev/null 2>&1 || {
  echo "bootstrap: .venv-timm installation incomplete" >&2
  exit 1
}
