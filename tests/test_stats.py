"""Statistics against cases whose answers are known."""

import math
import re
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from harness.measure import stats
from harness.measure.records import AllocRun

pytestmark = pytest.mark.fast  # known cases, no process: the fast tier


def test_identical_samples_are_not_different():
    x = [1.0, 1.1, 0.9, 1.05, 0.95]
    comp = stats.compare(x, list(x))
    assert comp.ratio == pytest.approx(1.0)
    assert comp.p_value == pytest.approx(1.0)
    assert not comp.significant
    assert "no significant difference" in stats.verdict("jemalloc", "glibc", comp)


def test_fully_separated_samples_give_exact_mann_whitney_p():
    # 5 vs 5 with no overlap: exact two-sided p = 2 / C(10, 5) = 2/252.
    fast = [0.50, 0.51, 0.52, 0.49, 0.505]
    slow = [1.00, 1.01, 0.99, 1.02, 0.98]
    comp = stats.compare(fast, slow)
    assert comp.p_value == pytest.approx(2 / 252)
    assert comp.ratio == pytest.approx(np.median(fast) / np.median(slow))
    assert comp.ratio_ci_high < 1.0 and comp.significant
    text = stats.verdict("jemalloc", "glibc", comp, "generation latency")
    assert text.startswith("jemalloc helped generation latency by 49.5 %")


def test_slower_candidate_is_reported_as_hurting():
    comp = stats.compare([2.0, 2.1, 1.9, 2.05, 1.95, 2.02], [1.0, 1.1, 0.9, 1.05, 0.95, 1.01])
    assert comp.significant and comp.ratio > 1.5
    assert "hurt" in stats.verdict("tcmalloc", "glibc", comp)


def test_bootstrap_ci_covers_the_true_ratio():
    rng = np.random.default_rng(1)
    a = rng.normal(0.9, 0.02, 40)
    b = rng.normal(1.0, 0.02, 40)
    comp = stats.compare(a, b)
    assert comp.ratio_ci_low < 0.9 < comp.ratio_ci_high
    assert comp.ratio_ci_high - comp.ratio_ci_low < 0.05


def test_summary_and_missing_values():
    s = stats.summarize([3.0, 1.0, 2.0, None, float("nan")])
    assert (s.n, s.median, s.minimum, s.maximum) == (3, 2.0, 1.0, 3.0)
    assert s.ci_low <= 2.0 <= s.ci_high
    empty = stats.summarize([])
    assert empty.n == 0 and math.isnan(empty.median)
    assert "no successful runs" in stats.verdict("x", "glibc", stats.compare([], [1.0]))


def test_paired_comparison_cancels_noise_both_sides_share():
    """Host slow phases hit both runs of a pair: the paired ratio sees the 2 % effect, the unpaired one cannot."""
    rng = np.random.default_rng(1)
    host = rng.lognormal(0.0, 0.15, size=30)  # the shared host's speed, run to run
    base = host * rng.lognormal(0.0, 0.005, size=30)
    cand = 1.02 * host * rng.lognormal(0.0, 0.005, size=30)
    paired = stats.compare_paired(list(zip(cand, base, strict=True)))
    unpaired = stats.compare(cand, base)
    assert paired.n_candidate == 30 and paired.significant
    assert paired.ratio_ci_low < 1.02 < paired.ratio_ci_high and paired.ratio_ci_high - paired.ratio_ci_low < 0.01
    assert not unpaired.significant and unpaired.ratio_ci_high - unpaired.ratio_ci_low > 0.1
    assert "pairs" in stats.verdict("jemalloc", "glibc", paired, paired=True)


def test_paired_comparison_skips_missing_values():
    comp = stats.compare_paired([(1.0, None), (None, 1.0), (1.1, 1.0), (float("nan"), 1.0)])
    assert comp.n_candidate == 1 and comp.ratio == pytest.approx(1.1) and math.isnan(comp.ratio_ci_low)


def test_precision_line_plans_for_every_allocator_and_for_the_lead_alone():
    """The widest CI sets the plan for every allocator; the lead allocator's own, smaller plan comes beside
    it, and is left out once the lead is already within ±3 %."""
    from harness.alloc.report import precision_line, runs_needed

    rng = np.random.default_rng(1)
    base = list(1.0 + 0.05 * rng.standard_normal(12))
    wide = stats.compare(list(1.0 + 0.30 * np.abs(rng.standard_normal(12))), base)
    for spread, mentioned in ((0.05, True), (0.001, False)):
        lead = stats.compare(list(1.0 + spread * rng.standard_normal(12)), base if mentioned else [1.0] * 12)
        rows = [SimpleNamespace(allocator="glibc", comparison=stats.compare(base, base), itl=stats.compare(base, base)),
                SimpleNamespace(allocator="jemalloc", comparison=lead, itl=lead),
                SimpleNamespace(allocator="tcmalloc", comparison=wide, itl=wide)]
        line = precision_line(rows, "glibc", paired=False, lead="jemalloc")
        assert f"roughly {runs_needed(wide)} runs per allocator would narrow every one to ±3 %" in line
        assert (f", {runs_needed(lead)} for jemalloc alone" in line) is mentioned, line
        assert 12 < runs_needed(lead) < runs_needed(wide) if mentioned else runs_needed(lead) == 12


def _runs(values: dict[str, list[float]], **extra) -> list[AllocRun]:
    """Verified measured runs as runs.jsonl holds them, round by round (synthetic values)."""
    runs = []
    for i in range(max(len(v) for v in values.values())):
        for name, v in values.items():
            if i < len(v):
                runs.append(AllocRun(run_index=len(runs), round=i, position=0, allocator=name, status="ok",
                                     itl_p25_s=v[i], gen_latency_s=10 * v[i], wall_real_s=20.0,
                                     **{k: f(i, name) for k, f in extra.items()}))
    return runs


def test_signals_name_what_moved_with_the_slow_runs():
    """Steal that rises with a run's ITL p25 is named; a steady GPU clock and an unreadable CPU frequency are
    said as such; page faults that only differ between allocators do not count as moving with slow runs."""
    from harness.alloc.report import signals_part

    rng = np.random.default_rng(3)
    slow = {name: list(0.020 * np.exp(0.05 * rng.standard_normal(10))) for name in ("glibc", "jemalloc")}
    rank = {name: {v: i for i, v in enumerate(sorted(vals))} for name, vals in slow.items()}
    runs = _runs(slow, steal_pct=lambda i, n: float(rank[n][slow[n][i]]), involuntary_switches=lambda i, n: 100,
                 noise=lambda i, n: {"minor_faults": 1000 if n == "jemalloc" else 10, "major_faults": 0,
                                     "gpu": {"sm_clock_min_mhz": 1980, "mem_clock_min_mhz": 2619, "slowdown_pct": 0.0},
                                     "cpu_freq": None, "cpu_freq_unreadable": "no cpufreq scaling_cur_freq in sysfs"})
    text = signals_part(runs)
    assert re.search(r"hypervisor steal median 4.5 % \(0–9\), ρ = 0\.9\d \(moved with the slow runs\)", text), text
    assert "involuntary preemptions 100 in every run" in text
    assert "GPU SM clock (lowest) 1980 MHz in every run" in text
    assert "CPU frequency (mean) not readable on this host (no cpufreq scaling_cur_freq in sysfs)" in text
    assert "minor page faults median 505 (10–1000);" in text  # no ρ: within each allocator they never moved
    assert text.endswith("moved with the slow runs: hypervisor steal (the host, not the allocator, slowed those runs)")
    calm = [replace(r, steal_pct=0.0) for r in runs]
    assert signals_part(calm).endswith("none of them moved with the slow runs")
    # runs recorded before the probe read page faults and clocks: those signals are left out, not "unreadable"
    old = [AllocRun.load({k: v for k, v in r.to_dict().items() if k != "noise"}) for r in runs]
    assert "page faults" not in signals_part(old) and "GPU" not in signals_part(old)
    assert signals_part(runs[:2]) is None


def test_a_wide_ci_is_called_inconclusive_never_a_bound():
    """A CI of -93 % to +470 % rules nothing useful out: the verdict says inconclusive instead."""
    wide = stats.Comparison(5, 5, 1.015, 0.065, 5.699, 0.9)
    text = stats.verdict("jemalloc", "glibc", wide, "generation latency")
    assert "inconclusive" in text and "ruled out" not in text and "469.9" in text  # the CI itself is still given
    narrow = stats.Comparison(20, 20, 1.01, 0.97, 1.05, 0.5)
    assert "a change beyond ±5.0 % is ruled out at 95 %" in stats.verdict("jemalloc", "glibc", narrow)
    assert narrow.half_width == pytest.approx(0.04 / 1.01)


def test_answer_is_a_verdict_or_the_runs_a_usable_one_needs():
    from harness.alloc.report import answer_lines, run_to_run_spread, runs_for

    config = {"metric": "itl_p25", "target_ci": 0.03}
    rng = np.random.default_rng(5)
    tight = {n: list(0.02 * np.exp(0.004 * rng.standard_normal(12))) for n in ("glibc", "jemalloc")}
    (line,) = answer_lines(_runs(tight), config, ["glibc", "jemalloc"])
    assert line.startswith("jemalloc vs glibc, decode step (ITL p25): no change beyond ±")
    apart = {"glibc": tight["glibc"], "jemalloc": [1.2 * v for v in tight["jemalloc"]]}
    (line,) = answer_lines(_runs(apart), config, ["glibc", "jemalloc"])
    assert line.startswith("jemalloc hurt decode step (ITL p25) by 19.")
    noisy = {n: list(0.02 * np.exp(0.10 * rng.standard_normal(4))) for n in ("glibc", "jemalloc")}
    runs = _runs(noisy)
    (line,) = answer_lines(runs, config, ["glibc", "jemalloc"])
    spread = run_to_run_spread(runs, "itl_p25_s")
    need = runs_for(spread, 0.03)
    assert line.endswith(f"inconclusive on this host: run-to-run spread {spread * 100:.1f} %, a ±3 % answer needs "
                         f"about {need} runs per allocator ({math.ceil(need * 2 * 20.0 / 60)} minutes).")  # 20 s a run
    (line,) = answer_lines(_runs({"glibc": [0.02], "jemalloc": [0.021]}), config, ["glibc", "jemalloc"])
    assert "too few verified runs (1 of jemalloc)" in line
    assert line.endswith("3 measured rounds would give a first estimate: about 2 minutes at 20 s a run (--max-time).")


def test_runs_for_plans_about_the_ci_it_promises():
    """With the run count runs_for names, the bootstrap ratio CI of medians comes out about ±target wide."""
    from harness.alloc.report import runs_for

    rng = np.random.default_rng(7)
    n = runs_for(0.05, 0.04)
    widths = [stats.compare(np.exp(0.05 * rng.standard_normal(n)), np.exp(0.05 * rng.standard_normal(n))).half_width
              for _ in range(20)]
    assert 0.6 * 0.04 < float(np.median(widths)) < 1.4 * 0.04, (n, widths)


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("2m", 120), ("1h30m", 5400), ("1.5h", 5400), ("45", 45),
                                           ("2m30s", 150)])
def test_durations_read_like_the_issue_writes_them(text, seconds):
    from harness.measure.stopping import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "2x", "-5", "0s", "1m-2s"])
def test_durations_refuse_what_is_not_one(text):
    from harness.measure.stopping import parse_duration

    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


class Clock:
    """A clock the test moves by hand, for the deadline rule."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_stopper_holds_back_a_round_that_would_end_after_the_deadline(tmp_path):
    from harness.alloc.stopping import AllocStopper
    from harness.measure.results import ResultsDir
    from harness.measure.stopping import StopRule

    clock = Clock()
    stopper = AllocStopper(StopRule(target=None, metric="itl_p25", max_time_s=100.0), ResultsDir(tmp_path),
                           ["glibc", "jemalloc"], clock=clock)
    assert stopper.may_start(2, [])  # nothing measured yet: no estimate, the first run starts
    clock.now = 30.0
    stopper.unit_done(30.0)
    assert stopper.may_start(2, [])  # 2 × 30 s fit in the 70 s left
    clock.now = 60.0
    stopper.unit_done(30.0)
    assert stopper.may_start(1, []) and not stopper.may_start(2, [])  # 40 s left: one run, not a round
    assert stopper.held_back
    clock.now = 101.0
    assert not stopper.may_start(1, [])


def test_stopper_checks_the_width_once_a_round_from_the_minimum_on(tmp_path):
    """The check sees the rounds up to its own only, and stops on width whatever the ratio."""
    from harness.alloc.stopping import AllocStopper
    from harness.measure.results import ResultsDir
    from harness.measure.stopping import StopRule

    rng = np.random.default_rng(11)
    far_apart = {"glibc": list(np.exp(0.01 * rng.standard_normal(8))),
                 "jemalloc": list(1.5 * np.exp(0.01 * rng.standard_normal(8)))}
    runs = _runs(far_apart)
    results = ResultsDir(tmp_path)
    stopper = AllocStopper(StopRule(target=0.05, metric="itl_p25", min_rounds=3, max_rounds=6), results,
                           ["glibc", "jemalloc"], warmup_rounds=1)
    assert list(stopper.rounds()) == [-1, 0, 1, 2, 3, 4, 5]
    assert not stopper.round_done(1, runs)  # before the third round: no check
    assert results.read_jsonl("alloc/stopping.jsonl") == []
    assert stopper.round_done(2, runs)  # far from 1, but narrow: the width alone decides
    check, stop = results.read_jsonl("alloc/stopping.jsonl")
    upto = [r for r in runs if r.round <= 2]
    comp = stats.compare([r.itl_p25_s for r in upto if r.allocator == "jemalloc"],
                         [r.itl_p25_s for r in upto if r.allocator == "glibc"])
    assert check["event"] == "check" and check["widest"] == pytest.approx(comp.half_width) and check["reached"]
    assert stop["event"] == "stop" and stop["reason"] == "target" and stop["round"] == 2
