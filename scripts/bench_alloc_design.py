"""Benchmark: the duet and the sequential design of `harness alloc`, each given the same minutes on the same host,
and the ratio CIs each reached, side by side (target: the duet's ±3 % or narrower on ITL p25 in 2 minutes on this
2-core host). The designs run one after the other, in the order given; `--repeat` alternates them again.

Prints figures; asserts nothing. Usage:
    .venv/bin/python scripts/bench_alloc_design.py [--minutes 2] [--allocators glibc,jemalloc] [--save DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.alloc import report as alloc_report  # noqa: E402
from harness.alloc.duet_report import Duet  # noqa: E402
from harness.alloc.run import METRICS  # noqa: E402
from harness.measure import environment  # noqa: E402
from harness.measure.records import AllocRun  # noqa: E402
from harness.measure.results import ResultsDir  # noqa: E402

TARGET = 0.03


def run_design(design: str, args: argparse.Namespace, out: Path) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "harness.cli", "alloc", "--runner", "local", "--design", design, "--model", args.model,
           "--allocators", args.allocators, "--max-time", f"{args.minutes}m", "--out", str(out)]
    if args.device:
        cmd += ["--device", args.device]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        print(f"  {design}: exit code {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0, proc.returncode


def comparisons(design: str, out: Path, baseline: str) -> tuple[str, dict[str, dict[str, object]]]:
    """What each design reached: its units, and per allocator and metric the ratio and the CI half-width."""
    results = ResultsDir(out)
    found: dict[str, dict[str, object]] = {}
    if design == "duet":
        loaded = Duet.load(results)
        sets = [s for s in loaded.sets if s.counted] if loaded else []
        units = f"{len(sets)} sets, {sum(s.steps for s in sets)} steps"
        for metric, key in METRICS.items():
            for label, comp in (loaded.comparisons(key) if loaded else {}).items():
                found.setdefault(label, {})[metric] = comp
        return units, found
    records = results.read_records("alloc/runs.jsonl", AllocRun)
    order = [a["name"] for a in (results.read_json("alloc/config.json") or {}).get("config", {}).get("allocators", [])]
    runs = [r for r in alloc_report.measured(records) if r.ok]
    units = f"{len(runs)} measured runs"
    for metric, key in METRICS.items():
        for label, comp in alloc_report.comparisons(records, order, key, False).items():
            found.setdefault(label, {})[metric] = comp
    return units, found


def show(comp: object) -> str:
    ratio, half = getattr(comp, "ratio", math.nan), getattr(comp, "half_width", math.nan)
    if math.isnan(ratio):
        return "no ratio"
    return f"{ratio:.3f} ±{half * 100:.1f} %" if not math.isnan(half) else f"{ratio:.3f} (no CI)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=2.0, help="each design's --max-time")
    ap.add_argument("--allocators", default="glibc,jemalloc")
    ap.add_argument("--model", default="synthetic:tiny")
    ap.add_argument("--device", default=None)
    ap.add_argument("--order", default="duet,sequential")
    ap.add_argument("--repeat", type=int, default=1, help="passes over --order")
    ap.add_argument("--save", type=Path, help="keep the output and the environment here (and the experiments)")
    args = ap.parse_args()
    if not (math.isfinite(args.minutes) and args.minutes > 0):
        ap.error("--minutes must be a positive number")
    workdir = args.save or Path(tempfile.mkdtemp(prefix="bench-alloc-design-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.save:
        env = environment.collect(extra={"benchmark": "scripts/bench_alloc_design.py", "arguments": {
            k: str(v) for k, v in vars(args).items()}})
        (workdir / "environment.json").write_text(json.dumps(env.to_dict(), indent=2) + "\n")
    baseline = args.allocators.split(",")[0]
    lines = [f"harness alloc, {args.model}, {args.allocators}, {args.minutes:g} minutes per design (--max-time), "
             f"ratio vs {baseline} ±95 % CI half-width:"]
    print(lines[0], flush=True)
    for n in range(args.repeat):
        for design in args.order.split(","):
            out = workdir / f"{design}-{n + 1}"
            elapsed, code = run_design(design, args, out)
            units, found = comparisons(design, out, baseline)
            for label, metrics in found.items():
                line = (f"  {design:<10} pass {n + 1}: {elapsed:5.0f} s, {units}; {label}: ITL p25 "
                        f"{show(metrics.get('itl_p25'))}, gen_latency {show(metrics.get('gen_latency'))}")
                itl = metrics.get("itl_p25")
                if itl is not None and not math.isnan(itl.half_width):
                    line += f" (ITL p25 target ±{TARGET * 100:g} %: {'met' if itl.half_width <= TARGET else 'NOT met'})"
                print(line, flush=True)
                lines.append(line)
    if args.save:
        (workdir / "output.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
