"""Renders the README's "Results" block from the committed reference runs, so no figure is typed by hand.

    python scripts/render_reference.py            # print the block
    python scripts/render_reference.py --write    # replace it in README.md
    python scripts/render_reference.py --check    # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness import stats  # noqa: E402
from harness.alloc_report import host_key  # noqa: E402
from harness.results import ResultsDir  # noqa: E402
from harness.runners.base import describe_cpus  # noqa: E402

BEGIN, END = "<!-- reference:begin -->", "<!-- reference:end -->"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _gpu_name(env: dict) -> str:
    devices = (env.get("gpu") or {}).get("devices") or []
    return devices[0]["name"] if devices else "no GPU"


def _ci(r: dict[str, str], low: str, high: str) -> str:
    return "–" if r["allocator"] == "glibc" or not r[low] else f"{float(r[low]):.3f}–{float(r[high]):.3f}"


def _p(value: str) -> str:
    return "–" if not value else f"{float(value):.3g}"


def alloc_block(d: Path) -> list[str]:
    rows = _rows(d / "alloc/allocator_latency_comparison.csv")
    env = json.loads((d / "environment.json").read_text())
    config = json.loads((d / "alloc/config.json").read_text())["config"]
    hosts = len({host_key(e) for e in ResultsDir(d).environments()})
    design = ("paired: each allocator's run beside a glibc run, one GPU and half the CPUs each"
              if config.get("paired") else "fresh process per run, one at a time, order rotated each round")
    if config.get("affinity"):
        design += f", each pinned to {describe_cpus(config['affinity'])}"
    out = [f"**Allocator A/B** — `{config['model']}` on {_gpu_name(env)} ({config['device']}, "
           f"{config['max_new_tokens']} new tokens, {config['warm_gens']} warm generates per run, "
           f"{design}, {hosts} host(s) of this kind):", "",
           "| allocator | gen_latency_s (median) | ratio vs glibc | 95 % CI | p | ITL p25 (ms) | ITL ratio | 95 % CI "
           "| p | peak RSS MB | n |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['allocator']} | {float(r['gen_latency_s']):.4f} | {float(r['ratio_vs_baseline']):.3f} "
                   f"| {_ci(r, 'ratio_ci_low', 'ratio_ci_high')} | {_p(r['p_value'])} "
                   f"| {float(r['itl_p25_s']) * 1e3:.2f} | {float(r['itl_ratio_vs_baseline']):.3f} "
                   f"| {_ci(r, 'itl_ratio_ci_low', 'itl_ratio_ci_high')} | {_p(r['itl_p_value'])} "
                   f"| {float(r['rss_mb']):.0f} | {r['n']} |")
    # The harness's own noise, hosts and precision lines (alloc/summary.md), each a paragraph here.
    lines = [line[2:].strip() for line in (d / "alloc/summary.md").read_text().splitlines()
             if line.startswith(("- Noise", "- Hosts", "- Precision"))]
    for line in lines:
        out += ["", line]
    out += ["", "Verdicts: `alloc/summary.md`; per-run values: `alloc/runs.jsonl`."]
    return out


def serve_block(d: Path) -> list[str]:
    results = ResultsDir(d / "serve")
    requests = [r for r in results.read_jsonl("requests.jsonl") if r.get("status") == "ok"]
    config = json.loads((d / "serve/config.json").read_text())
    env = json.loads((d / "serve/environment.json").read_text())
    cold = [r["ttft_s"] for r in requests if r["kind"] == "cold"]
    warm = [r["ttft_s"] for r in requests if r["kind"] == "warm"]
    c, w = stats.summarize(cold), stats.summarize(warm)
    startups = [s for s in results.read_jsonl("startup.jsonl") if s.get("spawn_to_health_s") is not None]
    health = stats.summarize([s["spawn_to_health_s"] for s in startups])
    gpu = [float(row["gpu0_used_mb"]) for row in _rows(d / "serve/memory_timeline.csv") if row.get("gpu0_used_mb")]
    model = config.get("model", "?") if isinstance(config, dict) else "?"
    engine = config.get("engine", "?") if isinstance(config, dict) else "?"
    out = [f"**First-token path** — `{model}` on `{engine}`, {_gpu_name(env)}, {c.n} fresh server(s):", "",
           "| | median | min | max | n |", "|---|---|---|---|---|",
           f"| cold TTFT (ms) | {c.median * 1e3:.1f} | {c.minimum * 1e3:.1f} | {c.maximum * 1e3:.1f} | {c.n} |",
           f"| warm TTFT (ms) | {w.median * 1e3:.1f} | {w.minimum * 1e3:.1f} | {w.maximum * 1e3:.1f} | {w.n} |",
           f"| start → /health 200 (s) | {health.median:.1f} | {health.minimum:.1f} | {health.maximum:.1f} "
           f"| {health.n} |"]
    if gpu:
        out.append(f"| GPU memory used (MiB) | – | {min(gpu):.0f} | {max(gpu):.0f} | {len(gpu)} samples |")
    out += ["", f"First-request penalty: cold TTFT is {c.median / w.median:.1f}× the warm median."]
    return out


def render(root: Path = REPO / "results" / "reference") -> str:
    lines = [BEGIN]
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        lines += ["", f"#### `results/reference/{d.name}/`", ""]
        if (d / "alloc/allocator_latency_comparison.csv").exists():
            lines += alloc_block(d) + [""]
        if (d / "serve/requests.jsonl").exists():
            lines += serve_block(d) + [""]
    lines.append(END)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    block = render()
    if not (args.write or args.check):
        print(block)
        return 0
    readme = (REPO / "README.md").read_text()
    if BEGIN not in readme or END not in readme:
        print("README.md has no reference block markers", file=sys.stderr)
        return 1
    head, rest = readme.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    updated = head + block + tail
    if args.check:
        if updated != readme:
            print("README.md's Results block is out of date: run scripts/render_reference.py --write", file=sys.stderr)
            return 1
        return 0
    (REPO / "README.md").write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
