"""Statistics against cases whose answers are known."""

import math

import numpy as np
import pytest

from harness import stats


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
    from harness.alloc_report import precision_line, runs_needed

    rng = np.random.default_rng(1)
    base = list(1.0 + 0.05 * rng.standard_normal(12))
    wide = stats.compare(list(1.0 + 0.30 * np.abs(rng.standard_normal(12))), base)
    for spread, mentioned in ((0.05, True), (0.001, False)):
        lead = stats.compare(list(1.0 + spread * rng.standard_normal(12)), base if mentioned else [1.0] * 12)
        rows = [{"allocator": "glibc", "_comparison": stats.compare(base, base), "_itl": stats.compare(base, base)},
                {"allocator": "jemalloc", "_comparison": lead, "_itl": lead},
                {"allocator": "tcmalloc", "_comparison": wide, "_itl": wide}]
        line = precision_line(rows, "glibc", paired=False, lead="jemalloc")
        assert f"roughly {runs_needed(wide)} runs per allocator would narrow every one to ±3 %" in line
        assert (f", {runs_needed(lead)} for jemalloc alone" in line) is mentioned, line
        assert 12 < runs_needed(lead) < runs_needed(wide) if mentioned else runs_needed(lead) == 12


def test_contention_part_tells_whether_the_slow_runs_lost_cpu_to_other_guests():
    from harness.alloc_report import contention_part

    runs = [{"steal_pct": float(i), "involuntary_switches": 10 + i, "itl_p25_s": 0.020 + 0.001 * i}
            for i in range(10)]
    text = contention_part(runs)
    assert "median 4.5 %, max 9.0 %" in text and "median 14" in text and "ρ = 1.00" in text
    assert "ρ = -1.00" in contention_part([{**r, "steal_pct": 9.0 - r["steal_pct"]} for r in runs])
    # too few runs, or runs recorded before the probe measured steal: nothing to say
    assert contention_part(runs[:2]) is None
    assert contention_part([{k: v for k, v in r.items() if k != "steal_pct"} for r in runs]) is None
