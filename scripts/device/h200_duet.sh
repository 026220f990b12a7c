#!/usr/bin/env bash
# The duet design on the lent GPU: A/A calibrations (glibc against itself) with the probes on split and on
# shared CPUs, then the allocators against glibc with the placement whose A/A CI came out narrower; each
# stopped by --target-ci or --max-time; results as one archive in $OUT.
# Carry: .debs (Debian's libjemalloc2, libtcmalloc-minimal4, libmimalloc2.0 .debs: `apt-get download` here).
# Environment: ALLOCATORS (default all four), TARGET_CI (percent, default 1), AA_TIME (default 1m50s each),
#   AB_TIME (default 3m30s), STEPS (--windows-per-set, default 10), METRIC (itl_p25), MAX_NEW_TOKENS (32),
#   NAME (h200-phi3-mini-duet), PLACEMENT (split|shared: skip the A/As, use it), RESUME=1 (add sets to $NAME).
# Usage: bash scripts/device/h200_duet.sh [extra harness alloc flags]
set -uo pipefail
PY=${PY:-python3}
NAME=${NAME:-h200-phi3-mini-duet}
BASE=/tmp/results
DIR=$BASE/$NAME
LIBS=/tmp/alloc-libs
mkdir -p "$LIBS" "$BASE"
[ -d "results/incoming/$NAME" ] && cp -r "results/incoming/$NAME" "$BASE/"  # RESUME: the earlier call's results
for deb in .debs/*.deb; do dpkg -x "$deb" "$LIBS"; done
lib=$LIBS/usr/lib/x86_64-linux-gnu
nvidia-smi --query-gpu=name,uuid,driver_version,memory.total --format=csv,noheader
$PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())'
common=(--runner local --device cuda --model synthetic:phi3-mini --design duet --max-new-tokens "${MAX_NEW_TOKENS:-32}"
  --allocator-lib "jemalloc=$lib/libjemalloc.so.2" --allocator-lib "tcmalloc=$(ls $lib/libtcmalloc_minimal.so.4.*)"
  --allocator-lib "mimalloc=$(ls $lib/libmimalloc.so.2.*)" --target-ci "${TARGET_CI:-1}" --metric "${METRIC:-itl_p25}"
  --windows-per-set "${STEPS:-10}")
widest() { $PY -c 'import json,sys; e=[json.loads(l) for l in open(sys.argv[1])]; s=[x for x in e if x.get("event")=="stop"]; print(s[-1]["widest"] if s else 9)' "$1" 2>/dev/null || echo 9; }
placement=${PLACEMENT:-}
if [ -z "$placement" ]; then
  for p in split shared; do
    timeout -s INT 150 $PY -m harness.cli alloc "${common[@]}" --allocators glibc --calibrate --cpu-placement $p \
      --max-time "${AA_TIME:-1m50s}" --out "$BASE/$NAME-aa-$p" "$@"
    echo "A/A ($p) exit code: $?"
  done
  split=$(widest "$BASE/$NAME-aa-split/calibration/alloc/stopping.jsonl")
  shared=$(widest "$BASE/$NAME-aa-shared/calibration/alloc/stopping.jsonl")
  placement=$($PY -c 'import sys; print("split" if float(sys.argv[1]) <= float(sys.argv[2]) else "shared")' "$split" "$shared")
  echo "A/A widest CI: split $split, shared $shared: the A/B runs with --cpu-placement $placement"
  mkdir -p "$DIR" && cp -r "$BASE/$NAME-aa-$placement/calibration" "$DIR/"
fi
resume=(); [ -n "${RESUME:-}" ] && resume=(--resume)
timeout -s INT 260 $PY -m harness.cli alloc "${common[@]}" --allocators "${ALLOCATORS:-glibc,jemalloc,tcmalloc,mimalloc}" \
  --cpu-placement "$placement" --max-time "${AB_TIME:-3m30s}" --out "$DIR" "${resume[@]}" "$@"
echo "A/B exit code: $?"
tar -C "$BASE" -czf "$OUT/$NAME.tgz" .
