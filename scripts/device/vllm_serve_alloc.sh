#!/usr/bin/env bash
# vLLM on the GPU under several allocators (issue 14's GPU reference), in one call on the lent GPU host
# (torch + CUDA, no vLLM, no allocator packages, no network): sets up vLLM 0.26.0 (scripts/device/vllm_env.sh),
# unpacks Debian's allocator .debs carried in .debs/ with `dpkg -x`, fills the shared torch.compile cache with
# one uncounted start, then runs `harness serve --allocators` on synthetic:phi3-mini as vllm_serve.sh does
# (bf16, max-model-len 4096, gpu-memory-utilization 0.92): rounds of one fresh server per
# allocator, order rotated each round, until the budget is spent (--max-time), every server's allocator
# verified in its API server and engine core.
# Everything lands in $OUT/$NAME.tar.gz (the device returns at most 8 files).
#
# Carry: .device/vllm-gpu (cp -r ../shared/vllm-gpu .device/), .debs (here:
#   mkdir -p .debs && cd .debs && apt-get download libjemalloc2 libtcmalloc-minimal4 libmimalloc2.0), .whl optional.
# Usage: OUT=... bash scripts/device/vllm_serve_alloc.sh [extra `harness serve` flags]
# Environment: ALLOCATORS (glibc,jemalloc), COLD_STARTS (rounds before the first precision check, 2; the
#   rounds go on while the budget lasts), TARGET_CI (percent, optional), WARM_REQUESTS (10), MAX_TOKENS (64),
#   WARMUP (1: one uncounted start first, so that no arm pays the compile-cache miss; 0 on a warm machine
#   whose ~/.cache/vllm is filled), BUDGET_S (SIGINT after, so the report is written inside the device's
#   10-minute limit: 540), NAME (result folder), VLLM_TREE, VSITE.
# On an ordinary NVIDIA host: `make vllm && make system`, then
#   .venv/bin/harness serve --engine vllm --model synthetic:phi3-mini --dtype bfloat16 --max-model-len 4096 \
#     --gpu-memory-utilization 0.92 --compile-cache shared --allocators glibc,jemalloc --cold-starts 3
set -uo pipefail
OUT=${OUT:?set OUT to where the result archive goes}
NAME=${NAME:-vllm-serve-alloc}
WORK=/tmp/serve-work
t0=$(date +%s)
source scripts/device/vllm_env.sh  # /tmp/vpy: the vLLM server's Python
LIBS=/tmp/alloc-libs
mkdir -p "$LIBS"
for deb in .debs/*.deb; do dpkg -x "$deb" "$LIBS"; done
lib=$LIBS/usr/lib/$(uname -m)-linux-gnu
libs=()
for pair in "jemalloc=libjemalloc.so.2" "tcmalloc=libtcmalloc_minimal.so.4" "mimalloc=libmimalloc.so.2"; do
  real=$(readlink -f "$lib/${pair#*=}" 2>/dev/null) && [ -f "$real" ] && libs+=(--allocator-lib "${pair%%=*}=$real")
done
echo "allocator libraries: ${libs[*]:-none unpacked}"
rm -rf "${WORK:?}/$NAME" "${WORK:?}/$NAME-warmup"
mkdir -p "$WORK"
common=(--engine vllm --vllm-python "$VPY" --model synthetic:phi3-mini --dtype bfloat16 --max-model-len 4096
  --gpu-memory-utilization 0.92 --max-tokens "${MAX_TOKENS:-64}" --sample-hz 20 --compile-cache shared
  --model-cache /tmp/models --server-arg=--attention-backend --server-arg=FLASH_ATTN)
echo "set-up took $(( $(date +%s) - t0 )) s"
if [ "${WARMUP:-1}" = 1 ]; then  # fills ~/.cache/vllm (torch.compile, Triton): every counted start then hits it
  PYTHONUNBUFFERED=1 timeout -s INT 300 $PY -m harness.cli serve "${common[@]}" --cold-starts 1 --warm-requests 1 \
    --out "$WORK/$NAME-warmup" 2>&1 | grep -E "server 0|error" | grep -v "━"
fi
left=$(( ${BUDGET_S:-540} - ($(date +%s) - t0) ))
echo "comparison budget: $left s"
if [ "$left" -gt 60 ]; then
  # --max-time: no server is started that would likely end after the budget (rounds go on until then, or
  # until TARGET_CI is reached from round COLD_STARTS on); timeout's SIGINT is only the backstop.
  target=(); [ -n "${TARGET_CI:-}" ] && target=(--target-ci "$TARGET_CI")
  PYTHONUNBUFFERED=1 timeout -s INT "$left" $PY -m harness.cli serve "${common[@]}" \
    --allocators "${ALLOCATORS:-glibc,jemalloc}" "${libs[@]}" --cold-starts "${COLD_STARTS:-2}" \
    --max-time "$(( left - 20 ))s" "${target[@]}" --warm-requests "${WARM_REQUESTS:-10}" --out "$WORK/$NAME" "$@" \
    2>&1 | grep -v "━"
  echo "harness serve exit code: ${PIPESTATUS[0]}"
else
  echo "no time left for the comparison (set-up and warm-up took it): run again on the warm machine with WARMUP=0"
fi
kept=()
for d in "$NAME" "$NAME-warmup"; do [ -d "$WORK/$d" ] && kept+=("$d"); done
[ ${#kept[@]} -gt 0 ] && tar -C "$WORK" -czf "$OUT/$NAME.tar.gz" "${kept[@]}"
ls -la "$OUT"
