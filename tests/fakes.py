"""Stand-ins for the fast tier (`pytest -m fast`, `make test-fast`): they replay what real runs recorded, so
the orchestration and the reports around them run for real, on real numbers, in milliseconds.

They never replace a real test: the real tier (`make test`) drives the same code with real probe processes,
containers and servers. The fake streaming server is tests/fake_openai_server.py.
"""

from __future__ import annotations

import copy
import json
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

from harness.alloc.runners.base import ProbeOutcome, ProbeRequest, RunnerError
from harness.measure.allocators import Allocator, AllocatorError

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference"

# What a fault does to one request (ReplayRunner's `faults`).
FAIL = "fail"  # the probe process exits 1 with a traceback: no probe output
WRONG_LIBRARY = "wrong-library"  # the probe ran under glibc, whatever was asked: verification fails
INTERRUPT = "interrupt"  # Ctrl-C while this probe runs
RUNNER_ERROR = "runner-error"  # the runner itself fails (a Docker daemon gone)
BLOCK = "block"  # the probe runs until the runner is aborted (a sibling probe's failure), then is killed
TIMING_KEYS = ("gen_latency_s", "itl_p25_s", "itl_p50_s", "itl_p90_s", "tpot_s", "ttft_s")


def recorded_runs(reference: str) -> list[dict[str, Any]]:
    """The runs a committed reference directory recorded (results/reference/NAME/alloc/runs.jsonl)."""
    path = REFERENCE / reference / "alloc" / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class FakeClock:
    """A monotonic clock that moves only when told: by the wall time of each replayed run."""

    def __init__(self) -> None:
        self.now = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class ReplayRunner:
    """alloc's Runner protocol (harness/alloc/runners/base.py) without a process: the n-th request for an
    allocator gets the probe output, wall time and peak RSS of that allocator's n-th run in a committed
    reference directory (in the order they ran, warm-up first; from the first again when they run out).

    `faults`: {(allocator, n): FAIL | WRONG_LIBRARY | INTERRUPT | RUNNER_ERROR | BLOCK} for its n-th request
    (0-based). `slower`: {allocator: factor} multiplies that allocator's replayed latencies (a known effect on
    real run-to-run noise). `clock`: advanced by each replayed run's wall time, as if it had run."""

    name = "replay"

    def __init__(self, reference: str, faults: dict[tuple[str, int], str] | None = None,
                 slower: dict[str, float] | None = None, clock: FakeClock | None = None) -> None:
        self.reference = reference
        self.runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record in sorted(recorded_runs(reference), key=lambda r: r["run_index"]):
            if record["status"] == "ok":
                self.runs[record["allocator"]].append(record)
        self.faults = dict(faults or {})
        self.slower = dict(slower or {})
        self.clock = clock
        self.requests: list[ProbeRequest] = []  # every request, in the order the harness made them
        self.started: list[float] = []  # the clock's time as each request came (with a clock)
        self.served: dict[str, int] = defaultdict(int)
        self.aborted = threading.Event()
        self.released: list[bool] = []  # each BLOCK request: True when abort() ended it
        self.closed = False
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"runner": self.name, "reference": self.reference}

    def resolve_allocators(self, names: list[str], libs: dict[str, str],
                           envs: dict[str, dict[str, str]]) -> list[Allocator]:
        """Each allocator with the library its recorded runs asked for, so that their maps verify."""
        missing = [n for n in names if n not in self.runs]
        if missing:
            raise AllocatorError(f"{self.reference} recorded no run of {', '.join(missing)}")
        return [Allocator(n, libs.get(n) or self.runs[n][0]["requested_library"], envs.get(n, {})) for n in names]

    def run_probe(self, request: ProbeRequest) -> ProbeOutcome:
        name = request.allocator.name
        with self._lock:
            n = self.served[name]
            self.served[name] += 1
            self.requests.append(request)
            if self.clock is not None:
                self.started.append(self.clock())
        fault = self.faults.get((name, n))
        recorded = self.runs[name][n % len(self.runs[name])]
        if fault == INTERRUPT:
            raise KeyboardInterrupt
        if fault == RUNNER_ERROR:
            raise RunnerError(f"replay: the runner failed during {name} run {n}")
        if fault == BLOCK:
            released = self.aborted.wait(timeout=30)
            with self._lock:
                self.released.append(released)
            return ProbeOutcome(exit_code=-9, wall_real_s=1.0, probe=None,
                                error="probe killed by signal 9" if released else "never aborted")
        if self.clock is not None:
            self.clock.advance(recorded["wall_real_s"])
        if fault == FAIL:
            return ProbeOutcome(exit_code=1, wall_real_s=recorded["wall_real_s"], probe=None,
                                error="probe exited with code 1",
                                log_tail=["Traceback (most recent call last):",
                                          "torch.OutOfMemoryError: CUDA out of memory (replayed fault)"],
                                parent_maxrss_mb=recorded.get("parent_maxrss_mb"))
        probe = self._probe(recorded, request, fault)
        return ProbeOutcome(exit_code=0, wall_real_s=recorded["wall_real_s"], probe=probe,
                            parent_maxrss_mb=recorded.get("parent_maxrss_mb"), container=recorded.get("container"))

    def _probe(self, recorded: dict[str, Any], request: ProbeRequest, fault: str | None) -> dict[str, Any]:
        probe = copy.deepcopy(recorded["probe"])
        if fault == WRONG_LIBRARY:
            probe["allocator"] = copy.deepcopy(self.runs["glibc"][0]["probe"]["allocator"])
        if request.placement is not None and request.placement.cpus:  # it ran where it was placed
            probe["cpu_affinity"] = sorted(request.placement.cpus)
        factor = self.slower.get(request.allocator.name)
        if factor:
            for key in TIMING_KEYS:
                if probe.get(key) is not None:
                    probe[key] *= factor
            for gen in probe.get("warm") or []:
                gen["latency_s"] *= factor
                gen["itl_s"] = [g * factor for g in gen.get("itl_s") or []]
        return probe

    def abort(self) -> None:
        self.aborted.set()

    def close(self) -> None:
        self.closed = True


# --- the duet design: persistent probes ------------------------------------------------------------------
DIE = "die"  # the probe process dies before answering this window
HANG = "hang"  # the probe never answers this window (until killed)


class DriftingHost:
    """A shared host whose speed drifts in time, as this project's hosts do: slow stretches of `slow` times
    the steady step, seconds long, that come and go whatever process runs (seeded, so a test is exact)."""

    def __init__(self, seed: int = 0, slow: float = 1.3, stretch_s: float = 4.0) -> None:
        import random

        self.rng = random.Random(seed)
        self.slow, self.stretch_s = slow, stretch_s
        self.t = 0.0
        self._until, self._factor = 0.0, 1.0

    def factor(self) -> float:
        if self.t >= self._until:
            self._until = self.t + self.rng.expovariate(1.0 / self.stretch_s)
            self._factor = self.slow if self.rng.random() < 0.4 else 1.0
        return self._factor * (1.0 + self.rng.gauss(0.0, 0.01))


class FakeSession:
    """One persistent probe of SessionRunner: its Ready is a recorded probe's, its windows come from the host."""

    def __init__(self, runner: SessionRunner, request: ProbeRequest, index: int) -> None:
        self.runner, self.request, self.index = runner, request, index
        self.killed = threading.Event()
        self.closed = False
        self.windows = 0

    def ready(self, timeout_s: float):
        from harness.probe import protocol

        name = self.request.allocator.name
        probe = copy.deepcopy(self.runner.recorded[name]["probe"])
        if self.runner.faults.get((self.index, "ready")) == WRONG_LIBRARY:
            probe["allocator"] = copy.deepcopy(self.runner.recorded["glibc"]["probe"]["allocator"])
        cpus = sorted(self.request.placement.cpus) if self.request.placement and self.request.placement.cpus else [0]
        return protocol.Ready(schema=protocol.SCHEMA, pid=10_000 + self.index, allocator=probe["allocator"],
                              cpu_affinity=cpus, device="cuda", dtype="bfloat16", model=probe.get("model") or {},
                              prompt_tokens=12, max_new_tokens=32, import_s=3.0, device_init_s=0.5, load_s=5.0,
                              cold=probe.get("cold") or {"latency_s": 1.0}, torch_threads=4, versions={}, ready_s=9.0)

    def window(self, request, timeout_s: float):
        from harness.alloc.runners.base import SessionDied
        from harness.probe import protocol

        fault = self.runner.faults.get((self.index, self.windows))
        self.windows += 1
        if fault == INTERRUPT:
            raise KeyboardInterrupt
        if fault == DIE:
            raise SessionDied(f"{self.request.allocator.name} probe (PID {10_000 + self.index}): the probe ended "
                              "its output (it exited or was killed)")
        if fault == HANG:
            raise SessionDied(f"{self.request.allocator.name} probe: no answer within {timeout_s:.0f} s")
        host = self.runner.host
        step = self.runner.step_s * self.runner.effects.get(self.request.allocator.name, 1.0) * host.factor()
        gen = 32 * step
        host.t += gen
        if self.runner.clock is not None:
            self.runner.clock.advance(gen)
        return protocol.WindowResult(window=request.window, gens=1, latencies_s=[gen], gen_latency_s=gen,
                                     measured_s=gen, window_s=gen, ttft_s=step, tpot_s=step, itl_p25_s=step,
                                     itl_p50_s=step, itl_p90_s=step * 1.1, rss_mb=1500.0, peak_rss_mb=1550.0,
                                     steal_pct=0.0, involuntary_switches=3, minor_faults=10, major_faults=0)

    def kill(self) -> None:
        self.killed.set()

    def close(self):
        from harness.alloc.runners.base import SessionEnd

        self.closed = True
        return SessionEnd(exit_code=-9 if self.killed.is_set() else 0, wall_real_s=30.0, parent_maxrss_mb=1600.0)


class SessionRunner:
    """alloc's Runner protocol for the duet design without a process: each session answers windows whose decode
    step is `step_s` times the allocator's `effects` factor times the drifting host's factor at that moment.

    `faults`: {(session number, window number): DIE | HANG | INTERRUPT} and {(session number, "ready"):
    WRONG_LIBRARY}, sessions numbered in the order they were started. Ready lines carry the allocator maps a
    real probe recorded in `reference`, so the real verification runs on them."""

    name = "replay"

    def __init__(self, reference: str = "h100-phi3-mini", effects: dict[str, float] | None = None,
                 faults: dict[tuple[int, Any], str] | None = None, seed: int = 0, step_s: float = 0.02,
                 clock: FakeClock | None = None, slow: float = 1.3) -> None:
        self.recorded = {}
        for record in recorded_runs(reference):
            if record["status"] == "ok":
                self.recorded.setdefault(record["allocator"], record)
        self.effects = dict(effects or {})
        self.faults = dict(faults or {})
        self.host = DriftingHost(seed, slow=slow)
        self.step_s = step_s
        self.clock = clock
        self.sessions: list[FakeSession] = []
        self.requests: list[ProbeRequest] = []

    def describe(self) -> dict[str, Any]:
        return {"runner": self.name}

    def resolve_allocators(self, names: list[str], libs: dict[str, str],
                           envs: dict[str, dict[str, str]]) -> list[Allocator]:
        return [Allocator(n, libs.get(n) or self.recorded[n]["requested_library"], envs.get(n, {})) for n in names]

    def start_session(self, request: ProbeRequest) -> FakeSession:
        session = FakeSession(self, request, len(self.sessions))
        self.sessions.append(session)
        self.requests.append(request)
        return session

    def abort(self) -> None:
        for session in self.sessions:
            session.kill()

    def close(self) -> None:
        pass
