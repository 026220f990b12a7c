"""Statistics that can tell a real difference from noise.

Per allocator: the median over runs with a bootstrap CI. Against the baseline: the ratio of medians
with a 95 % bootstrap CI (runs resampled within each arm) and a two-sided Mann–Whitney U p-value;
for runs measured side by side (paired design), the median per-pair ratio with a bootstrap CI over
pairs and a Wilcoxon signed-rank p-value.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95
ALPHA = 0.05
N_RESAMPLES = 4000
# Beyond this, "a change beyond ±X % is ruled out" tells a user nothing they can act on: say inconclusive.
USEFUL_BOUND = 0.20


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    ci_low: float
    ci_high: float
    p90: float
    minimum: float
    maximum: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Comparison:
    """`candidate` against `baseline`: ratio < 1 means the candidate is faster (for latencies)."""

    n_candidate: int
    n_baseline: int
    ratio: float
    ratio_ci_low: float
    ratio_ci_high: float
    p_value: float

    @property
    def half_width(self) -> float:
        """The CI's half-width relative to the ratio (0.03: ratio ±3 %), its width alone; NaN without a CI."""
        if math.isnan(self.ratio_ci_low) or math.isnan(self.ratio_ci_high) or not self.ratio:
            return float("nan")
        return (self.ratio_ci_high - self.ratio_ci_low) / 2 / self.ratio

    @property
    def significant(self) -> bool:
        return (self.p_value < ALPHA and not math.isnan(self.ratio_ci_low)
                and (self.ratio_ci_high < 1.0 or self.ratio_ci_low > 1.0))

    def to_dict(self) -> dict[str, float | bool]:
        return {**asdict(self), "significant": self.significant}


def _finite(values: Sequence[float | None]) -> np.ndarray:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    return arr[np.isfinite(arr)]


def summarize(values: Sequence[float | None], seed: int = 0) -> Summary:
    x = _finite(values)
    if x.size == 0:
        nan = float("nan")
        return Summary(0, nan, nan, nan, nan, nan, nan)
    low = high = float("nan")
    if x.size >= 3 and np.ptp(x) > 0:
        res = sps.bootstrap((x,), np.median, confidence_level=CONFIDENCE, n_resamples=N_RESAMPLES,
                            method="percentile", random_state=np.random.default_rng(seed))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    elif x.size >= 1 and np.ptp(x) == 0:
        low = high = float(x[0])
    return Summary(int(x.size), float(np.median(x)), low, high, float(np.percentile(x, 90)),
                   float(x.min()), float(x.max()))


def _ratio_of_medians(cand: np.ndarray, base: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.median(cand, axis=axis) / np.median(base, axis=axis)


def compare(candidate: Sequence[float | None], baseline: Sequence[float | None], seed: int = 0) -> Comparison:
    c, b = _finite(candidate), _finite(baseline)
    nan = float("nan")
    if c.size == 0 or b.size == 0:
        return Comparison(int(c.size), int(b.size), nan, nan, nan, nan)
    ratio = float(np.median(c) / np.median(b))
    low = high = nan
    if c.size >= 2 and b.size >= 2:
        res = sps.bootstrap((c, b), _ratio_of_medians, confidence_level=CONFIDENCE, n_resamples=N_RESAMPLES,
                            method="percentile", vectorized=True, paired=False,
                            random_state=np.random.default_rng(seed))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    p = float(sps.mannwhitneyu(c, b, alternative="two-sided").pvalue) if c.size and b.size else nan
    return Comparison(int(c.size), int(b.size), ratio, low, high, p)


def compare_paired(pairs: Sequence[tuple[float | None, float | None]], seed: int = 0) -> Comparison:
    """(candidate, baseline) values measured side by side: the median of the per-pair ratios with a 95 %
    bootstrap CI over pairs, and a two-sided Wilcoxon signed-rank p-value of the log ratios."""
    good = [(c, b) for c, b in pairs if c is not None and b is not None and c > 0 and b > 0
            and math.isfinite(c) and math.isfinite(b)]
    nan = float("nan")
    if not good:
        return Comparison(0, 0, nan, nan, nan, nan)
    logs = np.log(np.asarray([c / b for c, b in good]))
    ratio = float(np.exp(np.median(logs)))
    low = high = p = nan
    if logs.size >= 2 and np.ptp(logs) > 0:
        res = sps.bootstrap((logs,), np.median, confidence_level=CONFIDENCE, n_resamples=N_RESAMPLES,
                            method="percentile", random_state=np.random.default_rng(seed))
        low, high = float(np.exp(res.confidence_interval.low)), float(np.exp(res.confidence_interval.high))
    if logs.size >= 1 and np.any(logs != 0):
        p = float(sps.wilcoxon(logs).pvalue)
    return Comparison(len(good), len(good), ratio, low, high, p)


MEDIAN_EFFICIENCY = math.sqrt(math.pi / 2)  # SE of a median ≈ 1.2533 σ/√n for roughly normal values


@dataclass(frozen=True)
class SetComparison(Comparison):
    """Windows of two arms measured in alternation inside fresh process sets (the duet design).

    Each set's estimate is the median of its adjacent-window log ratios; the CI is a t interval over the
    sets' estimates, so what differs between fresh processes (placement, start order, address-space layout)
    is inside it. With one set, a bootstrap CI over its steps, which cannot see that variance.
    `within_sd`: the typical standard error of one set's estimate from its own steps (log units, from their
    robust scale);
    `between_sd`: what the sets' estimates vary by beyond that (log units, 0 when within explains all)."""

    n_sets: int
    set_ratios: tuple[float, ...]
    within_sd: float
    between_sd: float

    @property
    def limiting(self) -> str | None:
        """'between sets' or 'within sets': which variance component the CI's width mostly comes from."""
        if self.n_sets < 2 or math.isnan(self.within_sd) or math.isnan(self.between_sd):
            return None
        return "between sets" if self.between_sd > self.within_sd else "within sets"

    def to_dict(self) -> dict[str, float | bool]:
        return {**super().to_dict(), "limiting": self.limiting}


def _median_se2(values: np.ndarray) -> float:
    """The squared standard error of a median, from a robust scale (1.4826 MAD, the standard deviation where the
    values are normal): a host's slow stretches make step ratios heavy-tailed, which the median shrugs off and a
    standard deviation would not."""
    if values.size < 2:
        return float("nan")
    scale = 1.4826 * float(np.median(np.abs(values - np.median(values))))
    if scale == 0:
        scale = float(np.std(values, ddof=1))
    return (MEDIAN_EFFICIENCY * scale) ** 2 / values.size


def step_log_ratios(values: Iterable[tuple[int, int, str, float | None]], name: str, baseline: str
                    ) -> dict[int, list[float]]:
    """Per set, the log ratio name/baseline in each step where both arms were measured: `values` holds
    (set, step, arm, value) of every measurement (a duet window, a duet request); no value, or none above
    zero, leaves its step out."""
    by_step: dict[tuple[int, int], dict[str, float]] = defaultdict(dict)
    for set_index, step, arm, value in values:
        if value is not None and value > 0:
            by_step[(set_index, step)][arm] = value
    out: dict[int, list[float]] = defaultdict(list)
    for (set_index, _), measured in sorted(by_step.items()):
        if name in measured and baseline in measured:
            out[set_index].append(math.log(measured[name] / measured[baseline]))
    return dict(out)


def compare_sets(log_ratios_by_set: Sequence[Sequence[float]], seed: int = 0) -> SetComparison:
    """The duet comparison from each set's adjacent-window log ratios (candidate over baseline)."""
    sets = [x for x in (_finite(s) for s in log_ratios_by_set) if x.size]
    nan = float("nan")
    steps = sum(int(x.size) for x in sets)
    if not sets:
        return SetComparison(0, 0, nan, nan, nan, nan, 0, (), nan, nan)
    estimates = np.asarray([float(np.median(x)) for x in sets])
    within2 = [_median_se2(x) for x in sets]
    within_sd = math.sqrt(float(np.nanmean(within2))) if not all(math.isnan(w) for w in within2) else nan
    ratios = tuple(float(math.exp(e)) for e in estimates)
    if len(sets) == 1:
        only = sets[0]
        comp = compare_paired([(math.exp(v), 1.0) for v in only], seed=seed)
        return SetComparison(steps, steps, comp.ratio, comp.ratio_ci_low, comp.ratio_ci_high, comp.p_value, 1,
                             ratios, within_sd, nan)
    mean = float(np.mean(estimates))
    sd = float(np.std(estimates, ddof=1))
    se = sd / math.sqrt(len(sets))
    tcrit = float(sps.t.ppf(0.5 + CONFIDENCE / 2, len(sets) - 1))
    p = float(sps.ttest_1samp(estimates, 0.0).pvalue) if se > 0 else 1.0 if mean == 0 else 0.0
    between = max(0.0, sd ** 2 - (within_sd ** 2 if not math.isnan(within_sd) else 0.0))
    return SetComparison(steps, steps, math.exp(mean), math.exp(mean - tcrit * se), math.exp(mean + tcrit * se), p,
                         len(sets), ratios, within_sd, math.sqrt(between))


def verdict(name: str, baseline: str, comp: Comparison, quantity: str = "latency", paired: bool = False,
            useful: float = USEFUL_BOUND, more: str = "the Precision line says how many runs would narrow it") -> str:
    """One sentence a reader can act on, computed from the comparison only. Without a significant change,
    the bound it rules out is stated only up to ±`useful`; a wider CI is called inconclusive (`more`: what
    would narrow it)."""
    test = "Wilcoxon signed-rank" if paired else "Mann–Whitney"
    if isinstance(comp, SetComparison):
        test = f"t over {comp.n_sets} sets" if comp.n_sets > 1 else "Wilcoxon signed-rank, one set"
    if math.isnan(comp.ratio):
        return f"{name}: no successful runs to compare with {baseline}"
    change = (comp.ratio - 1.0) * 100.0
    ci = ("" if math.isnan(comp.ratio_ci_low)
          else f" (95 % CI {(comp.ratio_ci_low - 1) * 100:+.1f} % to {(comp.ratio_ci_high - 1) * 100:+.1f} %)")
    detail = (f"ratio {comp.ratio:.3f}{ci}, {test} p = {comp.p_value:.3g}, "
              + (f"{comp.n_candidate} window pairs" if isinstance(comp, SetComparison)
                 else f"{comp.n_candidate} pairs" if paired else f"n = {comp.n_candidate}/{comp.n_baseline}"))
    if not comp.significant:
        if math.isnan(comp.ratio_ci_low):
            return f"{name} vs {baseline}: no significant difference in {quantity} ({detail})"
        bound = max(abs(comp.ratio_ci_low - 1), abs(comp.ratio_ci_high - 1))
        if bound > useful:
            return (f"{name} vs {baseline}: inconclusive in {quantity} ({detail}): the CI is too wide to bound "
                    f"the change ({more})")
        return (f"{name} vs {baseline}: no significant difference in {quantity} ({detail}); a change beyond "
                f"±{bound * 100:.1f} % is ruled out at 95 %")
    word = "helped" if change < 0 else "hurt"
    return (f"{name} {word} {quantity} by {abs(change):.1f} % vs {baseline} "
            f"(CI {abs((comp.ratio_ci_high if change < 0 else comp.ratio_ci_low) - 1) * 100:.1f}–"
            f"{abs((comp.ratio_ci_low if change < 0 else comp.ratio_ci_high) - 1) * 100:.1f} %; {detail})")
