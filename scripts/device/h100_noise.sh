#!/usr/bin/env bash
# Where does run-to-run noise in GPU generation latency come from? One probe process per setting, many warm
# generations each, every inter-token gap kept; host steal time (vmstat) and GPU clocks (nvidia-smi dmon)
# sampled beside them. Usage: OUT=/path bash scripts/device/h100_noise.sh
set -uo pipefail
OUT=${OUT:?set OUT}
PY=${PY:-python3}
LIBS=/tmp/alloc-libs
mkdir -p "$LIBS" "$OUT/noise"
for deb in .debs/*.deb; do dpkg -x "$deb" "$LIBS"; done
lib=$LIBS/usr/lib/x86_64-linux-gnu
{
  date -u; uname -a; nproc; cat /proc/loadavg
  grep -m1 "model name" /proc/cpuinfo; grep -c processor /proc/cpuinfo
  (dmesg 2>/dev/null | head -3) || true
  cat /sys/fs/cgroup/cpu.max 2>/dev/null || true
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw,pstate,temperature.gpu --format=csv
  ps -eo pid,pcpu,comm --sort=-pcpu | head -8
} > "$OUT/noise/host.txt" 2>&1
vmstat 1 > "$OUT/noise/vmstat.txt" 2>&1 &
VM=$!
nvidia-smi dmon -s pcu -d 1 > "$OUT/noise/dmon.txt" 2>&1 &
DM=$!
probe() {  # name, then extra args / env prefix handled by caller
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  "$@" 2>"$OUT/noise/$name.err" | grep '^HARNESS_PROBE_RESULT ' | sed 's/^HARNESS_PROBE_RESULT //' > "$OUT/noise/$name.json"
  echo "$name $(date +%s.%N) started $t0" >> "$OUT/noise/order.txt"
}
P=(-m harness.probe --model synthetic:phi3-mini --device cuda --warm-gens "${GENS:-40}" --max-new-tokens 32)
probe t16 $PY "${P[@]}"
probe t1 $PY "${P[@]}" --threads 1
probe t1_pin1 taskset -c 3 $PY "${P[@]}" --threads 1
probe t1_jemalloc env LD_PRELOAD=$lib/libjemalloc.so.2 $PY "${P[@]}" --threads 1
probe t1_pin4 taskset -c 4-7 $PY "${P[@]}" --threads 1
kill $VM $DM 2>/dev/null
cd "$OUT" && tar czf noise.tgz noise && rm -rf noise
