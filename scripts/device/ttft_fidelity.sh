#!/usr/bin/env bash
# Client fidelity on the lent GPU (issue 11): scripts/bench_ttft_accuracy.py --fidelity against vLLM 0.26.0
# serving synthetic:phi3-mini on the GPU, the harness's client against `vllm bench serve` (its Python API
# from the same vLLM tree), server and clients on separate halves of the host's CPUs. On a GPU host the
# clients' own CPU work cannot slow the server's decode as it does on a 2-vCPU machine.
# Writes $OUT/$NAME/output.txt and environment.json (--save).
# Carry: .device/vllm-gpu (cp -r ../shared/vllm-gpu .device/).
# Environment: NAME (ttft-fidelity), REQUESTS (100), BATCHES (20), VLLM_TREE, VSITE.
set -uo pipefail
OUT=${OUT:?set OUT to where the results go}
source scripts/device/vllm_env.sh  # /tmp/vpy: vLLM's Python (server and vLLM's client)
PYTHONUNBUFFERED=1 PYTHONPATH=$PWD timeout -s INT 540 $PY scripts/bench_ttft_accuracy.py --fidelity \
  --vllm-python "$VPY" --model synthetic:phi3-mini --dtype bfloat16 --gpu-memory-utilization 0.9 \
  --server-arg=--attention-backend --server-arg=FLASH_ATTN --model-cache /tmp/models \
  --fidelity-requests "${REQUESTS:-100}" --batches "${BATCHES:-20}" --floor-token-delay 0.002 --nice -5 \
  --save "$OUT/${NAME:-ttft-fidelity}" "$@"
echo "bench exit code: $?"
