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
#   so the harness writes its report inside the device's 10-minute limit), VLLM_TREE, VSITE (scripts/device/vllm_env.sh).
# On an ordinary NVIDIA host none of this is needed: `make vllm` (pip install vllm==0.26.0), then
#   .venv/bin/harness serve --engine vllm --model synthetic:phi3-mini --dtype bfloat16 --max-model-len 4096 \
#     --gpu-memory-utilization 0.92 --cold-starts 3 --idle-gaps 0,1,10 --profile-startup
set -uo pipefail
OUT=${OUT:?set OUT to where the result archive goes}
NAME=${NAME:-vllm-serve}
WORK=/tmp/serve-work
t0=$(date +%s)
source scripts/device/vllm_env.sh  # /tmp/vpy: the vLLM server's Python
rm -rf "${WORK:?}/$NAME"
mkdir -p "$WORK"
echo "set-up took $(( $(date +%s) - t0 )) s"
PYTHONUNBUFFERED=1 timeout -s INT "${BUDGET_S:-540}" $PY -m harness.cli serve --engine vllm --vllm-python "$VPY" \
  --model synthetic:phi3-mini --dtype bfloat16 --max-model-len 4096 --gpu-memory-utilization 0.92 \
  --cold-starts "${COLD_STARTS:-3}" --warm-requests 5 --idle-gaps 0,1,10 --max-tokens 64 --sample-hz 20 \
  --compile-cache "${COMPILE_CACHE:-fresh}" --profile-startup --model-cache /tmp/models \
  --server-arg=--attention-backend --server-arg=FLASH_ATTN --out "$WORK/$NAME" "$@" 2>&1 | grep -v "━"
echo "harness serve exit code: ${PIPESTATUS[0]}"
tar -C "$WORK" -czf "$OUT/$NAME.tar.gz" "$NAME"
ls -la "$OUT"
