#!/usr/bin/env bash
# Wheelhouse + local base image + probe images, all idempotent (what `make images` runs).
#   scripts/build-images.sh [--device cpu|cuda] [--allocators glibc,jemalloc,tcmalloc,mimalloc] [--rebuild]
#                           [--vllm | --vllm-only]   (+ the vLLM server image: harness-vllm:cpu / vllm/vllm-openai)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m harness.cli images "$@"
