#!/usr/bin/env bash
# The reference GPU runs (issue: publish H100 results), in one call on a host with torch + CUDA but no vLLM,
# no allocator packages and no network:
#   1. `harness serve --engine transformers` on synthetic:phi3-mini (transformers[serving] deps carried as wheels
#      in .whl/), 2 cold starts;
#   2. the allocator A/B resumed from results/reference/h100-phi3-mini (allocator .debs carried in .debs/),
#      for whatever time is left under the device's 10-minute command limit.
# Everything lands in $OUT/reference.tar.gz (the device returns at most 8 files).
set -uo pipefail
OUT=${OUT:?}
PY=${PY:-python3}
WORK=/tmp/work
rm -rf "$WORK" /tmp/site  # a warm machine keeps the previous call's files
mkdir -p "$WORK"
t0=$(date +%s)
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
tf_cmd="$(command -v transformers || echo "$PY -m transformers.cli.transformers")"
echo "transformers serve command: $tf_cmd"
timeout -s INT "${SERVE_BUDGET_S:-240}" $PY -m harness.cli serve --engine transformers --transformers-cmd "$tf_cmd" \
  --model synthetic:phi3-mini --device cuda --cold-starts "${COLD_STARTS:-2}" --warm-requests 5 --max-tokens 16 \
  --sample-hz 20 --model-cache /tmp/models --out "$WORK/serve-h100" 2>&1 | tail -40
echo "harness serve exit code: ${PIPESTATUS[0]}"
mkdir -p "$WORK/alloc-resume" && cp -r results/reference/h100-phi3-mini "$WORK/alloc-resume/"
left=$(( ${TOTAL_BUDGET_S:-560} - ($(date +%s) - t0) ))
echo "alloc budget: $left s"
if [ "$left" -gt 60 ]; then
  OUT="$WORK/alloc-resume" BUDGET_S=$left RUNS=${RUNS:-10} bash scripts/device/h100_alloc.sh --resume 2>&1 \
    | grep -v -E "━|Writing model" | tail -15
fi
tar -C "$WORK" -czf "$OUT/reference.tar.gz" serve-h100 alloc-resume 2>/dev/null || tar -C "$WORK" -czf "$OUT/reference.tar.gz" .
ls -la "$OUT"
