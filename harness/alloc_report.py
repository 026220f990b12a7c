"""From runs.jsonl to allocator_latency_comparison.csv, summary.md and a plot. Every figure computed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from tabulate import tabulate

from harness import stats
from harness.results import ResultsDir

CSV_FILE = "alloc/allocator_latency_comparison.csv"
SUMMARY_FILE = "alloc/summary.md"
PLOT_FILE = "alloc/gen_latency.png"

# The seed's four columns come first, exactly; the rest follow.
CSV_COLUMNS = [
    "allocator", "gen_latency_s", "wall_real_s", "rss_mb",
    "n", "n_failed", "gen_latency_ci_low", "gen_latency_ci_high",
    "ratio_vs_baseline", "ratio_ci_low", "ratio_ci_high", "p_value", "significant",
    "wall_ratio_vs_baseline", "wall_p_value", "rss_diff_mb",
    "cold_latency_s", "ttft_s", "tpot_s", "load_s",
    "gpu_peak_allocated_mb", "gpu_peak_reserved_mb", "container_peak_mb", "container_working_set_peak_mb",
    "library", "version",
]


def _median(values: Sequence[Any]) -> float:
    return stats.summarize(values).median


def measured(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if not r.get("warmup")]


def allocator_rows(records: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    runs = measured(records)
    baseline = "glibc" if "glibc" in order else order[0]
    ok = {name: [r for r in runs if r["allocator"] == name and r["status"] == "ok"] for name in order}
    base_ok = ok[baseline]
    rows = []
    for name in order:
        mine = ok[name]
        lat = [r["gen_latency_s"] for r in mine]
        summary = stats.summarize(lat)
        comp = stats.compare(lat, [r["gen_latency_s"] for r in base_ok])
        wall = stats.compare([r["wall_real_s"] for r in mine], [r["wall_real_s"] for r in base_ok])
        loaded = next((r["loaded_allocator"] for r in mine if r.get("loaded_allocator")), None) or {}
        rss = _median([r["rss_mb"] for r in mine])
        rows.append({
            "allocator": name,
            "gen_latency_s": summary.median,
            "wall_real_s": _median([r["wall_real_s"] for r in mine]),
            "rss_mb": rss,
            "n": summary.n,
            "n_failed": sum(1 for r in runs if r["allocator"] == name and r["status"] != "ok"),
            "gen_latency_ci_low": summary.ci_low,
            "gen_latency_ci_high": summary.ci_high,
            "ratio_vs_baseline": comp.ratio,
            "ratio_ci_low": comp.ratio_ci_low,
            "ratio_ci_high": comp.ratio_ci_high,
            "p_value": comp.p_value if name != baseline else None,
            "significant": comp.significant if name != baseline else None,
            "wall_ratio_vs_baseline": wall.ratio,
            "wall_p_value": wall.p_value if name != baseline else None,
            "rss_diff_mb": rss - _median([r["rss_mb"] for r in base_ok]) if base_ok else None,
            "cold_latency_s": _median([r["cold_latency_s"] for r in mine]),
            "ttft_s": _median([r["ttft_s"] for r in mine]),
            "tpot_s": _median([r["tpot_s"] for r in mine]),
            "load_s": _median([r["load_s"] for r in mine]),
            "gpu_peak_allocated_mb": _median([r["gpu_peak_allocated_mb"] for r in mine]),
            "gpu_peak_reserved_mb": _median([r["gpu_peak_reserved_mb"] for r in mine]),
            "container_peak_mb": _median([r.get("container_peak_mb") for r in mine]),
            "container_working_set_peak_mb": _median([r.get("container_working_set_peak_mb") for r in mine]),
            "library": loaded.get("malloc_library"),
            "version": loaded.get("version"),
            "_comparison": comp,
            "_wall": wall,
        })
    return rows


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def summary_markdown(rows: list[dict[str, Any]], config: dict[str, Any], records: list[dict[str, Any]]) -> str:
    baseline = "glibc" if any(r["allocator"] == "glibc" for r in rows) else rows[0]["allocator"]
    base = next(r for r in rows if r["allocator"] == baseline)
    runs = measured(records)
    failed = [r for r in runs if r["status"] != "ok"]
    bullets = []
    for row in rows:
        if row["allocator"] == baseline:
            continue
        bullets.append(stats.verdict(row["allocator"], baseline, row["_comparison"], "generation latency"))
        wall: stats.Comparison = row["_wall"]
        rss_diff = row["rss_diff_mb"]
        rss_text = ("–" if rss_diff is None or math.isnan(rss_diff)
                    else f"{rss_diff:+.1f} MB ({rss_diff / base['rss_mb'] * 100:+.1f} %)")
        bullets.append(f"{row['allocator']}: process wall time ratio {_fmt(wall.ratio)} "
                       f"(p = {_fmt(wall.p_value, 3)}); peak RSS {_fmt(row['rss_mb'])} MB vs "
                       f"{_fmt(base['rss_mb'])} MB, a difference of {rss_text}.")
    n_min = min((r["n"] for r in rows), default=0)
    bullets.append(
        f"Setup: {config.get('model')} on {records[0].get('device') if records else config.get('device')}, "
        f"{n_min}+ verified runs per allocator (fresh process each, interleaved, "
        f"{config.get('warmup_runs', 0)} warm-up round(s) discarded), gen_latency_s = median of "
        f"{config.get('warm_gens')} warm generate calls of {config.get('max_new_tokens')} tokens per run.")
    if failed:
        reasons = sorted({r["failure"] or "unknown" for r in failed})
        bullets.append(f"{len(failed)} run(s) failed and were not counted: " + "; ".join(reasons[:3]))
    table = [[r["allocator"], _fmt(r["gen_latency_s"]),
              f"{_fmt(r['gen_latency_ci_low'])}–{_fmt(r['gen_latency_ci_high'])}",
              _fmt(r["ratio_vs_baseline"]), f"{_fmt(r['ratio_ci_low'])}–{_fmt(r['ratio_ci_high'])}",
              _fmt(r["p_value"], 3), _fmt(r["wall_real_s"]), _fmt(r["rss_mb"]), _fmt(r["ttft_s"]),
              _fmt(r["tpot_s"]), r["n"], r["n_failed"], f"{r['library'] or '(libc)'} {r['version'] or ''}".strip()]
             for r in rows]
    headers = ["allocator", "gen_latency_s", "95% CI", f"ratio vs {baseline}", "ratio CI", "p",
               "wall_real_s", "rss_mb", "ttft_s", "tpot_s", "n", "failed", "loaded library"]
    return ("# Allocator impact on generation latency\n\n"
            + "\n".join(f"- {b}" for b in bullets[:5]) + "\n\n"
            + tabulate(table, headers=headers, tablefmt="github") + "\n\n"
            "Medians over runs; CIs are 95 % percentile bootstrap intervals; p-values are two-sided "
            "Mann–Whitney U tests of per-run gen_latency_s. Raw runs: `runs.jsonl`.\n")


def plot(rows: list[dict[str, Any]], records: list[dict[str, Any]], results: ResultsDir) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in measured(records) if r["status"] == "ok"]
    names = [r["allocator"] for r in rows]
    data = [[r["gen_latency_s"] * 1000 for r in runs if r["allocator"] == n] for n in names]
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(names), 4))
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names)
    for i, values in enumerate(data, start=1):
        ax.scatter([i] * len(values), values, s=14, alpha=0.7, zorder=3)
    ax.set_ylabel("gen_latency per run (ms, median of warm generates)")
    ax.set_title("Generation latency by allocator")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(results.path(PLOT_FILE), dpi=110)
    plt.close(fig)


def write(results: ResultsDir, records: list[dict[str, Any]], config: dict[str, Any],
          order: list[str]) -> list[dict[str, Any]]:
    rows = allocator_rows(records, order)
    results.write_csv(CSV_FILE, CSV_COLUMNS, rows)
    results.write_text(SUMMARY_FILE, summary_markdown(rows, config, records))
    if any(r["n"] for r in rows):
        plot(rows, records, results)
    return rows
