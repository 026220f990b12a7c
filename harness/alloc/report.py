"""From runs.jsonl to allocator_latency_comparison.csv, summary.md and a plot. Every figure computed."""

from __future__ import annotations

import datetime as dt
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tabulate import tabulate

from harness.alloc.run import DEFAULT_METRIC, METRICS, measured_seconds
from harness.alloc.runners.base import describe_cpus, describe_placement
from harness.measure import stats
from harness.measure.records import AllocRun, Environment
from harness.measure.results import ResultsDir, save_figure
from harness.measure.stopping import STOP_REASONS, format_duration

CSV_FILE = "alloc/allocator_latency_comparison.csv"
SUMMARY_FILE = "alloc/summary.md"
PLOT_FILE = "alloc/gen_latency.png"
TRACE_FILE = "alloc/itl_trace.png"
STOP_FILE = "alloc/stopping.jsonl"  # each precision check and each stop of an open-ended experiment

PRECISION_TARGET = 0.03  # the ratio CI half-width the precision line plans for
METRIC_LABELS = {"itl_p25": "decode step (ITL p25)", "gen_latency": "generation latency"}
Z95 = 1.959964

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


def measured(records: list[AllocRun]) -> list[AllocRun]:
    return [r for r in records if not r.warmup]


def side_by_side(records: list[AllocRun], candidate: str, baseline: str) -> list[tuple[AllocRun, AllocRun]]:
    """Paired design: (candidate run, the baseline run that ran beside it), both verified."""
    by_index = {r.run_index: r for r in records}
    pairs = []
    for r in records:
        partner = by_index.get(r.concurrent_with)
        if (r.allocator == candidate and partner is not None and partner.allocator == baseline
                and r.ok and partner.ok):
            pairs.append((r, partner))
    return pairs


def _compare(key: str, mine: list[AllocRun], base_ok: list[AllocRun],
             pairs: list[tuple[AllocRun, AllocRun]] | None) -> stats.Comparison:
    if pairs is not None:
        return stats.compare_paired([(c.value(key), b.value(key)) for c, b in pairs])
    return stats.compare([r.value(key) for r in mine], [r.value(key) for r in base_ok])


def baseline_of(order: list[str]) -> str:
    return "glibc" if "glibc" in order else order[0]


def comparisons(records: list[AllocRun], order: list[str], key: str,
                paired: bool = False) -> dict[str, stats.Comparison]:
    """Every allocator but the baseline against it on one per-run value: the CIs of the CSV and summary."""
    runs = measured(records)
    baseline = baseline_of(order)
    ok = {name: [r for r in runs if r.allocator == name and r.ok] for name in order}
    return {name: _compare(key, ok[name], ok[baseline], side_by_side(runs, name, baseline) if paired else None)
            for name in order if name != baseline}


@dataclass(frozen=True)
class AllocRow:
    """One allocator's line of the CSV and the summary: medians over its verified runs and its comparisons
    against the baseline (None where a figure means nothing for the baseline itself)."""

    allocator: str
    gen_latency_s: float
    wall_real_s: float
    rss_mb: float
    n: int
    n_failed: int
    gen_latency_ci_low: float
    gen_latency_ci_high: float
    ratio_vs_baseline: float
    ratio_ci_low: float
    ratio_ci_high: float
    p_value: float | None
    significant: bool | None
    wall_ratio_vs_baseline: float
    wall_p_value: float | None
    rss_diff_mb: float | None
    itl_p25_s: float
    itl_p50_s: float
    itl_ratio_vs_baseline: float
    itl_ratio_ci_low: float
    itl_ratio_ci_high: float
    itl_p_value: float | None
    itl_significant: bool | None
    cold_latency_s: float
    ttft_s: float
    tpot_s: float
    load_s: float
    gpu_peak_allocated_mb: float
    gpu_peak_reserved_mb: float
    container_peak_mb: float
    container_working_set_peak_mb: float
    library: str | None
    version: str | None
    comparison: stats.Comparison  # generation latency against the baseline
    itl: stats.Comparison  # ITL p25 against the baseline
    wall: stats.Comparison  # the process's wall time against the baseline

    def csv_row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in CSV_COLUMNS}


def allocator_rows(records: list[AllocRun], order: list[str], paired: bool = False) -> list[AllocRow]:
    runs = measured(records)
    baseline = baseline_of(order)
    ok = {name: [r for r in runs if r.allocator == name and r.ok] for name in order}
    return [_allocator_row(name, ok[name], ok[baseline], runs, baseline,
                           side_by_side(runs, name, baseline) if paired and name != baseline else None)
            for name in order]


def _allocator_row(name: str, mine: list[AllocRun], base_ok: list[AllocRun], runs: list[AllocRun], baseline: str,
                   pairs: list[tuple[AllocRun, AllocRun]] | None) -> AllocRow:
    summary = stats.summarize([r.gen_latency_s for r in mine])
    comp = _compare("gen_latency_s", mine, base_ok, pairs)
    itl = _compare("itl_p25_s", mine, base_ok, pairs)
    wall = _compare("wall_real_s", mine, base_ok, pairs)
    loaded = next((r.loaded_allocator for r in mine if r.loaded_allocator), None) or {}
    rss = _median([r.rss_mb for r in mine])
    is_base = name == baseline

    def med(key: str) -> float:
        return _median([r.value(key) for r in mine])

    return AllocRow(
        allocator=name, gen_latency_s=summary.median, wall_real_s=med("wall_real_s"), rss_mb=rss, n=summary.n,
        n_failed=sum(1 for r in runs if r.allocator == name and not r.ok),
        gen_latency_ci_low=summary.ci_low, gen_latency_ci_high=summary.ci_high,
        ratio_vs_baseline=comp.ratio, ratio_ci_low=comp.ratio_ci_low, ratio_ci_high=comp.ratio_ci_high,
        p_value=None if is_base else comp.p_value, significant=None if is_base else comp.significant,
        wall_ratio_vs_baseline=wall.ratio, wall_p_value=None if is_base else wall.p_value,
        rss_diff_mb=rss - _median([r.rss_mb for r in base_ok]) if base_ok else None,
        itl_p25_s=med("itl_p25_s"), itl_p50_s=med("itl_p50_s"),
        itl_ratio_vs_baseline=itl.ratio, itl_ratio_ci_low=itl.ratio_ci_low, itl_ratio_ci_high=itl.ratio_ci_high,
        itl_p_value=None if is_base else itl.p_value, itl_significant=None if is_base else itl.significant,
        cold_latency_s=med("cold_latency_s"), ttft_s=med("ttft_s"), tpot_s=med("tpot_s"), load_s=med("load_s"),
        gpu_peak_allocated_mb=med("gpu_peak_allocated_mb"), gpu_peak_reserved_mb=med("gpu_peak_reserved_mb"),
        container_peak_mb=med("container_peak_mb"), container_working_set_peak_mb=med("container_working_set_peak_mb"),
        library=loaded.get("malloc_library"), version=loaded.get("version"),
        comparison=comp, itl=itl, wall=wall)


def run_to_run_spread(runs: list[AllocRun], key: str) -> float | None:
    """The standard deviation of log(run / its allocator's median) over verified runs (0.05: about 5 %), so
    allocator effects do not count as noise; an allocator with a single run tells nothing of it. None under
    3 runs that count."""
    import numpy as np

    medians = {}
    for name in {r.allocator for r in runs}:
        values = [r.value(key) for r in runs if r.allocator == name and r.value(key)]
        if len(values) >= 2:
            medians[name] = float(np.median(values))
    logs = [math.log(r.value(key) / medians[r.allocator]) for r in runs if r.value(key) and r.allocator in medians]
    return float(np.std(logs, ddof=1)) if len(logs) >= 3 else None


def noise_line(records: list[AllocRun], paired: bool, metric: str = DEFAULT_METRIC) -> str | None:
    """How noisy this host was: the run-to-run spread of each metric (each run divided by its allocator's
    median, so allocator effects do not count as noise), how many decode steps were slowed, and for the
    paired design how much the two sides of a pair moved together."""
    import numpy as np

    runs = [r for r in measured(records) if r.ok]
    if len(runs) < 3:
        return None
    parts = []
    for key, label in (("gen_latency_s", "gen_latency"), ("itl_p25_s", "ITL p25")):
        spread = run_to_run_spread(runs, key)
        if spread is not None:
            parts.append(f"run-to-run spread of {label} {spread * 100:.1f} %")
    slowed = []
    for r in runs:
        gaps = [g for gen in ((r.probe or {}).get("warm") or []) for g in (gen.get("itl_s") or [])]
        if gaps and r.itl_p25_s:
            slowed.append(sum(g > 1.5 * r.itl_p25_s for g in gaps) / len(gaps))
    if slowed:
        parts.append(f"decode steps slower than 1.5× their run's ITL p25: {np.median(slowed) * 100:.0f} % "
                     f"(median over runs, up to {max(slowed) * 100:.0f} %)")
    signals = signals_part(runs, metric)
    if signals:
        parts.append(signals)
    if paired:
        by_index = {r.run_index: r for r in runs}
        sides = [(r, by_index[r.concurrent_with]) for r in runs
                 if r.concurrent_with in by_index and r.run_index < r.concurrent_with]
        if len(sides) >= 3:
            a = [math.log(x.itl_p25_s) for x, _ in sides]
            b = [math.log(y.itl_p25_s) for _, y in sides]
            parts.append(f"correlation of the two sides' ITL p25 within pairs r = {np.corrcoef(a, b)[0, 1]:.2f} "
                         "(near 1: pairing cancels the host's slow stretches; near 0: it cannot)")
    return ("Noise — " + "; ".join(parts) + ".") if parts else None


def _noise(record: AllocRun, *path: str) -> Any:
    value: Any = record.noise or {}
    for key in path:
        value = (value or {}).get(key)
    return value


@dataclass(frozen=True)
class Signal:
    """Something besides the allocator that can slow a run, as each run recorded it."""

    label: str
    read: Callable[[AllocRun], float | None]
    unit: str
    worse: int  # +1: more of it takes more from the run (steal); -1: less of it does (a clock)
    unreadable: Callable[[AllocRun], str | None] = lambda r: None  # why the probe could not read it
    recorded: Callable[[AllocRun], bool] = lambda r: bool(r.noise)  # older probes did not record it


SIGNALS = [
    Signal("hypervisor steal", lambda r: r.steal_pct, " %", +1, recorded=lambda r: r.recorded("steal_pct")),
    Signal("involuntary preemptions", lambda r: r.involuntary_switches, "", +1,
           recorded=lambda r: r.recorded("involuntary_switches")),
    Signal("minor page faults", lambda r: _noise(r, "minor_faults"), "", +1),
    Signal("major page faults", lambda r: _noise(r, "major_faults"), "", +1),
    Signal("GPU SM clock (lowest)", lambda r: _noise(r, "gpu", "sm_clock_min_mhz"), " MHz", -1,
           lambda r: _noise(r, "gpu_unreadable")),
    Signal("GPU memory clock (lowest)", lambda r: _noise(r, "gpu", "mem_clock_min_mhz"), " MHz", -1,
           lambda r: _noise(r, "gpu_unreadable")),
    Signal("GPU slowdown reasons (share of samples)", lambda r: _noise(r, "gpu", "slowdown_pct"), " %", +1,
           lambda r: _noise(r, "gpu_unreadable")),
    Signal("CPU frequency (mean)", lambda r: _noise(r, "cpu_freq", "mean_mhz"), " MHz", -1,
           lambda r: _noise(r, "cpu_freq_unreadable")),
]
MIN_RUNS_FOR_RHO = 8
MIN_SPREAD_ROUNDS = 3  # rounds before a run-to-run spread means anything


def _within_allocator(runs: list[AllocRun], values: list[float]) -> list[float]:
    """Each value minus its allocator's median: what varies from run to run, not between allocators."""
    import numpy as np

    names = [r.allocator for r in runs]
    medians = {a: float(np.median([v for n, v in zip(names, values, strict=True) if n == a])) for a in set(names)}
    return [v - medians[n] for n, v in zip(names, values, strict=True)]


def _signal_text(signal: Signal, runs: list[AllocRun], slowness: list[float]) -> tuple[str, bool] | None:
    """(what the signal did, whether it moved with the slow runs), or None where no run recorded it."""
    import numpy as np
    from scipy import stats as sps

    if not any(signal.recorded(r) for r in runs):
        return None  # runs made before the probe recorded it
    pairs = [(signal.read(r), s, r) for r, s in zip(runs, slowness, strict=True) if signal.read(r) is not None]
    if not pairs:
        why = next((signal.unreadable(r) for r in runs if signal.unreadable(r)), None)
        return f"{signal.label} not readable on this host" + (f" ({why})" if why else ""), False
    values = [float(v) for v, _, _ in pairs]
    if min(values) == max(values):
        return f"{signal.label} {_num(values[0])}{signal.unit} in every run", False
    text = f"{signal.label} median {_num(float(np.median(values)))}{signal.unit} ({_num(min(values))}–" \
           f"{_num(max(values))})"
    if len(pairs) < MIN_RUNS_FOR_RHO:
        return text, False
    centred = _within_allocator([r for _, _, r in pairs], values)
    if min(centred) == max(centred):
        return text, False
    res = sps.spearmanr(centred, [s for _, s, _ in pairs])
    moved = bool(res.pvalue < stats.ALPHA and signal.worse * res.statistic > 0)
    return text + f", ρ = {res.statistic:.2f}" + (" (moved with the slow runs)" if moved else ""), moved


def _num(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 or x == int(x) else f"{x:.1f}"


def signals_part(runs: list[AllocRun], metric: str = DEFAULT_METRIC) -> str | None:
    """What besides the allocator could have slowed each run while it measured (hypervisor steal, preemptions,
    page faults, GPU clocks and throttle reasons, CPU frequency), and which of them moved with the slow runs:
    the rank correlation ρ of each, within each allocator, with the run's `metric` (relative to its allocator's
    median). A signal that moved with the slow runs points at the host, not the allocator."""
    key = METRICS[metric]
    runs = [r for r in runs if r.value(key)]
    if len(runs) < 3:
        return None
    names = {r.allocator for r in runs}
    medians = {a: statistics.median(r.value(key) for r in runs if r.allocator == a) for a in names}
    slowness = [math.log(r.value(key) / medians[r.allocator]) for r in runs]
    texts = [(sig, t) for sig, t in ((sig, _signal_text(sig, runs, slowness)) for sig in SIGNALS) if t is not None]
    if not texts:
        return None
    moved = [sig.label for sig, (_, did) in texts if did]
    rho = (f"ρ: rank correlation, within each allocator, with the run's {METRIC_LABELS[metric]}"
           if len(runs) >= MIN_RUNS_FOR_RHO else f"ρ from {MIN_RUNS_FOR_RHO} runs on")
    verdict = (f"moved with the slow runs: {', '.join(moved)} (the host, not the allocator, slowed those runs)"
               if moved else "none of them moved with the slow runs" if len(runs) >= MIN_RUNS_FOR_RHO else "")
    return (f"while the runs measured ({rho}): " + "; ".join(t for _, (t, _) in texts)
            + (f"; {verdict}" if verdict else ""))


def run_hosts(records: list[AllocRun], environments: dict[str, Environment]) -> dict[int, str]:
    """run_index → host key. A run names the environment file of the invocation that ran it (alloc-run/2);
    an older run belongs to the last environment collected before it started (each invocation, first or
    --resume, writes one before its first run)."""
    hosts = {r.run_index: environments[r.environment].host_key for r in records if r.environment in environments}
    when = dt.datetime.fromisoformat
    sessions = sorted((when(e.collected_at), e.host_key) for e in environments.values() if e.collected_at)
    for r in records:
        if r.run_index in hosts or not r.started_at or not sessions:
            continue
        started = when(r.started_at)
        earlier = [key for at, key in sessions if at <= started]
        hosts[r.run_index] = earlier[-1] if earlier else sessions[0][1]
    return hosts


def hosts_line(records: list[AllocRun], environments: dict[str, Environment]) -> str | None:
    """Where runs came from more than one host: each host's level of the steady decode step, since a
    slower host widens every ratio CI."""
    hosts = run_hosts(records, environments)
    groups: dict[str, list[float]] = {}
    for r in measured(records):
        if r.ok and r.itl_p25_s and r.run_index in hosts:
            groups.setdefault(hosts[r.run_index], []).append(r.itl_p25_s)
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
    return max(comp.n_candidate, math.ceil(comp.n_candidate * (comp.half_width / target) ** 2))


def precision_line(rows: list[AllocRow], baseline: str, paired: bool, lead: str | None = None) -> str | None:
    """How far the widest ratio CI is from ±PRECISION_TARGET, and about how many runs would reach it, for
    every allocator and for the lead one (jemalloc) alone. ±X is the CI's half-width, as for --target-ci."""
    parts = []
    for key, label in (("comparison", "generation latency"), ("itl", "decode step (ITL p25)")):
        named = {r.allocator: getattr(r, key) for r in rows
                 if r.allocator != baseline and not math.isnan(getattr(r, key).ratio_ci_low)}
        comps = list(named.values())
        if not comps:
            continue
        widest = max(comps, key=lambda c: c.half_width)  # the width --target-ci stops on
        need = max((runs_needed(c) or 0) for c in comps)
        half = widest.half_width * 100
        unit = "pairs" if paired else "runs per allocator"
        plan = (f"roughly {need} {unit} would narrow every one to ±{PRECISION_TARGET * 100:.0f} % at this spread"
                if need > widest.n_candidate else f"within ±{PRECISION_TARGET * 100:.0f} %")
        lead_need = runs_needed(named[lead]) if lead in named and len(named) > 1 else None
        if lead_need is not None and widest.n_candidate < lead_need < need:
            plan += f", {lead_need} for {lead} alone"
        parts.append(f"{label}: widest ratio CI ±{half:.1f} % with {widest.n_candidate} {unit}; {plan}")
    return ("Precision — " + "; ".join(parts) + " (`--resume` with a larger `--runs` adds runs).") if parts else None


def share_line(records: list[AllocRun]) -> str | None:
    """How much of each run's wall time was measured generation, the rest being start-up and exit."""
    runs = [r for r in measured(records) if r.ok and r.wall_real_s]
    shares = [(measured_seconds(r.probe) or 0.0, r.wall_real_s) for r in runs]
    shares = [(m, w) for m, w in shares if m > 0]
    if not shares:
        return None
    share = statistics.median(m / w for m, w in shares)
    return (f"Run cost — measured generation took {share * 100:.0f} % of each run's wall time (median over "
            f"{len(shares)} runs: {statistics.median(m for m, _ in shares):.1f} s of "
            f"{statistics.median(w for _, w in shares):.1f} s); the rest is the fresh process's start-up (imports, "
            "model, cold generate) and exit.")


def stopping_line(stop: dict[str, Any] | None, records: list[AllocRun], order: list[str],
                  paired: bool) -> str | None:
    """What stopped an open-ended experiment (--target-ci / --max-time), and the CI its runs reached."""
    if not stop:
        return None
    rule = stop.get("rule") or {}
    metric = rule.get("metric", DEFAULT_METRIC)
    comps = comparisons(records, order, METRICS[metric], paired)
    widths = [c.half_width for c in comps.values()]
    reached = ("no ratio CI yet" if not widths or any(math.isnan(w) for w in widths)
               else f"widest ratio CI ±{max(widths) * 100:.1f} %")
    target = rule.get("target")
    aim = f" against a target of ±{target * 100:g} %" if target else ""
    limit = f", --max-time {format_duration(rule['max_time_s'])}" if rule.get("max_time_s") else ""
    rounds = len({r.round for r in measured(records)})
    text = (f"Stopping — stopped because {STOP_REASONS.get(stop['reason'], stop['reason'])}, after {rounds} "
            f"measured round(s) in {format_duration(stop.get('elapsed_s') or 0)}{limit}: on the "
            f"{METRIC_LABELS[metric]}, {reached}{aim}.")
    if target:
        text += (f" The rule stops on the CIs' width alone (never on where they lie or on a p-value), checked once "
                 f"a round from round {rule.get('min_rounds', 1)} on.")
    return text


def runs_for(spread: float, target: float) -> int:
    """Runs per allocator for a ratio CI of ±target at this run-to-run spread: the median of n runs has a
    standard error of about sqrt(pi/2) spread/sqrt(n), and a ratio adds two of them (a rough plan)."""
    return math.ceil(math.pi * (Z95 * spread / math.log1p(target)) ** 2)


def answer_lines(records: list[AllocRun], config: dict[str, Any], order: list[str]) -> list[str]:
    """The answer a user can act on, per allocator against the baseline, on the experiment's metric: a
    verdict (a significant change, or none beyond a bound within the target), or 'inconclusive on this
    host' with the spread and how many runs (and minutes) a target-wide answer would need: scaled from the
    CI itself as the Precision line does, or from the spread while a few runs make the CI itself unreliable."""
    metric = config.get("metric") or DEFAULT_METRIC
    key, label = METRICS[metric], METRIC_LABELS[metric]
    target = config.get("target_ci") or PRECISION_TARGET
    paired = bool(config.get("paired"))
    baseline = baseline_of(order)
    runs = [r for r in measured(records) if r.ok]
    spread = run_to_run_spread(runs, key)
    walls = [r.wall_real_s for r in runs if r.wall_real_s]
    lines = []
    for name, comp in comparisons(records, order, key, paired).items():
        head = f"{name} vs {baseline}, {label}:"
        if comp.significant:
            lines.append(stats.verdict(name, baseline, comp, label, paired))
        elif comp.half_width <= target:
            bound = max(abs(comp.ratio_ci_low - 1), abs(comp.ratio_ci_high - 1)) * 100
            lines.append(f"{head} no change beyond ±{bound:.1f} % (ratio {comp.ratio:.3f}, 95 % CI "
                         f"{(comp.ratio_ci_low - 1) * 100:+.1f} % to {(comp.ratio_ci_high - 1) * 100:+.1f} %, "
                         f"n = {comp.n_candidate}/{comp.n_baseline}).")
        elif spread is None:
            lines.append(f"{head} inconclusive on this host: too few verified runs ({comp.n_candidate} of {name}) "
                         f"to tell the run-to-run spread; {_first_estimate(records, order, paired)}.")
        else:
            need = runs_needed(comp, target) if comp.n_candidate >= MIN_RUNS_FOR_RHO else runs_for(spread, target)
            per_unit = (len(order) - 1 if paired else len(order)) * (statistics.median(walls) if walls else 0.0)
            lines.append(f"{head} inconclusive on this host: run-to-run spread {spread * 100:.1f} %, a "
                         f"±{target * 100:g} % answer needs about {need} runs per allocator "
                         f"({math.ceil(need * per_unit / 60)} minutes).")
    return lines


def _first_estimate(records: list[AllocRun], order: list[str], paired: bool) -> str:
    """How long the MIN_SPREAD_ROUNDS rounds that a first spread estimate needs would take, from any run's wall."""
    walls = [r.wall_real_s for r in records if r.ok and r.wall_real_s]
    if not walls:
        return "run it longer (--max-time, or more --runs)"
    per_round = (len(order) - 1 if paired else len(order)) * statistics.median(walls)
    return (f"{MIN_SPREAD_ROUNDS} measured rounds would give a first estimate: about "
            f"{math.ceil(MIN_SPREAD_ROUNDS * per_round / 60)} minutes at {statistics.median(walls):.0f} s a run "
            "(--max-time)")


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


def lead_row(rows: list[AllocRow], baseline: str) -> AllocRow | None:
    """The allocator the summary leads with: jemalloc, else the first one compared with the baseline."""
    candidates = [r for r in rows if r.allocator != baseline]
    return next((r for r in candidates if r.allocator == "jemalloc"), candidates[0] if candidates else None)


TRUST_KINDS = ("answer", "paired", "noise", "hosts", "precision", "stopping", "run cost", "failed")


def trust_lines(rows: list[AllocRow], config: dict[str, Any], records: list[AllocRun],
                environments: dict[str, Environment] | None = None,
                stop: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(kind, line) of the summary's "How far to trust these figures": the answer per allocator, the paired
    design, noise, hosts, precision, stopping, run cost and failed runs (kinds: TRUST_KINDS), where each applies."""
    order = [r.allocator for r in rows]
    baseline = baseline_of(order)
    paired = bool(config.get("paired"))
    lead = lead_row(rows, baseline)
    out = [("answer", f"Answer — {line}") for line in answer_lines(records, config, order)]
    if paired:
        halves = "; ".join(f"side {i}: {describe_placement(p)}" for i, p in enumerate(config.get("placements") or []))
        out.append(("paired", f"Paired design: every run of another allocator ran at the same time as a {baseline} "
                    f"run, each on its own half of the host ({halves}), sides swapped every round; ratios are "
                    "medians of the per-pair ratios, CIs bootstrap over pairs, p-values Wilcoxon signed-rank."))
    out += [("noise", noise_line(records, paired, config.get("metric") or DEFAULT_METRIC)),
            ("hosts", hosts_line(records, environments or {})),
            ("precision", precision_line(rows, baseline, paired, lead.allocator if lead else None)),
            ("stopping", stopping_line(stop, records, order, paired)), ("run cost", share_line(records))]
    failed = [r for r in measured(records) if not r.ok]
    if failed:
        reasons = sorted({r.failure or "unknown" for r in failed})
        out.append(("failed", f"{len(failed)} run(s) failed and were not counted: " + "; ".join(reasons[:3])))
    return [(kind, text) for kind, text in out if text]


def summary_markdown(rows: list[AllocRow], config: dict[str, Any], records: list[AllocRun],
                     environments: dict[str, Environment] | None = None, stop: dict[str, Any] | None = None) -> str:
    baseline = "glibc" if any(r.allocator == "glibc" for r in rows) else rows[0].allocator
    paired = bool(config.get("paired"))
    base = next(r for r in rows if r.allocator == baseline)
    candidates = [r for r in rows if r.allocator != baseline]
    lead = lead_row(rows, baseline)
    head: list[str] = []  # 3-5 bullets on the lead allocator (jemalloc), as the seed asks
    every: list[str] = []  # the full verdicts of the other allocators
    useful = max(config.get("target_ci") or 0.0, stats.USEFUL_BOUND)
    for row in candidates:
        lines = [stats.verdict(row.allocator, baseline, row.comparison, "generation latency", paired, useful)]
        if row.itl.n_candidate:
            lines.append(stats.verdict(row.allocator, baseline, row.itl, "decode step time (ITL p25)",
                                       paired, useful))
        wall: stats.Comparison = row.wall
        rss_diff = row.rss_diff_mb
        rss_text = ("–" if rss_diff is None or math.isnan(rss_diff)
                    else f"{rss_diff:+.1f} MB ({rss_diff / base.rss_mb * 100:+.1f} %)")
        lines.append(f"{row.allocator}: process wall time ratio {_fmt(wall.ratio)} "
                     f"(p = {_fmt(wall.p_value, 3)}); peak RSS {_fmt(row.rss_mb)} MB vs "
                     f"{_fmt(base.rss_mb)} MB, a difference of {rss_text}.")
        (head if row is lead else every).extend(lines)
    others = [r for r in candidates if r is not lead]
    if others:
        head.append("Other allocators vs " + baseline + ": " + "; ".join(
            f"{r.allocator} latency ratio {_ratio(r.ratio_vs_baseline)} "
            f"({_range(r.ratio_ci_low, r.ratio_ci_high)}), ITL ratio {_ratio(r.itl_ratio_vs_baseline)} "
            f"({_range(r.itl_ratio_ci_low, r.itl_ratio_ci_high)})"
            + (" — significant" if r.significant or r.itl_significant else "") for r in others)
            + " (verdicts below).")
    n_min = min((r.n for r in rows), default=0)
    head.append(
        f"Setup: {config.get('model')} on {records[0].device if records else config.get('device')}, "
        f"{n_min}+ verified runs per allocator (fresh process each, interleaved, "
        + (f"each pinned to {describe_cpus(config['affinity'])}, " if config.get("affinity") else "")
        + f"{config.get('warmup_runs', 0)} warm-up round(s) discarded), gen_latency_s = median of "
        + (f"the warm generate calls that filled {config['measure_s']:g} s of generation"
           if config.get("measure_s") is not None else f"{config.get('warm_gens')} warm generate calls")
        + f" of {config.get('max_new_tokens')} tokens per run; "
        "itl_p25_s = lower quartile of every inter-token gap of those calls.")
    sure = [text for _, text in trust_lines(rows, config, records, environments, stop)]
    table = [[r.allocator, _fmt(r.gen_latency_s),
              _range(r.gen_latency_ci_low, r.gen_latency_ci_high),
              _fmt(r.ratio_vs_baseline), _range(r.ratio_ci_low, r.ratio_ci_high),
              _fmt(r.p_value, 3), _fmt(_ms(r.itl_p25_s)), _fmt(r.itl_ratio_vs_baseline),
              _range(r.itl_ratio_ci_low, r.itl_ratio_ci_high), _fmt(r.itl_p_value, 3),
              _fmt(r.wall_real_s), _fmt(r.rss_mb), r.n, r.n_failed,
              f"{r.library or '(libc)'} {r.version or ''}".strip()]
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


def plot(rows: list[AllocRow], records: list[AllocRun], results: ResultsDir) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in measured(records) if r.ok]
    names = [r.allocator for r in rows]
    panels = [("gen_latency_s", "gen_latency per run (ms)\nmedian of warm generates", "Generation latency")]
    if any(r.itl_p25_s is not None for r in runs):
        panels.append(("itl_p25_s", "ITL p25 per run (ms)\nlower quartile of inter-token gaps", "Decode step"))
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * (1.8 + 1.4 * len(names)), 4), squeeze=False)
    for ax, (key, ylabel, title) in zip(axes[0], panels, strict=True):
        data = [[r.value(key) * 1000 for r in runs if r.allocator == n and r.value(key) is not None] for n in names]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(names) + 1), names)
        for i, values in enumerate(data, start=1):
            ax.scatter([i] * len(values), values, s=14, alpha=0.7, zorder=3)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} by allocator")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, results.path(PLOT_FILE), dpi=110)
    plt.close(fig)


def _median_run(runs: list[AllocRun]) -> AllocRun | None:
    ranked = sorted((r for r in runs if r.gen_latency_s is not None), key=lambda r: r.gen_latency_s)
    return ranked[(len(ranked) - 1) // 2] if ranked else None


def plot_itl_trace(rows: list[AllocRow], records: list[AllocRun], results: ResultsDir) -> bool:
    """Every inter-token gap of one run per allocator (its median run), in order: shows whether noise is
    bursts of slow steps on a shared host or a steady shift. False when the probes kept no gaps."""
    runs = [r for r in measured(records) if r.ok]
    traces = []
    for row in rows:
        run = _median_run([r for r in runs if r.allocator == row.allocator])
        warm = ((run.probe if run else None) or {}).get("warm") or []
        gaps = [g * 1000 for gen in warm for g in (gen.get("itl_s") or [])]
        if gaps:
            traces.append((row.allocator, run, gaps))
    if not traces:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(traces), 1, figsize=(10, 1.2 + 1.6 * len(traces)), sharex=True, sharey=True,
                             squeeze=False)
    for ax, (name, run, gaps) in zip(axes[:, 0], traces, strict=True):
        ax.plot(range(len(gaps)), gaps, lw=0.8)
        if run.itl_p25_s is not None:
            ax.axhline(run.itl_p25_s * 1000, color="k", lw=0.8, ls="--", label="ITL p25")
            ax.legend(loc="upper right", fontsize=7)
        ax.set_ylabel(f"{name}\nITL (ms)")
        ax.grid(alpha=0.3)
        ax.set_title(f"{name}: run {run.run_index} (median gen_latency run), {run.started_at[:19]}",
                     fontsize=8, loc="left")
    axes[-1, 0].set_xlabel("decode step, all warm generates of the run in order")
    fig.tight_layout()
    save_figure(fig, results.path(TRACE_FILE), dpi=110)
    plt.close(fig)
    return True


def last_stop(results: ResultsDir) -> dict[str, Any] | None:
    """The stop record of an open-ended experiment (its last, after a --resume), or None."""
    stops = [e for e in results.read_jsonl(STOP_FILE) if e.get("event") == "stop"]
    return stops[-1] if stops else None


def write(results: ResultsDir, records: list[AllocRun], config: dict[str, Any],
          order: list[str]) -> list[AllocRow]:
    rows = allocator_rows(records, order, paired=bool(config.get("paired")))
    results.write_csv(CSV_FILE, CSV_COLUMNS, [row.csv_row() for row in rows])
    results.write_text(SUMMARY_FILE, summary_markdown(rows, config, records, results.read_environments(),
                                                      last_stop(results)))
    if any(r.n for r in rows):
        plot(rows, records, results)
        plot_itl_trace(rows, records, results)
    return rows
