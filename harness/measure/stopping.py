"""When an open-ended allocator experiment stops: on the precision reached (`--target-ci`), on the time the
user has (`--max-time`) or on a cap of rounds (`--max-rounds`).

The precision rule looks at the width of each ratio CI only, never at where the interval lies or at a
p-value: a fixed-width sequential rule in the spirit of Chow and Robbins (1965). Stopping on width does not
push the ratio towards or away from 1, where stopping on significance would. It is checked at most once a
round, after every allocator of the round has run, and not before `min_rounds` rounds.

Every check and the stop are appended to the experiment's stop file (`alloc/stopping.jsonl`,
`serve/stopping.jsonl`), so its report can say what stopped it and anyone can recompute the CI it reached
from its records. Each experiment subclasses `Stopper` with its own CIs.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from harness.measure.results import ResultsDir

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str) -> float:
    """'90s', '2m', '1h30m', '1.5h' or a plain number of seconds → seconds (ValueError otherwise)."""
    text = text.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        match = _DURATION.fullmatch(text)
        if not text or match is None:
            raise ValueError(f"not a duration: {text!r} (e.g. 90s, 2m, 1h30m)") from None
        h, m, s = (float(g) if g else 0.0 for g in match.groups())
        seconds = 3600 * h + 60 * m + s
    if not 0 < seconds < math.inf:
        raise ValueError(f"not a duration: {text!r} (must be more than 0 s, and finite)")
    return seconds


# Why an experiment stopped (the `reason` of its stop record), in words; an experiment may add its own.
STOP_REASONS = {
    "target": "the precision target was reached",
    "time": "the time was up (--max-time: the next run would likely have ended after it)",
    "max-runs": "--max-rounds rounds were done",
    "failed": "every run of the first round failed",
    "interrupted": "it was interrupted (continue with --resume)",
    "error": "the runner failed (continue with --resume)",
}


def format_duration(seconds: float) -> str:
    """132.4 → '2m12s'; 45 → '45s'."""
    seconds = max(0, round(seconds))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s or not (h or m) else "")


def check_line(check: dict[str, Any], remaining: float | None, unit: str = "round") -> str:
    """One line per precision check: its round (or set), the widest CI against the target, the time used and
    left."""
    widest_ = check["widest"]
    width = "no CI yet" if math.isnan(widest_) else f"widest ratio CI ±{widest_ * 100:.1f} %"
    return (f"{unit} {check['round'] + 1}: {width} on {check['metric']} (target ±{check['target'] * 100:g} %), "
            f"{format_duration(check['elapsed_s'])} elapsed"
            + (f", {format_duration(max(0.0, remaining))} left" if remaining is not None else ""))


def widest(widths: dict[str, float]) -> float:
    """The widest half-width; NaN while any allocator has no CI yet."""
    values = list(widths.values())
    return float("nan") if not values or any(math.isnan(v) for v in values) else max(values)


@dataclass(frozen=True)
class StopRule:
    target: float | None  # the CI half-width to reach, as a fraction (0.03: ±3 %)
    metric: str  # the experiment's name of the figure whose ratio CIs are checked
    max_time_s: float | None = None
    min_rounds: int = 5  # measured rounds before the first check
    max_rounds: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Stopper:
    """Decides whether another run (or server) may start and whether a finished round is the last. Each
    experiment subclasses it with its CIs (`widths`) and the file its checks go to (`stop_file`). The
    records it is given are the experiment's typed records (harness.measure.records): each has a `round`;
    `warmup` and `wall_real_s` are read where the record type has them."""

    stop_file: str

    def __init__(self, rule: StopRule, results: ResultsDir, order: list[str], paired: bool = False,
                 warmup_rounds: int = 1, clock: Callable[[], float] = time.monotonic,
                 on_check: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.rule = rule
        self.results = results
        self.order = order
        self.paired = paired
        self.warmup_rounds = warmup_rounds
        self.clock = clock
        self.on_check = on_check
        self.started = clock()
        self.unit_seconds: list[float] = []
        self.held_back = False  # a run was not started: it would likely have ended after the deadline
        self.outcome: dict[str, Any] | None = None

    # --- time -----------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.clock() - self.started

    def remaining(self) -> float | None:
        return None if self.rule.max_time_s is None else self.rule.max_time_s - self.elapsed()

    def unit_done(self, seconds: float) -> None:
        self.unit_seconds.append(seconds)

    def unit_estimate(self, records: list[Any]) -> float | None:
        """How long a run (or a pair) takes: the median of this invocation's, else of the recorded runs'."""
        if self.unit_seconds:
            return statistics.median(self.unit_seconds)
        walls = [r.wall_real_s for r in records if getattr(r, "wall_real_s", None)]
        return statistics.median(walls) if walls else None

    def may_start(self, units_left_in_round: int, records: list[Any]) -> bool:
        """False when the rest of this round would likely end after the deadline (a run in flight is never
        stopped: only runs not yet started are held back)."""
        left = self.remaining()
        if left is None:
            return True
        estimate = self.unit_estimate(records)
        self.held_back = left <= 0 or (estimate is not None and units_left_in_round * estimate > left)
        return not self.held_back

    def round_of(self, record: Any) -> int:
        """The round a record belongs to (the duet design's records: their set)."""
        return record.round

    def widths(self, records: list[Any]) -> dict[str, float]:
        """Each allocator's ratio-CI half-width against the baseline on the rule's metric, from `records`."""
        raise NotImplementedError

    # --- rounds ---------------------------------------------------------------------------------
    def rounds(self) -> Iterator[int]:
        """Warm-up rounds, then measured rounds until a stop (or --max-rounds)."""
        last = self.rule.max_rounds
        return iter(range(-self.warmup_rounds, last)) if last is not None else itertools.count(-self.warmup_rounds)

    def round_done(self, round_: int, records: list[Any]) -> bool:
        """After measured round `round_`: True (and the stop recorded) when the target is reached. The check
        sees the rounds up to this one only, so it can be recomputed from runs.jsonl."""
        if self.rule.target is None or round_ + 1 < self.rule.min_rounds:
            return False
        upto = [r for r in records if self.round_of(r) <= round_]
        widths = self.widths(upto)
        reached = widest(widths)
        check = {"event": "check", "round": round_, "metric": self.rule.metric, "target": self.rule.target,
                 "half_widths": widths, "widest": reached, "reached": reached <= self.rule.target,
                 "elapsed_s": self.elapsed(), "at": _now()}
        self.results.append(self.stop_file, check)
        if self.on_check:
            self.on_check(check)
        if check["reached"]:
            self.stop("target", records, round_)
            return True
        return False

    def stop(self, reason: str, records: list[Any], round_: int | None = None) -> dict[str, Any]:
        """Records why the experiment stopped and the CIs its runs reached (the summary's CIs)."""
        measured = [r for r in records if not getattr(r, "warmup", False)]
        widths = self.widths(records) if measured else {}
        done = [self.round_of(r) for r in measured]
        self.outcome = {"event": "stop", "reason": reason, "round": round_ if round_ is not None else
                        (max(done) if done else None), "rounds": len(set(done)), "half_widths": widths,
                        "widest": widest(widths) if widths else float("nan"), "rule": self.rule.to_dict(),
                        "elapsed_s": self.elapsed(), "at": _now()}
        self.results.append(self.stop_file, self.outcome)
        return self.outcome


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
