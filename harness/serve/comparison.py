"""`harness serve --allocators`: each allocator's figures and its ratios against the baseline.

The unit is one fresh server, as one fresh process is in `harness alloc`: per counted server (start-up
record ok, its allocator verified) the start-up times, each named phase, the cold request's TTFT, the
median of its warm requests' TTFT, TPOT and E2E, and its memory peaks. Per allocator: the median over
its servers with a bootstrap CI; against the baseline: the ratio of medians with a 95 % bootstrap CI
and a two-sided Mann–Whitney p-value (`harness.measure.stats`, the same as `harness alloc`). Written as a
section of first_token_latency.md, `allocator_comparison.csv` and `allocator_latency.png`.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness.measure import stats, stopping
from harness.measure.records import ServeRequest, StartupRecord
from harness.measure.results import ResultsDir, save_figure
from harness.measure.stopping import STOP_REASONS, format_duration
from harness.serve.config import STOP_METRICS

CSV_FILE = "serve/allocator_comparison.csv"
PLOT_FILE = "serve/allocator_latency.png"
STOP_FILE = "serve/stopping.jsonl"  # each precision check and the stop of an open-ended comparison
SERVE_STOP_REASONS = {
    **STOP_REASONS, "interrupted": "it was interrupted",
    "failed": "its servers failed (every one of the first round, or every arm was left out)",
    "error": "an error ended it",
    "time": "the time was up (--max-time: the next server would likely have ended after it)"}
CSV_COLUMNS = ["metric", "unit", "allocator", "baseline", "n", "median", "ci_low", "ci_high",
               "ratio_vs_baseline", "ratio_ci_low", "ratio_ci_high", "p_value", "significant", "failed_servers"]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str  # the CSV's unit: "s" or "MiB"
    shown: str = ""  # the report's unit when it differs ("ms")

    @property
    def scale(self) -> float:
        return 1e3 if self.shown == "ms" else 1.0


METRICS = [
    Metric("spawn_to_health_s", "start-up (spawn → /health 200)", "s"),
    Metric("spawn_to_first_token_s", "spawn → first token", "s"),
    Metric("cold_ttft_s", "cold TTFT", "s", "ms"),
    Metric("cold_e2e_s", "cold E2E", "s", "ms"),
    Metric("warm_ttft_s", "warm TTFT", "s", "ms"),
    Metric("warm_tpot_s", "warm TPOT", "s", "ms"),
    Metric("warm_e2e_s", "warm E2E", "s", "ms"),
    Metric("server_rss_peak_mb", "server RSS peak (process tree)", "MiB"),
    Metric("container_peak_mb", "container memory peak", "MiB"),
    Metric("container_working_set_peak_mb", "container working-set peak", "MiB"),
    Metric("gpu_used_peak_mb", "GPU memory used, peak", "MiB"),
]
# Warm figures are each server's median over its warm requests.
# The verdicts stated in words, in this order.
VERDICT_KEYS = ("warm_ttft_s", "warm_tpot_s", "cold_ttft_s", "spawn_to_health_s")


def counted(startups: list[StartupRecord]) -> list[StartupRecord]:
    """Servers that count: started, measured and verified under their allocator."""
    return [s for s in startups if s.allocator and s.status == "ok"
            and (s.allocator_check or {}).get("verified")]


def _median(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def server_values(startup: StartupRecord, requests: list[ServeRequest]) -> dict[str, float | None]:
    """One server's figures: start-up, its cold request, the medians of its warm requests, memory peaks
    and the duration of each named start-up phase (`phase:<key>`)."""
    mine = [r for r in requests if r.server == startup.server and r.status == "ok"]
    cold = next((r for r in mine if r.kind == "cold"), ServeRequest(server=startup.server, index=0, kind="cold"))
    warm = [r for r in mine if r.kind == "warm"]
    peaks = startup.memory_peaks or {}
    container = startup.container or {}
    values: dict[str, float | None] = {
        "spawn_to_health_s": startup.spawn_to_health_s,
        "spawn_to_first_token_s": startup.spawn_to_first_token_s,
        "cold_ttft_s": cold.ttft_s,
        "warm_ttft_s": _median([r.ttft_s for r in warm]),
        "warm_tpot_s": _median([r.tpot_s for r in warm]),
        "warm_e2e_s": _median([r.e2e_s for r in warm]),
        "cold_e2e_s": cold.e2e_s,
        "server_rss_peak_mb": peaks.get("server_rss_mb"),
        "container_peak_mb": container.get("peak_mb") or peaks.get("container_usage_mb"),
        "container_working_set_peak_mb": container.get("working_set_peak_mb") or peaks.get("container_working_set_mb"),
        "gpu_used_peak_mb": peaks.get("gpu_used_mb"),
    }
    for phase in startup.phases or []:
        key = f"phase:{phase['key']}"
        values[key] = (values.get(key) or 0.0) + phase["duration_s"]
    return values


def phase_metrics(startups: list[StartupRecord]) -> list[Metric]:
    """A metric per named start-up phase, in the order the servers logged them."""
    seen: dict[str, str] = {}
    for s in startups:
        for phase in s.phases or []:
            seen.setdefault(phase["key"], phase["label"])
    return [Metric(f"phase:{key}", f"phase: {label}", "s") for key, label in seen.items()]


def metrics_for(startups: list[StartupRecord]) -> list[Metric]:
    return METRICS + phase_metrics(startups)


@dataclass(frozen=True)
class Row:
    """One allocator on one metric."""

    metric: Metric
    allocator: str
    baseline: str
    summary: stats.Summary
    comparison: stats.Comparison | None  # None for the baseline itself
    failed_servers: int

    def csv(self) -> dict[str, Any]:
        c = self.comparison
        return {"metric": self.metric.key, "unit": self.metric.unit, "allocator": self.allocator,
                "baseline": self.baseline, "n": self.summary.n, "median": self.summary.median,
                "ci_low": self.summary.ci_low, "ci_high": self.summary.ci_high,
                "ratio_vs_baseline": c.ratio if c else 1.0, "ratio_ci_low": c.ratio_ci_low if c else None,
                "ratio_ci_high": c.ratio_ci_high if c else None, "p_value": c.p_value if c else None,
                "significant": c.significant if c else None, "failed_servers": self.failed_servers}


def comparisons(startups: list[StartupRecord], requests: list[ServeRequest], order: list[str], baseline: str,
                key: str) -> dict[str, stats.Comparison]:
    """Each other allocator against the baseline on one per-server figure (`key`), counted servers only."""
    per = per_allocator(startups, requests, order, [key])[key]
    return {name: stats.compare(per[name], per[baseline]) for name in order if name != baseline}


def per_allocator(startups: list[StartupRecord], requests: list[ServeRequest], order: list[str],
                  keys: list[str]) -> dict[str, dict[str, list[float | None]]]:
    """metric key -> allocator -> the value of each of its counted servers."""
    good = counted(startups)
    values = [(s.allocator, server_values(s, requests)) for s in good]
    return {key: {name: [v.get(key) for a, v in values if a == name] for name in order} for key in keys}


class ServeStopper(stopping.Stopper):
    """`harness alloc`'s stopping rule on the servers of an allocator comparison: the CI widths are those of
    the report's ratios on the rule's metric (`STOP_METRICS`); an arm with no counted server (failed, left
    out) is not waited for."""

    stop_file = STOP_FILE

    def __init__(self, rule: stopping.StopRule, results: ResultsDir, order: list[str], baseline: str,
                 requests: list[ServeRequest], clock: Callable[[], float] = time.monotonic,
                 on_check: Callable[[dict[str, Any]], None] | None = None) -> None:
        super().__init__(rule, results, order, paired=False, warmup_rounds=0, clock=clock, on_check=on_check)
        self.baseline = baseline
        self.requests = requests  # the session's live list: the checks see every request measured so far

    def widths(self, records: list[StartupRecord]) -> dict[str, float]:
        comps = comparisons(records, self.requests, self.order, self.baseline, STOP_METRICS[self.rule.metric])
        return {name: comp.half_width for name, comp in comps.items() if comp.n_candidate}


def stopping_line(stop: dict[str, Any] | None) -> str | None:
    """What stopped an open-ended comparison (--target-ci / --max-time), and the widest CI it reached."""
    if not stop:
        return None
    rule = stop.get("rule") or {}
    widest = stop.get("widest")
    reached = ("no ratio CI yet" if widest is None or math.isnan(widest)
               else f"the widest ratio CI was ±{widest * 100:.1f} %")
    aim = f" (target ±{rule['target'] * 100:g} %)" if rule.get("target") is not None else ""
    limit = f" of {format_duration(rule['max_time_s'])} allowed" if rule.get("max_time_s") else ""
    return (f"Stopping — stopped because {SERVE_STOP_REASONS.get(stop['reason'], stop['reason'])}, after "
            f"{stop.get('rounds')} round(s) in {format_duration(stop.get('elapsed_s') or 0)}{limit}: on "
            f"{rule.get('metric')}, {reached}{aim}. As in `harness alloc`, the rule stops on the CIs' width alone, "
            f"checked once a round from round {rule.get('min_rounds', 1)} on.")


def rows(startups: list[StartupRecord], requests: list[ServeRequest], order: list[str],
         baseline: str) -> list[Row]:
    """Every metric that has a value, for every allocator in `order`."""
    good = counted(startups)
    failed = {name: sum(1 for s in startups if s.allocator == name and s not in good) for name in order}
    metrics = metrics_for(startups)
    values = per_allocator(startups, requests, order, [m.key for m in metrics])
    out: list[Row] = []
    for metric in metrics:
        per = values[metric.key]
        if not any(v is not None for vals in per.values() for v in vals):
            continue
        for name in order:
            comp = None if name == baseline else stats.compare(per[name], per.get(baseline, []))
            out.append(Row(metric, name, baseline, stats.summarize(per[name]), comp, failed[name]))
    return out


def _num(x: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x * scale:.{digits}f}"


def _digits(metric: Metric) -> int:
    return 0 if metric.unit == "MiB" else 1 if metric.shown == "ms" else 2


def table(rs: list[Row]) -> list[str]:
    lines = ["| metric | allocator | median | 95 % CI | ratio vs " + (rs[0].baseline if rs else "baseline")
             + " | 95 % CI | p | n servers |", "|---|---|---|---|---|---|---|---|"]
    for r in rs:
        m, s, c = r.metric, r.summary, r.comparison
        d = _digits(m)
        unit = m.shown or m.unit
        ci = "–" if s.n < 2 or math.isnan(s.ci_low) else f"{_num(s.ci_low, m.scale, d)}–{_num(s.ci_high, m.scale, d)}"
        ratio = "1.000" if c is None else _num(c.ratio, digits=3)
        rci = "–" if c is None or math.isnan(c.ratio_ci_low) else \
            f"{c.ratio_ci_low:.3f}–{c.ratio_ci_high:.3f}"
        p = "–" if c is None or math.isnan(c.p_value) else f"{c.p_value:.3g}"
        lines.append(f"| {m.label} ({unit}) | {r.allocator} | {_num(s.median, m.scale, d)} | {ci} | {ratio} | "
                     f"{rci} | {p} | {s.n} |")
    return lines


def failures(startups: list[StartupRecord]) -> list[str]:
    """One line per server that does not count, with the reason."""
    good = counted(startups)
    return [f"- server {s.server} ({s.allocator}, round {(s.round or 0) + 1}): "
            f"{s.failure or 'allocator not verified'}" for s in startups if s not in good]


def verification_line(startups: list[StartupRecord]) -> str:
    good = counted(startups)
    roles = sorted({p["role"] for s in good for p in (s.allocator_check or {}).get("processes") or []
                    if p.get("verified")})
    return (f"{len(good)} of {len(startups)} server(s) counted: each one's allocator was verified from "
            f"`/proc/PID/maps` in every serving process ({', '.join(roles) or 'none'}): the arm's library "
            "mapped and no other malloc (for glibc: none). A server that showed anything else was stopped, "
            "recorded failed with the reason and left out.")


def cache_line(startups: list[StartupRecord]) -> str | None:
    """Where the counted servers did not all find vLLM's compile cache alike (a shared cache: the first
    start fills it), which servers missed it: their start-up differs for that reason, not the allocator's."""
    good = counted(startups)
    uses = {s.server: (s.compile_cache or {}).get("use") for s in good}
    if len({u for u in uses.values() if u}) < 2:
        return None
    missed = [f"{k} ({next(s.allocator for s in good if s.server == k)})" for k, u in uses.items()
              if u == "miss"]
    return (f"The compile cache was not alike for every server: server(s) {', '.join(missed)} missed it (the "
            "first start with `--compile-cache shared` fills it) and the others loaded it, so their start-up "
            "differs for that reason; fill the cache with one start before comparing (the device script does).")


def outlier_lines(startups: list[StartupRecord], factor: float = 3.0, floor_s: float = 5.0) -> list[str]:
    """Counted servers that spent far longer in one start-up phase than the others did (more than `factor`
    times the others' median and `floor_s` beyond it): a one-off (a cache not yet filled, a JIT build) that
    weighs on one allocator's start-up for a reason of its own, not its allocator's."""
    good = counted(startups)
    out = []
    for metric in phase_metrics(good):
        for s in good:
            mine = server_values(s, []).get(metric.key)
            others = [server_values(o, []).get(metric.key) for o in good if o is not s]
            typical = _median(others)
            if mine is None or typical is None or mine <= max(factor * typical, typical + floor_s):
                continue
            out.append(f"- server {s.server} ({s.allocator}, round {(s.round or 0) + 1}) spent "
                       f"{mine:.1f} s in {metric.label.removeprefix('phase: ')}, against a median "
                       f"{typical:.1f} s on the other servers")
    return out


def intro_line(startups: list[StartupRecord], order: list[str], baseline: str) -> str:
    """How the sequential comparison was made."""
    rounds = len({s.round for s in startups})
    return (f"{', '.join(order)}: {rounds} round(s), one fresh server per allocator each, the order rotated every "
            "round. Per server: its start-up, the cold request, the median of its warm requests and its memory "
            "peaks; per allocator: the median over its servers (95 % bootstrap CI); against "
            f"{baseline}: the ratio of medians with a 95 % bootstrap CI (servers resampled within each "
            "allocator) and a two-sided Mann–Whitney p-value, as `harness alloc` computes them.")


ROUNDS_NARROW = "more rounds would narrow it: --cold-starts, --target-ci"


def section(startups: list[StartupRecord], requests: list[ServeRequest], order: list[str], baseline: str,
            stop: dict[str, Any] | None = None, rs: list[Row] | None = None, intro: list[str] | None = None,
            more: str = ROUNDS_NARROW) -> list[str]:
    """The 'Allocators' section of first_token_latency.md (`stop`: the stop of an open-ended comparison; `rs`,
    `intro`, `more`: another design's rows, its paragraphs and what would narrow its CIs)."""
    rs = rows(startups, requests, order, baseline) if rs is None else rs
    out = ["## Allocators", "", *(intro or [intro_line(startups, order, baseline), ""]),
           verification_line(startups), ""]
    for note in (stopping_line(stop), cache_line(startups)):
        if note:
            out += [note, ""]
    failed = failures(startups)
    if failed:
        out += ["Not counted:", "", *failed, ""]
    outliers = outlier_lines(startups)
    if outliers:
        out += ["One-off start-up costs (counted, but weighing on one allocator's start-up for a reason of their "
                "own; the medians and the rotation of the order bound their effect):", "", *outliers, ""]
    if not rs:
        return out + ["No server was counted: nothing to compare.", ""]
    empty = [name for name in order if not any(r.allocator == name and r.summary.n for r in rs)]
    if empty:
        out += [f"No counted server for {', '.join(empty)}"
                + (f": the baseline {baseline} is missing, so there are no ratios." if baseline in empty else ".")
                + "", ""]
    out += [*table([r for r in rs if r.allocator not in empty]), ""]
    verdicts = []
    for key in VERDICT_KEYS:
        for r in rs:
            if r.metric.key == key and r.comparison is not None and r.allocator not in empty \
                    and baseline not in empty:
                verdicts.append("- " + stats.verdict(r.allocator, baseline, r.comparison, r.metric.label,
                                                     more=more))
    if verdicts:
        out += ["Verdicts:", "", *verdicts, ""]
    out += [f"Per allocator and metric: `{CSV_FILE.split('/')[-1]}`; warm TTFT and TPOT by allocator: "
            f"`{PLOT_FILE.split('/')[-1]}`.", ""]
    return out


def plot(results: ResultsDir, startups: list[StartupRecord], requests: list[ServeRequest],
         order: list[str]) -> bool:
    """Warm TTFT and TPOT by allocator: every warm request (small), each server's median (large) and the
    allocator's median over servers (bar). False when there is nothing to draw."""
    good = {s.server: s.allocator for s in counted(startups)}
    warm = [r for r in requests if r.server in good and r.kind == "warm" and r.status == "ok"]
    panels = [(key, title) for key, title in (("ttft_s", "warm TTFT (ms)"), ("tpot_s", "warm TPOT (ms)"))
              if any(getattr(r, key) is not None for r in warm)]
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * (2.2 + 1.3 * len(order)), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        for i, name in enumerate(order):
            servers = sorted(s for s, a in good.items() if a == name)
            medians = []
            for j, server in enumerate(servers):
                vals = [getattr(r, key) * 1e3 for r in warm if r.server == server and getattr(r, key) is not None]
                if not vals:
                    continue
                x = i + (j - (len(servers) - 1) / 2) * 0.08
                ax.scatter([x] * len(vals), vals, s=8, alpha=0.35, color=f"C{i}")
                medians.append(statistics.median(vals))
                ax.scatter([x], [medians[-1]], s=40, color=f"C{i}", edgecolor="k", zorder=3)
            if medians:
                m = statistics.median(medians)
                ax.hlines(m, i - 0.3, i + 0.3, color="k", lw=1.5, zorder=4)
        ax.set_xticks(range(len(order)), [f"{name}\n{sum(1 for a in good.values() if a == name)} server(s)"
                                          for name in order])
        ax.set_ylabel(title)
        ax.set_title(f"{title.split(' (')[0]} by allocator", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.text(0.5, 0.005, "small: each warm request; large: each server's median; bar: median over servers",
             ha="center", fontsize=7.5, color="0.3")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, results.path(PLOT_FILE), dpi=110)
    plt.close(fig)
    return True


def write(results: ResultsDir, startups: list[StartupRecord], requests: list[ServeRequest], order: list[str],
          baseline: str, rs: list[Row] | None = None) -> list[Row]:
    """The CSV and the plot; returns the rows (`rs`: another design's)."""
    rs = rows(startups, requests, order, baseline) if rs is None else rs
    results.write_csv(CSV_FILE, CSV_COLUMNS, [r.csv() for r in rs])
    plot(results, startups, requests, order)
    return rs
