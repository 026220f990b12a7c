"""The duet design of experiment A: persistent probes measured in alternating windows.

A set is one fresh persistent probe per arm (`python -m harness.probe --session`, or a container of its
allocator's image), started together, each verified inside its own process. Once all are ready, the
driver asks them in turn for one measured window each (one process generating at a time): a step. Steps
alternate who goes first (ABBA for two arms, a rotation for more), so each adjacent pair of windows sees
the same host state and the host's slow stretches cancel out of their ratio. A new set of fresh processes
samples what differs between processes; the roles rotate across sets (start order, CPU set, first in a
step), so placement shows up as between-set variance, which the CI over sets includes.

A process that dies, times out or was not verified ends its set: the set is recorded as failed and its
windows are never counted. Every window is appended as soon as it is measured.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness.alloc.run import AllocConfig, Arm, verify
from harness.alloc.runners.base import Placement, ProbeRequest, Runner, SessionDied, SessionEnd
from harness.measure.records import AllocSet, AllocWindow, Environment
from harness.measure.results import ResultsDir
from harness.probe import protocol

SETS_FILE = "alloc/sets.jsonl"
WINDOWS_FILE = "alloc/windows.jsonl"
WARMUP_STEPS = 1  # steps at the start of each set that are measured but not counted
WINDOW_TIMEOUT_FLOOR_S = 60.0


@dataclass
class DuetHooks:
    """What the driver calls as sets start and end and as windows are measured."""

    on_set_start: Callable[[int, list[Arm]], None] | None = None
    on_window: Callable[[AllocWindow], None] | None = None
    on_set: Callable[[AllocSet], None] | None = None
    environment: str | None = None


def rotated(items: list[Any], shift: int) -> list[Any]:
    shift %= len(items)
    return items[shift:] + items[:shift]


def cpu_groups(cpus: tuple[int, ...], parts: int) -> list[tuple[int, ...]] | None:
    """`parts` disjoint CPU sets of equal size from `cpus`, or None when there are fewer CPUs than parts."""
    if len(cpus) < parts:
        return None
    size = len(cpus) // parts
    return [tuple(cpus[i * size:(i + 1) * size]) for i in range(parts)]


def set_placements(config: AllocConfig, set_index: int) -> dict[str, Placement | None]:
    """Each arm's CPUs in set `set_index`. split: disjoint groups, rotated every len(arms) sets (so that start
    order and CPU set are not confounded); shared, or fewer CPUs than arms: every arm on all of them
    (--affinity's, else this process's), so a slow CPU hits whichever arm runs then."""
    arms = config.arms
    cpus = config.affinity or tuple(sorted(os.sched_getaffinity(0)))
    groups = cpu_groups(cpus, len(arms))
    if config.cpu_placement == "shared" or groups is None:  # fewer CPUs than arms: all share them
        return {arm.label: Placement(cpus=cpus) for arm in arms}
    shift = set_index // len(arms)
    return {arm.label: Placement(cpus=groups[(i + shift) % len(arms)]) for i, arm in enumerate(arms)}


def step_order(arms: list[Arm], set_index: int, step: int) -> list[Arm]:
    """Who measures first in a step: alternating every step (ABBA...), the first step's order rotated by set."""
    return rotated(arms, set_index + step)


def window_request(config: AllocConfig, window: int) -> protocol.WindowRequest:
    if config.window_s is not None:
        return protocol.WindowRequest(window=window, seconds=config.window_s)
    return protocol.WindowRequest(window=window, gens=config.window_gens)


def window_timeout(config: AllocConfig) -> float:
    expected = config.window_s if config.window_s is not None else float(config.window_gens or 1)
    return min(config.timeout_s, max(WINDOW_TIMEOUT_FLOOR_S, 30 * expected))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


class DuetSet:
    """One set: start, verify, measure windows step by step, close; `record()` is its AllocSet."""

    def __init__(self, config: AllocConfig, runner: Runner, results: ResultsDir, set_index: int,
                 hooks: DuetHooks, deadline: Callable[[float], bool] | None = None) -> None:
        self.config, self.runner, self.results, self.index, self.hooks = config, runner, results, set_index, hooks
        self.deadline = deadline  # deadline(seconds a step takes): True when the next step would end too late
        self.placements = set_placements(config, set_index)
        self.start_order = rotated(config.arms, set_index)
        self.sessions: dict[str, Any] = {}
        self.ready: dict[str, protocol.Ready] = {}
        self.verification: dict[str, str | None] = {}
        self.ends: dict[str, SessionEnd] = {}
        self.started_at = _now()
        self.t0 = time.monotonic()
        self.steps = 0
        self.windows = 0
        self.status, self.ended_by, self.failure = "ok", "windows", None

    def run(self) -> AllocSet:
        """Runs the set to its end; a Ctrl-C records it as interrupted and goes on up."""
        try:
            try:
                self._start()
            except SessionDied as exc:
                self.status, self.ended_by, self.failure = "failed", "start", str(exc)
                raise
            self._verify()
            if self.status == "ok":
                self._measure()
        except SessionDied as exc:
            if self.ended_by != "start":
                self.status, self.ended_by, self.failure = "failed", "died", str(exc)
        except BaseException as exc:  # Ctrl-C, SIGTERM, or the runner itself failed (a Docker daemon gone)
            self.status = "interrupted"
            self.ended_by = "interrupted" if isinstance(exc, KeyboardInterrupt) else "error"
            self.failure = None if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
            self._close(kill=True)
            self._write()
            raise
        self._close(kill=self.status == "failed")
        return self._write()

    def _request(self, arm: Arm) -> ProbeRequest:
        c = self.config
        return ProbeRequest(allocator=arm.allocator, model=c.model, device=c.device, warm_gens=c.window_gens or 1,
                            max_new_tokens=c.max_new_tokens, dtype=c.dtype, seed=c.seed, threads=c.threads,
                            timeout_s=c.timeout_s, placement=self.placements[arm.label])

    def _start(self) -> None:
        for arm in self.start_order:  # started together: each loads while the next is spawned
            self.sessions[arm.label] = self.runner.start_session(self._request(arm))
        for arm in self.start_order:
            self.ready[arm.label] = self.sessions[arm.label].ready(self.config.timeout_s)

    def _verify(self) -> None:
        for arm in self.config.arms:
            ready = self.ready[arm.label]
            why = verify(arm.allocator, {"allocator": ready.allocator, "cpu_affinity": ready.cpu_affinity},
                         self.placements[arm.label])
            self.verification[arm.label] = why
            if why and self.status == "ok":
                self.status, self.ended_by, self.failure = "failed", "verification", f"{arm.label}: {why}"

    def _measure(self) -> None:
        t_ready = time.monotonic()
        step_seconds: list[float] = []
        timeout = window_timeout(self.config)
        for step in range(-WARMUP_STEPS, self.config.windows_per_set):
            if step >= 0 and self.deadline and step_seconds and self.deadline(max(step_seconds)):
                self.ended_by = "time"
                return
            t_step = time.monotonic()
            for position, arm in enumerate(step_order(self.config.arms, self.index, step)):
                t_s = time.monotonic() - t_ready
                result = self.sessions[arm.label].window(window_request(self.config, self.windows), timeout)
                self.windows += 1
                self._append(step, position, arm, t_s, result)
            step_seconds.append(time.monotonic() - t_step)
            if step >= 0:
                self.steps += 1

    def _append(self, step: int, position: int, arm: Arm, t_s: float, result: protocol.WindowResult) -> None:
        noise = result.extra.get("noise") if isinstance(result.extra, dict) else None
        record = AllocWindow(
            set_index=self.index, step=step, position=position, arm=arm.label, allocator=arm.allocator.name,
            warmup=step < 0, t_s=t_s, gens=result.gens, latencies_s=result.latencies_s,
            gen_latency_s=result.gen_latency_s, measured_s=result.measured_s, window_s=result.window_s,
            ttft_s=result.ttft_s, tpot_s=result.tpot_s, itl_p25_s=result.itl_p25_s, itl_p50_s=result.itl_p50_s,
            itl_p90_s=result.itl_p90_s, rss_mb=result.rss_mb, peak_rss_mb=result.peak_rss_mb,
            steal_pct=result.steal_pct, involuntary_switches=result.involuntary_switches,
            minor_faults=result.minor_faults, major_faults=result.major_faults,
            gpu_peak_allocated_mb=result.gpu_peak_allocated_mb, noise=noise)
        self.results.append_record(WINDOWS_FILE, record)
        if self.hooks.on_window:
            self.hooks.on_window(record)

    def _close(self, kill: bool) -> None:
        """Ends every probe of the set; one that cannot be ended cleanly is recorded so, not raised over the
        error that ended the set."""
        for label, session in self.sessions.items():
            if label in self.ends:
                continue
            try:
                if kill:
                    session.kill()
                self.ends[label] = session.close()
            except Exception as exc:
                self.ends[label] = SessionEnd(exit_code=None, wall_real_s=time.monotonic() - self.t0,
                                              log_tail=[f"could not end the probe: {type(exc).__name__}: {exc}"])

    def _arm_record(self, arm: Arm, position: int) -> dict[str, Any]:
        ready = self.ready.get(arm.label)
        end = self.ends.get(arm.label)
        placement = self.placements[arm.label]
        return {
            "label": arm.label, "allocator": arm.allocator.name, "requested_library": arm.allocator.library,
            "allocator_env": arm.allocator.env, "start_position": position,
            "placement": placement.to_dict() if placement else None,
            "pid": ready.pid if ready else None, "verified": ready is not None and not self.verification.get(arm.label)
            and arm.label in self.verification, "failure": self.verification.get(arm.label),
            "loaded_allocator": ready.allocator if ready else None,
            "cpu_affinity": ready.cpu_affinity if ready else None,
            "import_s": ready.import_s if ready else None, "load_s": ready.load_s if ready else None,
            "ready_s": ready.ready_s if ready else None,
            "cold_latency_s": (ready.cold or {}).get("latency_s") if ready else None,
            "torch_threads": ready.torch_threads if ready else None, "versions": ready.versions if ready else None,
            "exit_code": end.exit_code if end else None, "wall_real_s": end.wall_real_s if end else None,
            "parent_maxrss_mb": end.parent_maxrss_mb if end else None,
            "log_tail": end.log_tail if end else None, "container": end.container if end else None,
        }

    def _write(self) -> AllocSet:
        record = AllocSet(
            set_index=self.index, status=self.status, ended_by=self.ended_by, failure=self.failure, steps=self.steps,
            started_at=self.started_at, wall_s=time.monotonic() - self.t0, runner=self.runner.name,
            environment=self.hooks.environment, model=self.config.model, device=self.config.device,
            arms=[self._arm_record(arm, self.start_order.index(arm)) for arm in self.config.arms])
        self.results.append_record(SETS_FILE, record)
        if self.hooks.on_set:
            self.hooks.on_set(record)
        return record


def counted_windows(sets: list[AllocSet], windows: list[AllocWindow]) -> list[AllocWindow]:
    """The measured windows of the sets that count (never a warm-up step, a failed set or an unfinished one)."""
    counted = {s.set_index for s in sets if s.counted}
    return [w for w in windows if w.set_index in counted and not w.warmup]


def execute(config: AllocConfig, runner: Runner, results: ResultsDir, existing_sets: list[AllocSet],
            environment: Environment | None, hooks: DuetHooks, stopper: Any = None) -> list[AllocSet]:
    """Runs sets after those already recorded: `config.sets` of them, or until `stopper` stops them (checked
    once a set, on the counted windows). Returns every set record."""
    sets = list(existing_sets)
    if environment is not None and hooks.environment:
        results.write_record(hooks.environment, environment)
    seen = [s.set_index for s in sets] + [w.set_index for w in results.read_records(WINDOWS_FILE, AllocWindow)]
    first = max(seen, default=-1) + 1  # after any set an earlier invocation began, recorded or not
    indices = (s for s in stopper.rounds() if s >= first) if stopper is not None else iter(
        range(first, config.sets))
    reason = "sets"
    try:
        for index in indices:
            if stopper is not None and not stopper.may_start(1, sets):
                reason = "time"
                break
            if hooks.on_set_start:
                hooks.on_set_start(index, config.arms)
            record = DuetSet(config, runner, results, index, hooks, _step_deadline(stopper)).run()
            sets.append(record)
            if stopper is not None:
                stopper.unit_done(record.wall_s or 0.0)
            if _first_set_failed(sets):
                reason = "failed"
                break
            if stopper is not None and record.counted and stopper.round_done(index, _windows_for(results, sets)):
                return sets
            if record.ended_by == "time":
                reason = "time"
                break
        else:
            reason = "max-runs" if stopper is not None else "sets"
    except BaseException as exc:
        if stopper is not None:
            stopper.stop("interrupted" if isinstance(exc, KeyboardInterrupt) else "error", _windows_for(results, sets))
        raise
    if stopper is not None:
        stopper.stop(reason, _windows_for(results, sets))
    return sets


def _windows_for(results: ResultsDir, sets: list[AllocSet]) -> list[AllocWindow]:
    return counted_windows(sets, results.read_records(WINDOWS_FILE, AllocWindow))


def _step_deadline(stopper: Any) -> Callable[[float], bool] | None:
    if stopper is None or stopper.remaining() is None:
        return None
    return lambda step_s: stopper.remaining() < step_s


def _first_set_failed(sets: list[AllocSet]) -> bool:
    """The first set could not start or was not verified: the next would fail alike, so none is started."""
    return len(sets) == 1 and sets[0].status == "failed" and sets[0].ended_by in ("start", "verification")
