"""Reports of the duet design: the hierarchical comparison (steps within sets, CI over sets), its variance
components, the A/A calibration, the CSV with the seed's columns first, the summary and the plots."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from harness.alloc.duet import SETS_FILE, WINDOWS_FILE, counted_windows
from harness.alloc.report import CSV_FILE, METRIC_LABELS, PRECISION_TARGET, STOP_FILE, SUMMARY_FILE
from harness.alloc.run import CONFIG_FILE, METRICS
from harness.measure import stats
from harness.measure.records import AllocSet, AllocWindow
from harness.measure.results import ResultsDir
from harness.measure.stopping import STOP_REASONS, format_duration

RATIO_PLOT_FILE = "alloc/window_ratios.png"
WINDOW_PLOT_FILE = "alloc/window_latency.png"
CALIBRATION_DIR = "calibration"  # an A/A run of the same design, beside the A/B it certifies
POWER_FACTOR = (1.959964 + 0.841621) / 1.959964  # the smallest effect found 80 % of the time, per CI half-width
DUET_STOP_REASONS = {**STOP_REASONS, "sets": "its --sets sets were done", "max-runs": "--max-rounds sets were done",
                     "failed": "every probe of the first set failed, or it was not verified"}

CSV_COLUMNS = [
    "allocator", "gen_latency_s", "wall_real_s", "rss_mb",
    "n_windows", "n_sets", "n_failed_sets",
    "ratio_vs_baseline", "ratio_ci_low", "ratio_ci_high", "p_value", "significant",
    "itl_p25_s", "itl_ratio_vs_baseline", "itl_ratio_ci_low", "itl_ratio_ci_high", "itl_p_value", "itl_significant",
    "within_set_pct", "between_set_pct", "limiting",
    "cold_latency_s", "ttft_s", "tpot_s", "load_s", "gpu_peak_allocated_mb", "library", "version",
]


@dataclass(frozen=True)
class Duet:
    """A duet experiment as it lies in its results directory."""

    config: dict[str, Any]
    sets: list[AllocSet]
    windows: list[AllocWindow]

    @classmethod
    def load(cls, results: ResultsDir) -> Duet | None:
        saved = results.read_json(CONFIG_FILE)
        if not saved or (saved.get("config") or {}).get("design") != "duet":
            return None
        return cls(saved["config"], results.read_records(SETS_FILE, AllocSet),
                   results.read_records(WINDOWS_FILE, AllocWindow))

    @property
    def labels(self) -> list[str]:
        return list(self.config.get("arms") or [a["name"] for a in self.config["allocators"]])

    @property
    def baseline(self) -> str:
        return self.labels[0] if self.config.get("calibration") else self.config["baseline"]

    @property
    def metric(self) -> str:
        return self.config.get("metric") or "itl_p25"

    @property
    def counted(self) -> list[AllocWindow]:
        return counted_windows(self.sets, self.windows)

    def comparison(self, label: str, key: str) -> stats.SetComparison:
        return stats.compare_sets(list(step_log_ratios(self.counted, label, self.baseline, key).values()))

    def comparisons(self, key: str) -> dict[str, stats.SetComparison]:
        return {label: self.comparison(label, key) for label in self.labels if label != self.baseline}


def step_log_ratios(windows: list[AllocWindow], label: str, baseline: str, key: str) -> dict[int, list[float]]:
    """Per set, the log ratio candidate/baseline of `key` in each step both measured (adjacent windows)."""
    return stats.step_log_ratios(((w.set_index, w.step, w.arm, w.value(key)) for w in windows), label, baseline)


def half_widths(duet: Duet, metric: str) -> dict[str, float]:
    return {label: comp.half_width for label, comp in duet.comparisons(METRICS[metric]).items()}


# --- rows and CSV -----------------------------------------------------------------------------------
def _median(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _arm_entries(duet: Duet, label: str) -> list[dict[str, Any]]:
    return [a for s in duet.sets if s.counted for a in s.arms if a.get("label") == label]


def arm_row(duet: Duet, label: str) -> dict[str, Any]:
    mine = [w for w in duet.counted if w.arm == label]
    entries = _arm_entries(duet, label)
    failed = sum(1 for s in duet.sets if s.status == "failed")
    row: dict[str, Any] = {
        "allocator": label, "gen_latency_s": _median([w.gen_latency_s for w in mine]),
        "wall_real_s": _median([a.get("wall_real_s") for a in entries]),
        "rss_mb": _median([max((w.peak_rss_mb or 0) for w in mine if w.set_index == s.set_index) or None
                           for s in duet.sets if s.counted]),
        "n_windows": len(mine), "n_sets": len({w.set_index for w in mine}), "n_failed_sets": failed,
        "itl_p25_s": _median([w.itl_p25_s for w in mine]),
        "cold_latency_s": _median([a.get("cold_latency_s") for a in entries]),
        "ttft_s": _median([w.ttft_s for w in mine]), "tpot_s": _median([w.tpot_s for w in mine]),
        "load_s": _median([a.get("load_s") for a in entries]),
        "gpu_peak_allocated_mb": _median([w.gpu_peak_allocated_mb for w in mine]),
    }
    loaded = next((a.get("loaded_allocator") for a in entries if a.get("loaded_allocator")), None) or {}
    row["library"], row["version"] = loaded.get("malloc_library"), loaded.get("version")
    if label != duet.baseline:
        for prefix, key in (("", "gen_latency_s"), ("itl_", "itl_p25_s")):
            comp = duet.comparison(label, key)
            row.update({f"{prefix}ratio_vs_baseline": comp.ratio, f"{prefix}ratio_ci_low": comp.ratio_ci_low,
                        f"{prefix}ratio_ci_high": comp.ratio_ci_high, f"{prefix}p_value": comp.p_value,
                        f"{prefix}significant": comp.significant})
        comp = duet.comparison(label, METRICS[duet.metric])
        row.update(within_set_pct=_pct(comp.within_sd), between_set_pct=_pct(comp.between_sd),
                   limiting=comp.limiting)
    return row


def _pct(log_sd: float) -> float | None:
    return None if math.isnan(log_sd) else math.expm1(log_sd) * 100


# --- lines ------------------------------------------------------------------------------------------
def sets_needed(comp: stats.SetComparison, target: float) -> int | None:
    """Sets for a ±target CI at the spread of the sets' estimates seen (t interval), or None without one."""
    if comp.n_sets < 2 or math.isnan(comp.ratio_ci_low):
        return None
    sd = math.sqrt(comp.within_sd ** 2 + comp.between_sd ** 2) if not math.isnan(comp.within_sd) else 0.0
    if sd == 0:
        return comp.n_sets
    for n in range(2, 10_000):
        if stats.sps.t.ppf(0.975, n - 1) * sd / math.sqrt(n) <= math.log1p(target):
            return max(n, comp.n_sets)
    return None


def verdict_line(duet: Duet, label: str, key: str, quantity: str, target: float) -> str:
    comp = duet.comparison(label, key)
    if comp.significant or comp.n_sets < 2:
        return stats.verdict(label, duet.baseline, comp, quantity, more="more sets narrow it")
    if comp.half_width <= target:
        bound = max(abs(comp.ratio_ci_low - 1), abs(comp.ratio_ci_high - 1)) * 100
        return (f"{label} vs {duet.baseline}, {quantity}: no change beyond ±{bound:.1f} % (ratio {comp.ratio:.3f}, "
                f"95 % CI {(comp.ratio_ci_low - 1) * 100:+.1f} % to {(comp.ratio_ci_high - 1) * 100:+.1f} %, "
                f"{comp.n_sets} sets, {comp.n_candidate} window pairs).")
    need = sets_needed(comp, target)
    plan = f"; about {need} sets would narrow it to ±{target * 100:g} %" if need else ""
    return (f"{label} vs {duet.baseline}, {quantity}: inconclusive so far (ratio {comp.ratio:.3f}, CI "
            f"±{comp.half_width * 100:.1f} % over {comp.n_sets} sets){plan}.")


def precision_line(duet: Duet, target: float) -> str | None:
    """The widest ratio CI on the experiment's metric, whether it is within the target, and what limits it."""
    comps = duet.comparisons(METRICS[duet.metric])
    comps = {k: c for k, c in comps.items() if not math.isnan(c.ratio_ci_low)}
    if not comps:
        return None
    label, widest = max(comps.items(), key=lambda kv: kv[1].half_width)
    half = widest.half_width
    where = (f"within the ±{target * 100:g} % target" if half <= target
             else f"wider than the ±{target * 100:g} % target")
    text = (f"Precision — on the {METRIC_LABELS[duet.metric]}, the widest ratio CI is ±{half * 100:.1f} % "
            f"({label}, {widest.n_sets} sets, {widest.n_candidate} window pairs): {where}.")
    if widest.n_sets < 2:
        return text + " One set only: what differs between fresh processes is not inside this CI; run more sets."
    if half > target:
        need = sets_needed(widest, target)
        if need:
            text += f" About {need} sets would reach it at this spread."
    return text


def variance_line(duet: Duet) -> str | None:
    """What the CI's width comes from: each set's own noise (within) or what differs between fresh sets."""
    comps = {k: c for k, c in duet.comparisons(METRICS[duet.metric]).items() if c.limiting}
    if not comps:
        return None
    parts = [f"{label}: the sets' ratios spread by ±{_pct(_spread(c)):.1f} %, each set's own steps predict "
             f"±{_pct(c.within_sd):.1f} %, leaving ±{_pct(c.between_sd):.1f} % between sets"
             for label, c in comps.items()]
    limits = sorted({c.limiting for c in comps.values()})
    advice = ("more sets narrow the CIs, longer sets barely do" if limits == ["between sets"]
              else "more sets or more steps per set both narrow the CIs" if limits == ["within sets"]
              else "more sets narrow every CI")
    ratios = "; ".join(f"{k}: " + ", ".join(f"{r:.3f}" for r in c.set_ratios) for k, c in comps.items())
    return (f"Variance — {'; '.join(parts)}. {' and '.join(limits).capitalize()} limit"
            f"{'s' if len(limits) == 1 else ''} precision: {advice}. Per-set ratios: {ratios}.")


def _spread(comp: stats.SetComparison) -> float:
    """The standard deviation of the sets' log ratios."""
    logs = [math.log(r) for r in comp.set_ratios]
    return statistics.stdev(logs) if len(logs) > 1 else float("nan")


def calibration_result(duet: Duet) -> dict[str, Any] | None:
    """An A/A duet's bias (with its CI), the share of its sets that alone would have called a difference, and
    the smallest effect its budget resolves (80 % power, from its CI)."""
    labels = duet.labels
    if len(labels) != 2:
        return None
    key = METRICS[duet.metric]
    comp = duet.comparison(labels[1], key)
    if math.isnan(comp.ratio):
        return None
    per_set = step_log_ratios(duet.counted, labels[1], labels[0], key)
    flagged = sum(1 for logs in per_set.values()
                  if stats.compare_paired([(math.exp(v), 1.0) for v in logs]).significant)
    return {"comparison": comp, "sets": len(per_set), "flagged": flagged,
            "resolves": comp.half_width * POWER_FACTOR if not math.isnan(comp.half_width) else float("nan"),
            "passes": math.isnan(comp.ratio_ci_low) or comp.ratio_ci_low <= 1.0 <= comp.ratio_ci_high}


def calibration_line(duet: Duet, label: str = "Calibration") -> str | None:
    cal = calibration_result(duet)
    if cal is None:
        return None
    comp = cal["comparison"]
    labels = duet.labels
    ci = ("no CI (one set)" if math.isnan(comp.ratio_ci_low)
          else f"95 % CI {(comp.ratio_ci_low - 1) * 100:+.1f} % to {(comp.ratio_ci_high - 1) * 100:+.1f} %")
    verdict = ("its CI includes no bias" if cal["passes"] else "a bias: its CI excludes 0, so placement or order "
               "favoured one arm; read the A/B's effects against it")
    resolves = "" if math.isnan(cal["resolves"]) else (f"; smallest effect this budget resolves (80 % power): "
                                                       f"±{cal['resolves'] * 100:.1f} %")
    return (f"{label} — A/A ({labels[0]} against itself as {labels[1]}, {cal['sets']} sets, "
            f"{comp.n_candidate} window pairs, on the {METRIC_LABELS[duet.metric]}): bias "
            f"{(comp.ratio - 1) * 100:+.2f} % ({ci}): {verdict}; {cal['flagged']} of {cal['sets']} sets alone "
            f"called a difference{resolves}.")


def stopping_line(duet: Duet, stop: dict[str, Any] | None) -> str | None:
    if not stop:
        return None
    rule = stop.get("rule") or {}
    target = rule.get("target")
    widths = [w for w in (stop.get("half_widths") or {}).values() if w is not None and not math.isnan(w)]
    reached = f"widest ratio CI ±{max(widths) * 100:.1f} %" if widths else "no ratio CI yet"
    aim = f" against a target of ±{target * 100:g} %" if target else ""
    sets = len({s.set_index for s in duet.sets if s.counted})
    return (f"Stopping — stopped because {DUET_STOP_REASONS.get(stop['reason'], stop['reason'])}, after {sets} "
            f"counted set(s) in {format_duration(stop.get('elapsed_s') or 0)}: on the "
            f"{METRIC_LABELS[duet.metric]}, {reached}{aim} (checked once a set, on the CI's width alone).")


def failed_line(duet: Duet) -> str | None:
    failed = [s for s in duet.sets if s.status == "failed"]
    if not failed:
        return None
    why = "; ".join(f"set {s.set_index + 1}: {s.failure}" for s in failed[:3])
    return f"Failed — {len(failed)} of {len(duet.sets)} sets failed and were not counted ({why})."


def design_line(duet: Duet) -> str:
    c = duet.config
    gens = c.get("window_gens")
    window = f"{c['window_s']:g} s of generation" if c.get("window_s") else f"{gens} generate{'s' * (gens != 1)}"
    counted = [s for s in duet.sets if s.counted]
    shared = any(len({str((a.get("placement") or {}).get("cpus")) for a in s.arms}) < len(s.arms) for s in counted)
    if c.get("cpu_placement") == "shared":
        pinned = "every process on the same CPUs (--cpu-placement shared)"
    elif not shared:
        pinned = "each process on its own CPUs, rotated across sets"
    else:
        pinned = "every process on the same CPUs (fewer CPUs than arms)"
    return (f"Design — duet: {len(counted)} sets of fresh persistent probes ({', '.join(duet.labels)}), "
            f"{c.get('windows_per_set')} steps per set after {1} warm-up step, a window of {window}; one process "
            f"generates at a time, the first in each step alternating; {pinned}; start order rotated.")


def answer_lines(duet: Duet) -> list[str]:
    target = duet.config.get("target_ci") or PRECISION_TARGET
    if duet.config.get("calibration"):
        line = calibration_line(duet, "A/A calibration")
        return [line] if line else []
    key, label = METRICS[duet.metric], METRIC_LABELS[duet.metric]
    return [verdict_line(duet, name, key, label, target) for name in duet.labels if name != duet.baseline]


def calibration_of(results: ResultsDir) -> Duet | None:
    sub = ResultsDir(results.root / CALIBRATION_DIR)
    return Duet.load(sub) if (sub.root / CONFIG_FILE).exists() else None


# --- summary ----------------------------------------------------------------------------------------
def summary_markdown(duet: Duet, rows: list[dict[str, Any]], stop: dict[str, Any] | None,
                     calibration: Duet | None) -> str:
    from tabulate import tabulate

    target = duet.config.get("target_ci") or PRECISION_TARGET
    title = "A/A calibration" if duet.config.get("calibration") else "Allocator impact"
    lines = [f"# {title}: {duet.config['model']} on {duet.config['device']} (duet design)", ""]
    bullets = list(answer_lines(duet))
    if not duet.config.get("calibration"):
        other = "gen_latency" if duet.metric == "itl_p25" else "itl_p25"
        bullets += [verdict_line(duet, name, METRICS[other], METRIC_LABELS[other], target)
                    for name in duet.labels if name != duet.baseline]
    if calibration is not None:
        bullets.append(calibration_line(calibration))
    bullets += [precision_line(duet, target), variance_line(duet), stopping_line(duet, stop), failed_line(duet),
                design_line(duet)]
    lines += [f"- {b}" for b in bullets if b]
    table = [[r["allocator"], _fmt(r["gen_latency_s"]), _fmt(r["itl_p25_s"]), _fmt(r["wall_real_s"]),
              _fmt(r["rss_mb"]), ratio_text(r.get("itl_ratio_vs_baseline"), r.get("itl_ratio_ci_low"),
                                        r.get("itl_ratio_ci_high")),
              ratio_text(r.get("ratio_vs_baseline"), r.get("ratio_ci_low"), r.get("ratio_ci_high")), r["n_windows"],
              r["n_sets"], r["library"] or "–"] for r in rows]
    lines += ["", tabulate(table, headers=["arm", "gen_latency_s", "itl_p25_s", "process wall_s", "rss_mb",
                                           "ITL p25 ratio (CI)", "gen ratio (CI)", "windows", "sets", "malloc"],
                           tablefmt="github", disable_numparse=True), "",
              f"Ratios are against {duet.baseline}; each set's ratio is the median of its steps' adjacent-window "
              "ratios, and the CI a t interval over sets. Plots: `window_ratios.png` (every step's ratio over time, "
              "one line per set), `window_latency.png` (every window by arm).", ""]
    return "\n".join(lines)


def _fmt(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def ratio_text(ratio: Any, low: Any, high: Any) -> str:
    if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)):
        return "–"
    if low is None or (isinstance(low, float) and math.isnan(low)):
        return f"{ratio:.3f}"
    return f"{ratio:.3f} ({low:.3f}–{high:.3f})"


# --- plots ------------------------------------------------------------------------------------------
def plot_ratios(duet: Duet, results: ResultsDir) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = METRICS[duet.metric]
    candidates = [label for label in duet.labels if label != duet.baseline]
    fig, axes = plt.subplots(len(candidates), 1, figsize=(9, 1.5 + 2.4 * len(candidates)), squeeze=False)
    for ax, label in zip(axes[:, 0], candidates, strict=True):
        times = {(w.set_index, w.step): w.t_s for w in duet.counted if w.arm == label}
        for set_index, logs in step_log_ratios(duet.counted, label, duet.baseline, key).items():
            steps = sorted(st for (s, st) in times if s == set_index)[:len(logs)]
            xs = [times[(set_index, st)] or 0.0 for st in steps]
            ax.plot(xs, [math.exp(v) for v in logs], marker=".", lw=0.8, label=f"set {set_index + 1}")
        comp = duet.comparison(label, key)
        if not math.isnan(comp.ratio_ci_low):
            ax.axhspan(comp.ratio_ci_low, comp.ratio_ci_high, color="k", alpha=0.12, label="95 % CI over sets")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel(f"{label} / {duet.baseline}\n{METRIC_LABELS[duet.metric]}")
        ax.legend(fontsize=7, ncol=4, loc="upper right")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("seconds since the set's probes were ready")
    axes[0, 0].set_title("Adjacent-window ratios, step by step")
    fig.tight_layout()
    fig.savefig(results.path(RATIO_PLOT_FILE), dpi=110)
    plt.close(fig)


def plot_windows(duet: Duet, results: ResultsDir) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = METRICS[duet.metric]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    offset = 0.0
    for set_index in sorted({w.set_index for w in duet.counted}):
        mine = [w for w in duet.counted if w.set_index == set_index]
        for label in duet.labels:
            pts = [(offset + (w.t_s or 0.0), w.value(key) * 1000) for w in mine if w.arm == label and w.value(key)]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=8,
                       label=label if set_index == min(w.set_index for w in duet.counted) else None,
                       color=f"C{duet.labels.index(label)}")
        offset += max((w.t_s or 0.0) for w in mine) + 5.0
        ax.axvline(offset - 2.5, color="k", lw=0.5, alpha=0.4)
    ax.set_xlabel("seconds (sets one after another)")
    ax.set_ylabel(f"{METRIC_LABELS[duet.metric]} (ms)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(results.path(WINDOW_PLOT_FILE), dpi=110)
    plt.close(fig)


def last_stop(results: ResultsDir) -> dict[str, Any] | None:
    stops = [e for e in results.read_jsonl(STOP_FILE) if e.get("event") == "stop"]
    return stops[-1] if stops else None


def write(results: ResultsDir, duet: Duet) -> list[dict[str, Any]]:
    rows = [arm_row(duet, label) for label in duet.labels]
    results.write_csv(CSV_FILE, CSV_COLUMNS, rows)
    results.write_text(SUMMARY_FILE, summary_markdown(duet, rows, last_stop(results), calibration_of(results)))
    if duet.counted:
        plot_ratios(duet, results)
        plot_windows(duet, results)
    return rows
