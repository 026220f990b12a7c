"""The statistics of `harness serve --design duet`: warm TTFT, TPOT and E2E from alternating requests.

Per set, each step's log ratio candidate/baseline of two adjacent warm requests (one per server, the same
host state); the set's estimate is their median; the CI is a t interval over the sets
(`harness.measure.stats.compare_sets`, the same as `harness alloc --design duet`), so what differs between
fresh servers (placement, start order) is inside it. Start-up, the cold request and memory stay the
per-server comparison of harness.serve.comparison (each set's servers started at once, so their
start-ups overlapped).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from harness.measure import stats
from harness.measure.records import ServeRequest, ServeSet, StartupRecord
from harness.measure.results import ResultsDir
from harness.serve import comparison
from harness.serve.comparison import Row
from harness.serve.config import STOP_METRICS
from harness.serve.duet import SETS_FILE, counted_requests

WARM_FIELDS = {"warm_ttft_s": "ttft_s", "warm_tpot_s": "tpot_s", "warm_e2e_s": "e2e_s"}
SETS_NARROW = "more sets would narrow it: --cold-starts, --target-ci"


def step_log_ratios(requests: list[ServeRequest], name: str, baseline: str, key: str) -> dict[int, list[float]]:
    """Per set, the log ratio name/baseline of `key` (a ServeRequest field) in each step where both were measured."""
    return stats.step_log_ratios(((r.set_index, r.step, r.allocator, getattr(r, key)) for r in requests
                                  if r.set_index is not None and r.step is not None and r.allocator), name, baseline)


def compare(requests: list[ServeRequest], name: str, baseline: str, key: str) -> stats.SetComparison:
    """`name` against the baseline on one warm figure (`key`: a ServeRequest field), over the sets."""
    return stats.compare_sets(list(step_log_ratios(requests, name, baseline, key).values()))


def rows(sets: list[ServeSet], startups: list[StartupRecord], requests: list[ServeRequest], order: list[str],
         baseline: str) -> list[Row]:
    """The per-server rows (start-up, cold, memory), the warm figures' rows replaced by the duet's: per
    allocator the median of its counted warm requests, against the baseline the ratio over sets."""
    counted = counted_requests(sets, requests)
    out = []
    for row in comparison.rows(startups, requests, order, baseline):
        key = WARM_FIELDS.get(row.metric.key)
        if key is None:
            out.append(row)
            continue
        mine = [getattr(r, key) for r in counted if r.allocator == row.allocator]
        comp = None if row.allocator == baseline else compare(counted, row.allocator, baseline, key)
        out.append(Row(row.metric, row.allocator, baseline, stats.summarize(mine), comp, row.failed_servers))
    return out


def intro(sets: list[ServeSet], order: list[str], baseline: str, steps: int) -> list[str]:
    """How the duet comparison was made, and what of it does not count."""
    counted = [s for s in sets if s.counted]
    out = [f"{', '.join(order)}, the duet design: {len(sets)} set(s) ({len(counted)} counted), each one fresh server "
           f"per allocator, all up at once (each on its own CPUs and free port, the memory setting halved), "
           f"then {steps} step(s) of one warm request per server, one request at a time, who goes first "
           "alternating every step (one warm-up step not counted). Warm TTFT, TPOT and E2E: per set the median "
           "of the adjacent requests' log ratios; against "
           f"{baseline} the ratio with a 95 % t CI over the sets (`harness alloc --design duet`'s statistics), "
           "n = the counted requests. Start-up, the cold request and memory: per server, as in the sequential "
           "design; each set's servers started at once, so their start-ups overlapped (they competed for the "
           "host), and the memory peaks are of the whole host's timeline, not one server's.", ""]
    failed = [f"- set {s.set_index + 1}: {s.status}, ended by {s.ended_by}: {s.failure}" for s in sets
              if not s.counted]
    if failed:
        out += ["Sets not counted:", "", *failed, ""]
    return out


def variance_line(rs: list[Row]) -> str | None:
    """Which variance component limits the warm TTFT CIs."""
    parts = []
    for r in rs:
        c = r.comparison
        if isinstance(c, stats.SetComparison) and c.limiting and r.metric.key == "warm_ttft_s":
            parts.append(f"{r.allocator}: within a set ±{c.within_sd * 100:.1f} %, between sets "
                         f"±{c.between_sd * 100:.1f} % (log sd), limited by {c.limiting}")
    return ("Variance of warm TTFT — " + "; ".join(parts) + ".") if parts else None


def load_sets(results: ResultsDir) -> list[ServeSet]:
    return results.read_records(SETS_FILE, ServeSet)


def section(results: ResultsDir, startups: list[StartupRecord], requests: list[ServeRequest], order: list[str],
            baseline: str, steps: int, stop: dict[str, Any] | None) -> list[str]:
    """The report's Allocators section and serve/allocator_comparison.csv for a duet run."""
    sets = load_sets(results)
    rs = rows(sets, startups, requests, order, baseline)
    comparison.write(results, startups, requests, order, baseline, rs)
    text = intro(sets, order, baseline, steps)
    line = variance_line(rs)
    return comparison.section(startups, requests, order, baseline, stop, rs, text + ([line, ""] if line else []),
                              more=SETS_NARROW)


class DuetServeStopper(comparison.ServeStopper):
    """The stopping rule on the duet design: a round is a set; the CIs are those over sets, on the counted
    warm requests it is given (NaN while there are fewer than two sets)."""

    def round_of(self, record: ServeRequest) -> int:
        assert record.set_index is not None
        return record.set_index

    def widths(self, records: list[ServeRequest]) -> dict[str, float]:
        key = WARM_FIELDS.get(STOP_METRICS[self.rule.metric])
        out = {}
        for name in self.order:
            if name != self.baseline:
                comp = compare(records, name, self.baseline, key) if key else None
                out[name] = comp.half_width if comp is not None and comp.n_sets >= 2 else float("nan")
        return out


def on_check_line(log: Callable[[str], None]) -> Callable[[dict[str, Any]], None]:
    def say(check: dict[str, Any]) -> None:
        widest = check["widest"]
        width = "no CI over sets yet" if math.isnan(widest) else f"widest ratio CI ±{widest * 100:.1f} %"
        log(f"set {check['round'] + 1}: {width} on {check['metric']} (target ±{check['target'] * 100:g} %)")
    return say
