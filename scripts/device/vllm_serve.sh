#!/usr/bin/env bash
# The GPU vLLM serving reference in one call on a host with torch + CUDA but no vLLM and no network
# (the lent GPU machine): unpacks the shared vLLM 0.26.0 tree, installs py-spy from a carried wheel, and
# runs `harness serve --engine vllm` on synthetic:phi3-mini as the seed does (bf16, max-model-len 4096,
# gpu-memory-utilization 0.92), with start-up stacks, idle gaps and the 20 Hz NVML timeline.
# Everything lands in $OUT/$NAME.tar.gz (the device returns at most 8 files).
#
# Carry: .device/vllm-gpu (cp -r ../shared/vllm-gpu .device/), .whl (py-spy wheel).
# Usage: OUT=... bash scripts/device/vllm_serve.sh [extra `harness serve` flags]
# Environment: NAME (result folder), COLD_STARTS (3), COMPILE_CACHE (fresh|shared), BUDGET_S (SIGINT after,
#   so the harness writes its report inside the device's 10-minute limit), VLLM_TREE, VSITE.
# On an ordinary NVIDIA host none of this is needed: `make vllm` (pip install vllm==0.26.0), then
#   .venv/bin/harness serve --engine vllm --model synthetic:phi3-mini --dtype bfloat16 --max-model-len 4096 \
#     --gpu-memory-utilization 0.92 --cold-starts 3 --idle-gaps 0,1,10 --profile-startup
set -uo pipefail
OUT=${OUT:?set OUT to where the result archive goes}
PY=${PY:-python3}
TREE=${VLLM_TREE:-.device/vllm-gpu}
VSITE=${VSITE:-/tmp/vsite}
NAME=${NAME:-vllm-serve}
WORK=/tmp/serve-work
t0=$(date +%s)
nvidia-smi --query-gpu=name,uuid,driver_version,memory.total --format=csv,noheader
if [ ! -d "$VSITE/vllm" ]; then
  bash "$TREE/install.sh" "$TREE" "$VSITE" 2>&1 | grep -E "^==|passed|FAILED|FA3|Python.h|^torch|^0\." || true
fi
if ls .whl/py_spy*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/pyspy .whl/py_spy*.whl && export PATH=/tmp/pyspy/bin:$PATH
fi
echo "py-spy: $(command -v py-spy || echo missing)"
# The vLLM server's Python: the machine's torch venv with the unpacked tree in front (vllm-gpu/README.md).
inc=""
[ -f "$($PY -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] \
  || inc="export C_INCLUDE_PATH=$VSITE/_py312_include/python3.12; "
printf '#!/bin/sh\n%sexport PYTHONPATH=%s VLLM_USE_FLASHINFER_SAMPLER=0 TVM_FFI_DISABLE_TORCH_C_DLPACK=1\nexec %s "$@"\n' \
  "$inc" "$VSITE" "$(command -v $PY)" > /tmp/vpy
chmod +x /tmp/vpy
rm -rf "${WORK:?}/$NAME"
mkdir -p "$WORK"
echo "set-up took $(( $(date +%s) - t0 )) s"
PYTHONUNBUFFERED=1 timeout -s INT "${BUDGET_S:-540}" $PY -m harness.cli serve --engine vllm --vllm-python /tmp/vpy \
  --model synthetic:phi3-mini --dtype bfloat16 --max-model-len 4096 --gpu-memory-utilization 0.92 \
  --cold-starts "${COLD_STARTS:-3}" --warm-requests 5 --idle-gaps 0,1,10 --max-tokens 64 --sample-hz 20 \
  --compile-cache "${COMPILE_CACHE:-fresh}" --profile-startup --model-cache /tmp/models \
  --server-arg=--attention-backend --server-arg=FLASH_ATTN --out "$WORK/$NAME" "$@" 2>&1 | grep -v "━"
echo "harness serve exit code: ${PIPESTATUS[0]}"
tar -C "$WORK" -czf "$OUT/$NAME.tar.gz" "$NAME"
ls -la "$OUT"
