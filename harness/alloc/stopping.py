"""The stopping rule (harness.measure.stopping) on `harness alloc`'s runs: its CIs are the summary's ratio CIs."""

from __future__ import annotations

from harness.alloc import report
from harness.alloc.duet_report import step_log_ratios
from harness.alloc.run import METRICS
from harness.measure.records import AllocRun, AllocWindow
from harness.measure.stats import compare_sets
from harness.measure.stopping import Stopper


def half_widths(records: list[AllocRun], order: list[str], metric: str, paired: bool) -> dict[str, float]:
    """Each allocator's ratio-CI half-width against the baseline on `metric` (the summary's own CIs)."""
    comps = report.comparisons(records, order, METRICS[metric], paired)
    return {name: comp.half_width for name, comp in comps.items()}


class AllocStopper(Stopper):
    stop_file = report.STOP_FILE

    def widths(self, records: list[AllocRun]) -> dict[str, float]:
        return half_widths(records, self.order, self.rule.metric, self.paired)


class DuetStopper(Stopper):
    """The same rule on the duet design: a round is a set, and its CIs are the CIs over sets."""

    stop_file = report.STOP_FILE

    def __init__(self, *args, arms: list[str], baseline: str, **kw) -> None:
        super().__init__(*args, **kw)
        self.arms, self.baseline = arms, baseline

    def round_of(self, record: AllocWindow) -> int:
        return record.set_index

    def widths(self, records: list[AllocWindow]) -> dict[str, float]:
        key = METRICS[self.rule.metric]
        widths = {}
        for label in self.arms:
            if label != self.baseline:
                comp = compare_sets(list(step_log_ratios(records, label, self.baseline, key).values()))
                widths[label] = comp.half_width if comp.n_sets >= 2 else float("nan")  # one set: no CI over sets
        return widths
