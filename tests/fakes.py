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
