"""From runs.jsonl to allocator_latency_comparison.csv, summary.md and a plot. Every figure computed."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import Any

from tabulate import tabulate

from harness import stats
from harness.results import ResultsDir
from harness.runners.base import describe_cpus, describe_placement

CSV_FILE = "alloc/allocator_latency_comparison.csv"
SUMMARY_FILE = "alloc/summary.md"
PLOT_FILE = "alloc/gen_latency.png"
TRACE_FILE = "alloc/itl_trace.png"

PRECISION_TARGET = 0.03  # the ratio CI half-width the precision line plans for

# The seed's four columns come first, exactly; the rest follow.
CSV_COLUMNS = [
    "allocator", "gen_latency_s", "wall_real_s", "rss_mb",
    "n", "n_failed", "gen_latency_ci_low", "gen_latency_ci_high",
    "ratio_vs_baseline", "ratio_ci_low", "ratio_ci_high", "p_value", "significant",
    "wall_ratio_vs_baseline", "wall_p_value", "rss_diff_mb",
    "itl_p25_s", "itl_p50_s", "itl_ratio_vs_baseline", "itl_ratio_ci_low", "itl_ratio_ci_high", "itl_p_value",
    "itl_significant",
    "cold_latency_s", "ttft_s", "tpot_s", "load_s",
    "gpu_peak_allocated_mb", "gpu_peak_reserved_mb", "container_peak_mb", "container_working_set_peak_mb",
    "library", "version",
]


def _median(values: Sequence[Any]) -> float:
    return stats.summarize(values).median


def measured(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if not r.get("warmup")]


def side_by_side(records: list[dict[str, Any]], candidate: str, baseline: str) -> list[tuple[dict, dict]]:
    """Paired design: (candidate run, the baseline run that ran beside it), both verified."""
    by_index = {r["run_index"]: r for r in records}
    pairs = []
    for r in records:
        partner = by_index.get(r.get("concurrent_with"))
        if (r["allocator"] == candidate and partner is not None and partner["allocator"] == baseline
                and r["status"] == "ok" and partner["status"] == "ok"):
            pairs.append((r, partner))
    return pairs


def _compare(key: str, mine: list[dict], base_ok: list[dict], pairs: list[tuple[dict, dict]] | None):
    if pairs is not None:
        return stats.compare_paired([(c.get(key), b.get(key)) for c, b in pairs])
    return stats.compare([r.get(key) for r in mine], [r.get(key) for r in base_ok])


def allocator_rows(records: list[dict[str, Any]], order: list[str], paired: bool = False) -> list[dict[str, Any]]:
    runs = measured(records)
    baseline = "glibc" if "glibc" in order else order[0]
    ok = {name: [r for r in runs if r["allocator"] == name and r["status"] == "ok"] for name in order}
    base_ok = ok[baseline]
    rows = []
    for name in order:
        mine = ok[name]
        summary = stats.summarize([r["gen_latency_s"] for r in mine])
        pairs = side_by_side(runs, name, baseline) if paired and name != baseline else None
        comp = _compare("gen_latency_s", mine, base_ok, pairs)
        itl = _compare("itl_p25_s", mine, base_ok, pairs)
        wall = _compare("wall_real_s", mine, base_ok, pairs)
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
            "itl_p25_s": _median([r.get("itl_p25_s") for r in mine]),
            "itl_p50_s": _median([r.get("itl_p50_s") for r in mine]),
            "itl_ratio_vs_baseline": itl.ratio,
            "itl_ratio_ci_low": itl.ratio_ci_low,
            "itl_ratio_ci_high": itl.ratio_ci_high,
            "itl_p_value": itl.p_value if name != baseline else None,
            "itl_significant": itl.significant if name != baseline else None,
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
            "_itl": itl,
            "_wall": wall,
        })
    return rows


def noise_line(records: list[dict[str, Any]], paired: bool) -> str | None:
    """How noisy this host was: the run-to-run spread of each metric (each run divided by its allocator's
    median, so allocator effects do not count as noise), how many decode steps were slowed, and for the
    paired design how much the two sides of a pair moved together."""
    import numpy as np

    runs = [r for r in measured(records) if r["status"] == "ok"]
    if len(runs) < 3:
        return None
    parts = []
    for key, label in (("gen_latency_s", "gen_latency"), ("itl_p25_s", "ITL p25")):
        names = {r["allocator"] for r in runs}
        medians = {a: float(np.median([r[key] for r in runs if r["allocator"] == a and r.get(key)] or [0.0]))
                   for a in names}
        logs = [math.log(r[key] / medians[r["allocator"]]) for r in runs if r.get(key) and medians[r["allocator"]]]
        if len(logs) >= 3:
            parts.append(f"run-to-run spread of {label} {np.std(logs, ddof=1) * 100:.1f} %")
    slowed = []
    for r in runs:
        gaps = [g for gen in ((r.get("probe") or {}).get("warm") or []) for g in (gen.get("itl_s") or [])]
        if gaps and r.get("itl_p25_s"):
            slowed.append(sum(g > 1.5 * r["itl_p25_s"] for g in gaps) / len(gaps))
    if slowed:
        parts.append(f"decode steps slower than 1.5× their run's ITL p25: {np.median(slowed) * 100:.0f} % "
                     f"(median over runs, up to {max(slowed) * 100:.0f} %)")
    contention = contention_part(runs)
    if contention:
        parts.append(contention)
    if paired:
        by_index = {r["run_index"]: r for r in runs}
        sides = [(r, by_index[r["concurrent_with"]]) for r in runs
                 if r.get("concurrent_with") in by_index and r["run_index"] < r["concurrent_with"]]
        if len(sides) >= 3:
            a = [math.log(x["itl_p25_s"]) for x, _ in sides]
            b = [math.log(y["itl_p25_s"]) for _, y in sides]
            parts.append(f"correlation of the two sides' ITL p25 within pairs r = {np.corrcoef(a, b)[0, 1]:.2f} "
                         "(near 1: pairing cancels the host's slow stretches; near 0: it cannot)")
    return ("Noise — " + "; ".join(parts) + ".") if parts else None


def contention_part(runs: list[dict[str, Any]]) -> str | None:
    """What took CPU from the probes while they measured: the hypervisor (steal) or this guest's own
    scheduler (involuntary preemptions), and whether the runs that lost most were the slow ones."""
    import numpy as np
    from scipy import stats as sps

    stolen = [r for r in runs if r.get("steal_pct") is not None and r.get("itl_p25_s")]
    if len(stolen) < 3:
        return None
    steal = [r["steal_pct"] for r in stolen]
    text = (f"hypervisor steal on the probes' CPUs while they measured: median {np.median(steal):.1f} %, "
            f"max {max(steal):.1f} %")
    switches = [r["involuntary_switches"] for r in stolen if r.get("involuntary_switches") is not None]
    if switches:
        text += f"; involuntary preemptions per run: median {np.median(switches):.0f}"
    if len(stolen) >= 8 and len(set(steal)) > 1:
        rho = sps.spearmanr(steal, [r["itl_p25_s"] for r in stolen]).statistic
        text += (f"; rank correlation of steal with ITL p25 ρ = {rho:.2f} (near 1: the slow runs are the ones "
                 "another guest took CPU from)")
    return text


def host_key(environment: dict[str, Any]) -> str:
    """What tells one host apart in an environment file: its GPUs' UUIDs, else its hostname."""
    devices = (environment.get("gpu") or {}).get("devices") or []
    if devices:
        return ",".join(str(d.get("uuid", "?"))[:12] for d in devices)
    host = environment.get("host") or {}
    return str(host.get("hostname") or host.get("cpu_model") or "unknown host")


def run_hosts(records: list[dict[str, Any]], environments: list[dict[str, Any]]) -> dict[int, str]:
    """run_index → host key. Each invocation (first or --resume) writes an environment file before its
    first run, so a run belongs to the last environment collected before it started."""
    when = dt.datetime.fromisoformat
    sessions = sorted((when(e["collected_at"]), host_key(e)) for e in environments if e.get("collected_at"))
    if not sessions:
        return {}
    hosts = {}
    for r in records:
        if not r.get("started_at"):
            continue
        started = when(r["started_at"])
        earlier = [key for at, key in sessions if at <= started]
        hosts[r["run_index"]] = earlier[-1] if earlier else sessions[0][1]
    return hosts


def hosts_line(records: list[dict[str, Any]], environments: list[dict[str, Any]]) -> str | None:
    """Where runs came from more than one host: each host's level of the steady decode step, since a
    slower host widens every ratio CI."""
    hosts = run_hosts(records, environments)
    groups: dict[str, list[float]] = {}
    for r in measured(records):
        if r["status"] == "ok" and r.get("itl_p25_s") and r["run_index"] in hosts:
            groups.setdefault(hosts[r["run_index"]], []).append(r["itl_p25_s"])
    if len(groups) < 2:
        return None
    levels = ", ".join(f"{_median(v) * 1e3:.2f} ms on {key} ({len(v)} runs)" for key, v in groups.items())
    return (f"Hosts — runs came from {len(groups)} hosts (told apart by GPU UUID or hostname in "
            f"environment*.json); median ITL p25 of each host's runs: {levels}. The order rotates through every "
            "allocator each round, so a slower host slows all of them about alike: it widens the ratio CIs "
            "more than it tilts them.")


def runs_needed(comp: stats.Comparison, target: float = PRECISION_TARGET) -> int | None:
    """Runs per allocator for a ±target CI, assuming the CI's half-width shrinks as 1/sqrt(n) at the spread
    seen (a rough plan: bootstrap CIs from a few runs are themselves uncertain)."""
    if comp.n_candidate < 3 or math.isnan(comp.ratio_ci_low):
        return None
    half = (comp.ratio_ci_high - comp.ratio_ci_low) / 2
    return max(comp.n_candidate, math.ceil(comp.n_candidate * (half / target) ** 2))


def precision_line(rows: list[dict[str, Any]], baseline: str, paired: bool, lead: str | None = None) -> str | None:
    """How far the widest ratio CI is from ±PRECISION_TARGET, and about how many runs would reach it, for
    every allocator and for the lead one (jemalloc) alone."""
    parts = []
    for key, label in (("_comparison", "generation latency"), ("_itl", "decode step (ITL p25)")):
        named = {r["allocator"]: r[key] for r in rows
                 if r["allocator"] != baseline and not math.isnan(r[key].ratio_ci_low)}
        comps = list(named.values())
        if not comps:
            continue
        widest = max(comps, key=lambda c: max(abs(c.ratio_ci_low - 1), abs(c.ratio_ci_high - 1)))
        need = max((runs_needed(c) or 0) for c in comps)
        half = max(abs(widest.ratio_ci_low - 1), abs(widest.ratio_ci_high - 1)) * 100
        unit = "pairs" if paired else "runs per allocator"
        plan = (f"roughly {need} {unit} would narrow every one to ±{PRECISION_TARGET * 100:.0f} % at this spread"
                if need > widest.n_candidate else f"within ±{PRECISION_TARGET * 100:.0f} %")
        lead_need = runs_needed(named[lead]) if lead in named and len(named) > 1 else None
        if lead_need is not None and widest.n_candidate < lead_need < need:
            plan += f", {lead_need} for {lead} alone"
        parts.append(f"{label}: widest ratio CI ±{half:.1f} % with {widest.n_candidate} {unit}; {plan}")
    return ("Precision — " + "; ".join(parts) + " (`--resume` with a larger `--runs` adds runs).") if parts else None


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000.0


def _ratio(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.3f}"


def _range(low: Any, high: Any) -> str:
    return "–" if _fmt(low) == "–" and _fmt(high) == "–" else f"{_fmt(low)}–{_fmt(high)}"


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def summary_markdown(rows: list[dict[str, Any]], config: dict[str, Any], records: list[dict[str, Any]],
                     environments: list[dict[str, Any]] | None = None) -> str:
    baseline = "glibc" if any(r["allocator"] == "glibc" for r in rows) else rows[0]["allocator"]
    paired = bool(config.get("paired"))
    base = next(r for r in rows if r["allocator"] == baseline)
    runs = measured(records)
    failed = [r for r in runs if r["status"] != "ok"]
    candidates = [r for r in rows if r["allocator"] != baseline]
    lead = next((r for r in candidates if r["allocator"] == "jemalloc"), candidates[0] if candidates else None)
    head: list[str] = []  # 3-5 bullets on the lead allocator (jemalloc), as the seed asks
    every: list[str] = []  # the full verdicts of the other allocators
    for row in candidates:
        lines = [stats.verdict(row["allocator"], baseline, row["_comparison"], "generation latency", paired)]
        if row["_itl"].n_candidate:
            lines.append(stats.verdict(row["allocator"], baseline, row["_itl"], "decode step time (ITL p25)",
                                       paired))
        wall: stats.Comparison = row["_wall"]
        rss_diff = row["rss_diff_mb"]
        rss_text = ("–" if rss_diff is None or math.isnan(rss_diff)
                    else f"{rss_diff:+.1f} MB ({rss_diff / base['rss_mb'] * 100:+.1f} %)")
        lines.append(f"{row['allocator']}: process wall time ratio {_fmt(wall.ratio)} "
                     f"(p = {_fmt(wall.p_value, 3)}); peak RSS {_fmt(row['rss_mb'])} MB vs "
                     f"{_fmt(base['rss_mb'])} MB, a difference of {rss_text}.")
        (head if row is lead else every).extend(lines)
    others = [r for r in candidates if r is not lead]
    if others:
        head.append("Other allocators vs " + baseline + ": " + "; ".join(
            f"{r['allocator']} latency ratio {_ratio(r['ratio_vs_baseline'])} "
            f"({_range(r['ratio_ci_low'], r['ratio_ci_high'])}), ITL ratio {_ratio(r['itl_ratio_vs_baseline'])} "
            f"({_range(r['itl_ratio_ci_low'], r['itl_ratio_ci_high'])})"
            + (" — significant" if r["significant"] or r["itl_significant"] else "") for r in others)
            + " (verdicts below).")
    n_min = min((r["n"] for r in rows), default=0)
    head.append(
        f"Setup: {config.get('model')} on {records[0].get('device') if records else config.get('device')}, "
        f"{n_min}+ verified runs per allocator (fresh process each, interleaved, "
        + (f"each pinned to {describe_cpus(config['affinity'])}, " if config.get("affinity") else "")
        + f"{config.get('warmup_runs', 0)} warm-up round(s) discarded), gen_latency_s = median of "
        f"{config.get('warm_gens')} warm generate calls of {config.get('max_new_tokens')} tokens per run; "
        "itl_p25_s = lower quartile of every inter-token gap of those calls.")
    sure: list[str] = []  # how far the figures can be trusted
    if paired:
        halves = "; ".join(f"side {i}: {describe_placement(p)}" for i, p in enumerate(config.get("placements") or []))
        sure.append(f"Paired design: every run of another allocator ran at the same time as a {baseline} run, "
                    f"each on its own half of the host ({halves}), sides swapped every round; ratios are "
                    "medians of the per-pair ratios, CIs bootstrap over pairs, p-values Wilcoxon signed-rank.")
    noise = noise_line(records, paired)
    if noise:
        sure.append(noise)
    hosts = hosts_line(records, environments or [])
    if hosts:
        sure.append(hosts)
    precision = precision_line(rows, baseline, paired, lead["allocator"] if lead else None)
    if precision:
        sure.append(precision)
    if failed:
        reasons = sorted({r["failure"] or "unknown" for r in failed})
        sure.append(f"{len(failed)} run(s) failed and were not counted: " + "; ".join(reasons[:3]))
    table = [[r["allocator"], _fmt(r["gen_latency_s"]),
              _range(r["gen_latency_ci_low"], r["gen_latency_ci_high"]),
              _fmt(r["ratio_vs_baseline"]), _range(r["ratio_ci_low"], r["ratio_ci_high"]),
              _fmt(r["p_value"], 3), _fmt(_ms(r["itl_p25_s"])), _fmt(r["itl_ratio_vs_baseline"]),
              _range(r["itl_ratio_ci_low"], r["itl_ratio_ci_high"]), _fmt(r["itl_p_value"], 3),
              _fmt(r["wall_real_s"]), _fmt(r["rss_mb"]), r["n"], r["n_failed"],
              f"{r['library'] or '(libc)'} {r['version'] or ''}".strip()]
             for r in rows]
    headers = ["allocator", "gen_latency_s", "95% CI", f"ratio vs {baseline}", "ratio CI", "p",
               "itl_p25_ms", "ITL ratio", "ITL ratio CI", "ITL p", "wall_real_s", "rss_mb", "n", "failed",
               "loaded library"]
    sections = [("How far to trust these figures", sure), ("Every allocator", every)]
    return ("# Allocator impact on generation latency\n\n"
            + "\n".join(f"- {b}" for b in head) + "\n\n"
            + "".join(f"## {title}\n\n" + "\n".join(f"- {b}" for b in items) + "\n\n"
                      for title, items in sections if items)
            + "## Per allocator\n\n"
            + tabulate(table, headers=headers, tablefmt="github") + "\n\n"
            "Medians over runs; CIs are 95 % percentile bootstrap intervals; p-values are two-sided "
            + ("Wilcoxon signed-rank tests of the per-pair log ratios (paired design). " if paired else
               "Mann–Whitney U tests of the per-run values. ")
            + "gen_latency_s is what a caller of `generate` waits; "
            "itl_p25_s is the decode step a token takes when nothing else slows the host: where a shared host "
            "slows stretches of a run (see `itl_trace.png`), it moves far less than gen_latency_s, so it "
            "resolves smaller allocator effects, but it does not see allocator costs that only hit some tokens. "
            "Raw runs: `runs.jsonl`.\n")


def plot(rows: list[dict[str, Any]], records: list[dict[str, Any]], results: ResultsDir) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in measured(records) if r["status"] == "ok"]
    names = [r["allocator"] for r in rows]
    panels = [("gen_latency_s", "gen_latency per run (ms)\nmedian of warm generates", "Generation latency")]
    if any(r.get("itl_p25_s") is not None for r in runs):
        panels.append(("itl_p25_s", "ITL p25 per run (ms)\nlower quartile of inter-token gaps", "Decode step"))
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * (1.8 + 1.4 * len(names)), 4), squeeze=False)
    for ax, (key, ylabel, title) in zip(axes[0], panels, strict=True):
        data = [[r[key] * 1000 for r in runs if r["allocator"] == n and r.get(key) is not None] for n in names]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(names) + 1), names)
        for i, values in enumerate(data, start=1):
            ax.scatter([i] * len(values), values, s=14, alpha=0.7, zorder=3)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} by allocator")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(results.path(PLOT_FILE), dpi=110)
    plt.close(fig)


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    ranked = sorted((r for r in runs if r.get("gen_latency_s") is not None), key=lambda r: r["gen_latency_s"])
    return ranked[(len(ranked) - 1) // 2] if ranked else None


def plot_itl_trace(rows: list[dict[str, Any]], records: list[dict[str, Any]], results: ResultsDir) -> bool:
    """Every inter-token gap of one run per allocator (its median run), in order: shows whether noise is
    bursts of slow steps on a shared host or a steady shift. False when the probes kept no gaps."""
    runs = [r for r in measured(records) if r["status"] == "ok"]
    traces = []
    for row in rows:
        run = _median_run([r for r in runs if r["allocator"] == row["allocator"]])
        warm = ((run or {}).get("probe") or {}).get("warm") or []
        gaps = [g * 1000 for gen in warm for g in (gen.get("itl_s") or [])]
        if gaps:
            traces.append((row["allocator"], run, gaps))
    if not traces:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(traces), 1, figsize=(10, 1.2 + 1.6 * len(traces)), sharex=True, sharey=True,
                             squeeze=False)
    for ax, (name, run, gaps) in zip(axes[:, 0], traces, strict=True):
        ax.plot(range(len(gaps)), gaps, lw=0.8)
        if run.get("itl_p25_s") is not None:
            ax.axhline(run["itl_p25_s"] * 1000, color="k", lw=0.8, ls="--", label="ITL p25")
            ax.legend(loc="upper right", fontsize=7)
        ax.set_ylabel(f"{name}\nITL (ms)")
        ax.grid(alpha=0.3)
        ax.set_title(f"{name}: run {run['run_index']} (median gen_latency run), {run['started_at'][:19]}",
                     fontsize=8, loc="left")
    axes[-1, 0].set_xlabel("decode step, all warm generates of the run in order")
    fig.tight_layout()
    fig.savefig(results.path(TRACE_FILE), dpi=110)
    plt.close(fig)
    return True


def write(results: ResultsDir, records: list[dict[str, Any]], config: dict[str, Any],
          order: list[str]) -> list[dict[str, Any]]:
    rows = allocator_rows(records, order, paired=bool(config.get("paired")))
    results.write_csv(CSV_FILE, CSV_COLUMNS, rows)
    results.write_text(SUMMARY_FILE, summary_markdown(rows, config, records, results.environments()))
    if any(r["n"] for r in rows):
        plot(rows, records, results)
        plot_itl_trace(rows, records, results)
    return rows
