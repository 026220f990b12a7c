#!/usr/bin/env bash
# Allocator A/B on an NVIDIA GPU host that has torch but no allocator packages installed:
# unpacks Debian's allocator .debs (carried in .debs/) and runs `harness alloc` on synthetic:phi3-mini.
# Usage: OUT=/path/to/results bash scripts/device/h100_alloc.sh [extra harness alloc flags, e.g. --resume, --paired]
# Environment: ALLOCATORS (default all four), RUNS, WARM_GENS, WARMUP_RUNS, MAX_NEW_TOKENS, BUDGET_S (seconds before SIGINT), NAME (result folder),
# AFFINITY (a CPU list for --affinity, or "gpu:N": the last N CPUs local to GPU 0, read from sysfs).
# Stopping on precision: TARGET_CI (percent, --target-ci), MAX_TIME (--max-time, e.g. 9m), METRIC (itl_p25 or
# gen_latency), MEASURE_S (the measured window in seconds per run, --measure-s); with TARGET_CI or MAX_TIME,
# RUNS is the rounds before the first check and WARM_GENS is ignored unless MEASURE_S=count.
# The lead's reference: TARGET_CI=3 MAX_TIME=9m ALLOCATORS=glibc,jemalloc NAME=h100-phi3-mini-target OUT=... bash $0
# (a run in flight outlasts MAX_TIME: the SIGINT net, BUDGET_S, then defaults to 590 s).
# NVML readings (GPU clocks, throttle reasons) need pynvml in the probe's Python: carry the nvidia-ml-py wheel in .whl/.
set -uo pipefail
OUT=${OUT:?set OUT to the results parent directory}
PY=${PY:-python3}
LIBS=/tmp/alloc-libs
mkdir -p "$LIBS"
for deb in .debs/*.deb; do dpkg -x "$deb" "$LIBS"; done
lib=$LIBS/usr/lib/x86_64-linux-gnu
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
pin=()
case "${AFFINITY:-}" in
  "") ;;
  gpu:*)
    bus=$(nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader -i 0)  # 00000000:1B:00.0; sysfs: 0000:1b:00.0
    local_cpus=$(cat "/sys/bus/pci/devices/$(echo "${bus:4}" | tr 'A-F' 'a-f')/local_cpulist")
    cpus=$($PY -c 'import sys; from harness.alloc.runners.base import parse_cpu_list as p, format_cpu_list as f
print(f(p(sys.argv[1])[-int(sys.argv[2]):]))' "$local_cpus" "${AFFINITY#gpu:}")
    echo "CPUs local to GPU 0 ($bus): $local_cpus; probes pinned to $cpus"
    pin=(--affinity "$cpus") ;;
  *) pin=(--affinity "$AFFINITY") ;;
esac
if ls .whl/*.whl >/dev/null 2>&1; then  # e.g. nvidia_ml_py-*.whl, for the probe's NVML readings
  rm -rf /tmp/site
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
stop=()
[ -n "${TARGET_CI:-}" ] && stop+=(--target-ci "$TARGET_CI")
[ -n "${MAX_TIME:-}" ] && stop+=(--max-time "$MAX_TIME")
[ -n "${METRIC:-}" ] && stop+=(--metric "$METRIC")
window=(--warm-gens "${WARM_GENS:-3}")
if [ -n "${MEASURE_S:-}" ] && [ "$MEASURE_S" != count ]; then
  window=(--measure-s "$MEASURE_S")
elif [ ${#stop[@]} -gt 0 ] && [ "${MEASURE_S:-}" != count ]; then
  window=()  # harness alloc's default window in seconds for a target or a time limit
fi
budget=${BUDGET_S:-$([ -n "${MAX_TIME:-}" ] && echo 590 || echo 520)}
$PY -c 'import pynvml' 2>/dev/null && echo "pynvml: present (NVML readings on)" || echo "pynvml: absent (no NVML readings)"
# Also reads torch and transformers into the page cache before the first measured run.
$PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available(), "gpus", torch.cuda.device_count())'
# A budget below the device's 10-minute command limit: SIGINT makes harness write its reports and keep its runs;
# the next call continues with --resume.
timeout -s INT "$budget" $PY -m harness.cli alloc --design sequential --runner local --device cuda --model synthetic:phi3-mini \
  --allocators "${ALLOCATORS:-glibc,jemalloc,tcmalloc,mimalloc}" \
  --allocator-lib "jemalloc=$lib/libjemalloc.so.2" \
  --allocator-lib "tcmalloc=$(ls $lib/libtcmalloc_minimal.so.4.*)" \
  --allocator-lib "mimalloc=$(ls $lib/libmimalloc.so.2.*)" \
  --runs "${RUNS:-8}" --warmup-runs "${WARMUP_RUNS:-1}" "${window[@]}" "${stop[@]}" --max-new-tokens "${MAX_NEW_TOKENS:-32}" \
  --out "$OUT/${NAME:-h100-phi3-mini}" "${pin[@]}" "$@"
echo "harness alloc exit code: $?"
