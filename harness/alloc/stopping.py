"""The stopping rule (harness.measure.stopping) on `harness alloc`'s runs: its CIs are the summary's ratio CIs."""

from __future__ import annotations

from harness.alloc import report
from harness.alloc.run import METRICS
from harness.measure.records import AllocRun
from harness.measure.stopping import Stopper


def half_widths(records: list[AllocRun], order: list[str], metric: str, paired: bool) -> dict[str, float]:
    """Each allocator's ratio-CI half-width against the baseline on `metric` (the summary's own CIs)."""
    comps = report.comparisons(records, order, METRICS[metric], paired)
    return {name: comp.half_width for name, comp in comps.items()}


class AllocStopper(Stopper):
    stop_file = report.STOP_FILE

    def widths(self, records: list[AllocRun]) -> dict[str, float]:
        return half_widths(records, self.order, self.rule.metric, self.paired)
