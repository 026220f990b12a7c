"""Benchmark: how long the default `harness alloc` takes on this host (target: under 3 minutes on 2 cores).

Prints figures; asserts nothing. Usage: .venv/bin/python scripts/bench_alloc_duration.py [--runner local]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.measure.records import AllocSet  # noqa: E402
from harness.measure.results import ResultsDir  # noqa: E402

TARGET_S = 180.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runner", default="local")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "harness.cli", "alloc", "--runner", args.runner, "--model", "synthetic:tiny",
               "--allocators", "glibc,jemalloc", "--out", tmp]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
        sets = ResultsDir(tmp).read_records("alloc/sets.jsonl", AllocSet)
    ok = sum(s.counted for s in sets)
    print(f"default harness alloc (synthetic:tiny, glibc+jemalloc, the duet design's default sets, runner "
          f"{args.runner}): {elapsed:.1f} s for {len(sets)} sets ({ok} verified and counted), "
          f"exit code {proc.returncode}")
    print(f"target < {TARGET_S:.0f} s: {'met' if elapsed < TARGET_S else 'NOT met'}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
