"""Renders the README's "Results" block from the committed reference runs, so no figure is typed by hand.

    python scripts/render_reference.py            # print the block
    python scripts/render_reference.py --write    # replace it in README.md
    python scripts/render_reference.py --check    # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.alloc import report as alloc_report  # noqa: E402
from harness.alloc import run as alloc_run  # noqa: E402
from harness.alloc.runners.base import describe_cpus  # noqa: E402
from harness.measure import stats  # noqa: E402
from harness.measure.records import AllocRun, ServeRequest, StartupRecord  # noqa: E402
from harness.measure.results import ResultsDir  # noqa: E402
from harness.serve import comparison, timeline  # noqa: E402
from harness.serve.config import ServeConfig  # noqa: E402
from harness.serve.report import CONFIG_FILE, REQUESTS_FILE, STARTUP_FILE  # noqa: E402

BEGIN, END = "<!-- reference:begin -->", "<!-- reference:end -->"


def _gpu_used(run: Path) -> list[float]:
    """GPU 0's memory used (MiB) at every sample of a serve run's timeline."""
    return [row["gpu0_used_mb"] for row in timeline.load(ResultsDir(run)).rows
            if row.get("gpu0_used_mb") is not None]


def _as_in_csv(row: alloc_report.AllocRow) -> alloc_report.AllocRow:
    """The row's figures as allocator_latency_comparison.csv holds them (6 significant digits), so the README
    quotes the CSV's figures rather than rounding the exact ones a second way."""
    return dataclasses.replace(row, **{name: float(f"{value:.6g}") for name in alloc_report.CSV_COLUMNS
                                       if isinstance(value := getattr(row, name), float) and math.isfinite(value)})


def _ci(row: alloc_report.AllocRow, low: float, high: float) -> str:
    return "–" if row.allocator == "glibc" or math.isnan(low) else f"{low:.3f}–{high:.3f}"


def _p(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3g}"


ALLOC_LINES = ("answer", "noise", "hosts", "precision", "stopping", "run cost")  # the summary's lines quoted here


def alloc_block(d: Path) -> list[str]:
    """An allocator experiment: its table and the harness's own answer, noise, hosts, precision, stopping and
    run-cost lines (as alloc/summary.md has them), all computed from its records."""
    results = ResultsDir(d)
    records = results.read_records(alloc_run.RUNS_FILE, AllocRun)
    config = results.read_json(alloc_run.CONFIG_FILE)["config"]
    order = [a["name"] for a in config["allocators"]]
    rows = alloc_report.allocator_rows(records, order, paired=bool(config.get("paired")))
    environments = results.read_environments()
    hosts = len({e.host_key for e in environments.values()})
    design = ("paired: each allocator's run beside a glibc run, one GPU and half the CPUs each"
              if config.get("paired") else "fresh process per run, one at a time, order rotated each round")
    if config.get("affinity"):
        design += f", each pinned to {describe_cpus(config['affinity'])}"
    out = [f"**Allocator A/B** — `{config['model']}` on {environments['environment.json'].gpu_name} "
           f"({config['device']}, {config['max_new_tokens']} new tokens, {config['warm_gens']} warm generates per "
           f"run, {design}, {hosts} host(s) of this kind):", "",
           "| allocator | gen_latency_s (median) | ratio vs glibc | 95 % CI | p | ITL p25 (ms) | ITL ratio | 95 % CI "
           "| p | peak RSS MB | n |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = _as_in_csv(row)
        out.append(f"| {r.allocator} | {r.gen_latency_s:.4f} | {r.ratio_vs_baseline:.3f} "
                   f"| {_ci(r, r.ratio_ci_low, r.ratio_ci_high)} | {_p(r.p_value)} "
                   f"| {r.itl_p25_s * 1e3:.2f} | {r.itl_ratio_vs_baseline:.3f} "
                   f"| {_ci(r, r.itl_ratio_ci_low, r.itl_ratio_ci_high)} | {_p(r.itl_p_value)} "
                   f"| {r.rss_mb:.0f} | {r.n} |")
    lines = alloc_report.trust_lines(rows, config, records, environments, alloc_report.last_stop(results))
    for kind, line in lines:
        if kind in ALLOC_LINES:
            out += ["", line]
    out += ["", "Verdicts: `alloc/summary.md`; per-run values: `alloc/runs.jsonl`."]
    return out


def duet_block(d: Path) -> list[str]:
    """A duet experiment (or an A/A calibration alone): its table and the harness's own verdict, calibration,
    precision, variance, stopping and design lines, computed from its windows and sets."""
    from harness.alloc import duet_report

    out: list[str] = []
    for sub in (d, d / duet_report.CALIBRATION_DIR):
        results = ResultsDir(sub)
        loaded = duet_report.Duet.load(results)
        if loaded is None or (sub != d and duet_report.Duet.load(ResultsDir(d)) is not None):
            continue  # a calibration beside an A/B is quoted by the A/B's own Calibration line
        env = results.read_environments().get("environment.json")
        what = "A/A calibration" if loaded.config.get("calibration") else "Allocator A/B, duet design"
        out += [f"**{what}** — `{loaded.config['model']}` on {env.gpu_name if env else 'unknown'} "
                f"({loaded.config['device']}, {loaded.config['max_new_tokens']} new tokens):", "",
                "| arm | gen_latency_s (median) | ITL p25 (ms) | ITL p25 ratio (95 % CI) | gen ratio (95 % CI) "
                "| peak RSS MB | windows | sets |", "|---|---|---|---|---|---|---|---|"]
        for r in (duet_report.arm_row(loaded, label) for label in loaded.labels):
            itl = duet_report.ratio_text(*(r.get(f"itl_{k}") for k in ("ratio_vs_baseline", "ratio_ci_low",
                                                                         "ratio_ci_high")))
            gen = duet_report.ratio_text(*(r.get(k) for k in ("ratio_vs_baseline", "ratio_ci_low", "ratio_ci_high")))
            out.append(f"| {r['allocator']} | {r['gen_latency_s']:.4f} | {r['itl_p25_s'] * 1e3:.2f} | {itl} | {gen} | "
                       f"{r['rss_mb']:.0f} | {r['n_windows']} | {r['n_sets']} |")
        target = loaded.config.get("target_ci") or alloc_report.PRECISION_TARGET
        lines = [*duet_report.answer_lines(loaded)]
        calibration = duet_report.calibration_of(results)
        if calibration is not None and not loaded.config.get("calibration"):
            lines.append(duet_report.calibration_line(calibration))
        lines += [duet_report.precision_line(loaded, target), duet_report.variance_line(loaded),
                  duet_report.stopping_line(loaded, duet_report.last_stop(results)), duet_report.design_line(loaded)]
        out += [line for entry in lines if entry for line in ("", entry)]
        out += ["", f"Verdicts: `{sub.relative_to(d.parent)}/alloc/summary.md`; windows: `alloc/windows.jsonl`.", ""]
    return out[:-1] if out else out


def serve_block(d: Path) -> list[str]:
    results = ResultsDir(d)
    requests = [r for r in results.read_records(REQUESTS_FILE, ServeRequest) if r.ok]
    config = json.loads((d / "serve/config.json").read_text())
    env = results.read_environment("serve/environment.json")
    cold = [r.ttft_s for r in requests if r.kind == "cold"]
    warm = [r.ttft_s for r in requests if r.kind == "warm"]
    c, w = stats.summarize(cold), stats.summarize(warm)
    startups = [s for s in results.read_records(STARTUP_FILE, StartupRecord) if s.spawn_to_health_s is not None]
    health = stats.summarize([s.spawn_to_health_s for s in startups])
    gpu = _gpu_used(d)
    model = config.get("model", "?") if isinstance(config, dict) else "?"
    engine = config.get("engine", "?") if isinstance(config, dict) else "?"
    out = [f"**First-token path** — `{model}` on `{engine}`, {env.gpu_name}, {c.n} fresh server(s):", "",
           "| | median | min | max | n |", "|---|---|---|---|---|",
           f"| cold TTFT (ms) | {c.median * 1e3:.1f} | {c.minimum * 1e3:.1f} | {c.maximum * 1e3:.1f} | {c.n} |",
           f"| warm TTFT (ms) | {w.median * 1e3:.1f} | {w.minimum * 1e3:.1f} | {w.maximum * 1e3:.1f} | {w.n} |",
           f"| start → /health 200 (s) | {health.median:.1f} | {health.minimum:.1f} | {health.maximum:.1f} "
           f"| {health.n} |"]
    if gpu:
        out.append(f"| GPU memory used (MiB) | – | {min(gpu):.0f} | {max(gpu):.0f} | {len(gpu)} samples |")
    out += ["", f"First-request penalty: cold TTFT is {c.median / w.median:.1f}× the warm median."]
    return out


def _median(values: list[float]) -> float:
    return stats.summarize(values).median


def _startups(run: Path) -> list[StartupRecord]:
    return [s for s in ResultsDir(run).read_records(STARTUP_FILE, StartupRecord) if s.spawn_to_health_s]


def vllm_block(d: Path) -> list[str]:
    """A vLLM serving reference: `fresh/` (empty compile and Triton caches per start) and `shared/`
    (one cache across starts: the first fills it, the next ones hit it)."""
    runs = {name: d / name for name in ("fresh", "shared") if (d / name / "serve/startup.jsonl").exists()}
    env = ResultsDir(runs["fresh"]).read_environment("serve/environment.json")
    config = json.loads((runs["fresh"] / "serve/config.json").read_text())
    build = env.added("server_vllm") or {}
    groups = {"fresh caches": _startups(runs["fresh"])}
    if "shared" in runs:
        groups["compile cache hit"] = [s for s in _startups(runs["shared"])
                                       if (s.compile_cache or {}).get("use") == "hit"]
    requests = {name: [r for r in ResultsDir(path).read_records(REQUESTS_FILE, ServeRequest) if r.ok]
                for name, path in runs.items()}
    every = [r for rs in requests.values() for r in rs]
    out = [f"**vLLM first-token path** — `{config['model']}` on vLLM {build.get('vllm', '?')} "
           f"({build.get('build', '?')}, torch {build.get('torch', '?')}), {env.gpu_name}, `--dtype "
           f"{config['dtype']} --max-model-len {config['max_model_len']} --gpu-memory-utilization "
           f"{config['gpu_memory_utilization']}`, {sum(len(_startups(run)) for run in runs.values())} "
           f"fresh servers, {config['max_tokens']} tokens per request:", "",
           "| request | TTFT median (ms) | TTFT min–max | TPOT median (ms) | E2E median (ms)"
           + (" to the end of the stream (serve-request/1)" if any(r.version == 1 for r in every) else "") + " | n |",
           "|---|---|---|---|---|---|"]
    for kind, name in (("cold", "cold"), ("warm", "warm"), ("idle", "after an idle gap")):
        rows = [r for r in every if r.kind == kind]
        if rows:
            t = stats.summarize([r.ttft_s for r in rows])
            out.append(f"| {name} | {t.median * 1e3:.1f} | {t.minimum * 1e3:.1f}–{t.maximum * 1e3:.1f} | "
                       f"{_median([r.tpot_s for r in rows]) * 1e3:.2f} | "
                       f"{_median([r.e2e_s for r in rows]) * 1e3:.1f} | {len(rows)} |")
    out += ["", "Start-up (s, median over servers; phases from the server log, calibrated on these logs):", "",
            "| phase | " + " | ".join(f"{g} (n = {len(v)})" for g, v in groups.items()) + " |",
            "|---|" + "---|" * len(groups)]
    labels = list(dict.fromkeys(p["label"] for v in groups.values() for s in v for p in s.phases))
    for label in labels:
        cells = []
        for v in groups.values():
            found = [sum(p["duration_s"] for p in s.phases if p["label"] == label) for s in v]
            cells.append(f"{_median(found):.1f}" if found else "–")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    totals = {g: _median([s.spawn_to_health_s for s in v]) for g, v in groups.items() if v}
    out.append("| **spawn → /health 200** | " + " | ".join(f"**{t:.1f}**" for t in totals.values()) + " |")
    coverage = min(s.coverage() for v in groups.values() for s in v)
    gpu = [used for run in runs.values() for used in _gpu_used(run)]
    figures = groups["fresh caches"][0].server_figures or {}
    out += ["", f"Named phases cover at least {100 * coverage:.2f} % of every start-up (spawn → /health 200). "
            + (f"A compile-cache hit saved {totals['fresh caches'] - totals['compile cache hit']:.1f} s "
               f"({100 * (1 - totals['compile cache hit'] / totals['fresh caches']):.0f} %) of the median start-up. "
               if "compile cache hit" in totals else "")
            + f"vLLM's own figures (first fresh server): weights {figures.get('weights_gib', float('nan')):.2f} GiB, "
            f"KV cache {figures.get('kv_cache_gib', float('nan')):.2f} GiB ({figures.get('kv_cache_tokens', 0):,.0f} "
            f"tokens), CUDA graphs {figures.get('graph_gib', float('nan')):.2f} GiB. GPU memory used: "
            f"{min(gpu):.0f}–{max(gpu):.0f} MiB over {len(gpu)} samples.", "",
            "Per-server tables, silent stretches named from stacks, memory readings: "
            + ", ".join(f"`{name}/serve/first_token_latency.md`" for name in runs) + "."]
    return out


SERVE_ALLOC_KEYS = ("spawn_to_health_s", "cold_ttft_s", "warm_ttft_s", "warm_tpot_s", "warm_e2e_s",
                    "server_rss_peak_mb", "gpu_used_peak_mb")


def serve_alloc_block(d: Path) -> list[str]:
    """An allocator comparison on the serving path: the main rows of its table, the stopping rule's line, the
    one-off start-up costs and the verdicts, all computed again from its records."""
    results = ResultsDir(d)
    config = ServeConfig.from_dict(results.read_json(CONFIG_FILE))
    env = results.read_environment("serve/environment.json")
    build = env.added("server_vllm") or {}
    startups = results.read_records(STARTUP_FILE, StartupRecord)
    requests = results.read_records(REQUESTS_FILE, ServeRequest)
    order, baseline = list(config.allocators), config.baseline
    rows = [r for r in comparison.rows(startups, requests, order, baseline) if r.metric.key in SERVE_ALLOC_KEYS]
    stops = [e for e in results.read_jsonl(comparison.STOP_FILE) if e.get("event") == "stop"]
    rounds = len({s.round for s in startups})
    out = [f"**Allocators on the serving path** — `{config.model}` on vLLM {build.get('vllm', '?')} "
           f"({build.get('build', '?')}), {env.gpu_name}, `--dtype {config.dtype} --max-model-len "
           f"{config.max_model_len} --gpu-memory-utilization {config.gpu_memory_utilization} --compile-cache "
           f"{config.compile_cache}`; {rounds} round(s) of one fresh server per allocator ({', '.join(order)}), "
           f"the order rotated each round, {config.warm_requests} warm requests of {config.max_tokens} tokens per "
           "server; per server its medians, per allocator the median over servers:", "",
           *comparison.table(rows), "", comparison.verification_line(startups)]
    line = comparison.stopping_line(stops[-1] if stops else None)
    if line:
        out += ["", line]
    outliers = comparison.outlier_lines(startups)
    if outliers:
        out += ["", "One-off start-up costs:", "", *outliers]
    out += ["", "Verdicts:", ""]
    for key in comparison.VERDICT_KEYS:
        out += ["- " + stats.verdict(r.allocator, baseline, r.comparison, r.metric.label,
                                     more="more rounds would narrow it: --cold-starts, --target-ci")
                for r in rows if r.metric.key == key and r.comparison is not None]
    warmup = d / "warmup/serve/startup.jsonl"
    if warmup.exists():
        first = ResultsDir(d / "warmup").read_records(STARTUP_FILE, StartupRecord)[0]
        out += ["", f"Before the comparison, one uncounted start filled the torch.compile cache (compile "
                f"cache {(first.compile_cache or {}).get('use', '?')}): {first.spawn_to_health_s:.1f} s "
                "to /health 200 (`warmup/serve/`)."]
    out += ["", "Every phase, per server: `serve/first_token_latency.md`; per allocator and metric: "
            "`serve/allocator_comparison.csv`; warm TTFT and TPOT by allocator: `serve/allocator_latency.png`."]
    return out


def render(root: Path = REPO / "results" / "reference") -> str:
    lines = [BEGIN]
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        lines += ["", f"#### `results/reference/{d.name}/`", ""]
        if (d / "alloc/windows.jsonl").exists() or (d / "calibration/alloc/windows.jsonl").exists():
            lines += duet_block(d) + [""]
        elif (d / "alloc/allocator_latency_comparison.csv").exists():
            lines += alloc_block(d) + [""]
        if (d / comparison.CSV_FILE).exists():
            lines += serve_alloc_block(d) + [""]
        elif (d / "serve/requests.jsonl").exists():
            lines += serve_block(d) + [""]
        if (d / "fresh/serve/requests.jsonl").exists():
            lines += vllm_block(d) + [""]
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
