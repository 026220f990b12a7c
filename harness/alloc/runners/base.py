"""The runner interface: run one probe in a fresh process (local) or a fresh container (docker)."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from harness.errors import RunnerError  # noqa: F401  (the runners raise it; imported from here)
from harness.measure.allocators import Allocator
from harness.probe import protocol

RESULT_MARKER = "HARNESS_PROBE_RESULT "  # kept equal to harness.probe.__main__.RESULT_MARKER
ERROR_MARKER = "HARNESS_PROBE_ERROR "


@dataclass(frozen=True)
class Placement:
    """Where a probe may run on a shared host: the GPU it sees and the CPUs it may use."""

    cuda_visible_devices: str | None = None
    cpus: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"cuda_visible_devices": self.cuda_visible_devices,
                "cpus": list(self.cpus) if self.cpus is not None else None}


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """'2-5,8' → (2, 3, 4, 5, 8): the CPU list syntax of taskset, cpusets and pyperf's --affinity."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"not a CPU list: {text!r} (expected e.g. 2-5 or 2,3,8)")
        first, last = int(low), int(high) if sep else int(low)
        if last < first:
            raise ValueError(f"not a CPU list: {text!r} ({part} runs backwards)")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError(f"not a CPU list: {text!r} (expected e.g. 2-5 or 2,3,8)")
    return tuple(sorted(cpus))


def format_cpu_list(cpus: Any) -> str:
    """(2, 3, 4, 5, 8) → '2-5,8', the inverse of parse_cpu_list."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in ranges)


def describe_cpus(cpus: Any) -> str:
    """'CPUs 12-15', 'CPU 3' or 'all CPUs'."""
    cpus = sorted(cpus or [])
    return f"CPUs {format_cpu_list(cpus)}" if len(cpus) > 1 else f"CPU {cpus[0]}" if cpus else "all CPUs"


def describe_placement(placement: dict[str, Any]) -> str:
    """'GPU 0, CPUs 0-15' from Placement.to_dict() (as saved in config.json)."""
    gpu = placement.get("cuda_visible_devices")
    return (f"GPU {gpu}, " if gpu is not None else "") + describe_cpus(placement.get("cpus"))


@dataclass(frozen=True)
class ProbeRequest:
    """Everything one probe run needs; the same for every runner."""

    allocator: Allocator
    model: str
    device: str
    warm_gens: int
    max_new_tokens: int
    dtype: str = "auto"
    seed: int = 0
    threads: int = 0
    timeout_s: float = 1800.0
    placement: Placement | None = None
    measure_s: float | None = None  # the measured window in seconds of generation (replaces warm_gens)

    def probe_args(self) -> list[str]:
        window = (["--measure-s", str(self.measure_s)] if self.measure_s is not None
                  else ["--warm-gens", str(self.warm_gens)])
        return ["--model", self.model, "--device", self.device, "--dtype", self.dtype, *window,
                "--max-new-tokens", str(self.max_new_tokens), "--seed", str(self.seed), "--threads", str(self.threads)]


@dataclass
class ProbeOutcome:
    """What came back from one run. `probe` is the probe's JSON, None when the process failed."""

    exit_code: int | None
    wall_real_s: float
    probe: dict[str, Any] | None
    error: str | None = None
    log_tail: list[str] = field(default_factory=list)
    parent_maxrss_mb: float | None = None
    container: dict[str, Any] | None = None  # docker runner: id, image, memory peak / working set

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SessionDied(Exception):
    """A persistent probe (process or container) that ended, failed, timed out or broke the protocol: its
    set ends and is recorded, never counted. Not a HarnessError: the experiment goes on with a new set."""


@dataclass
class SessionEnd:
    """How a persistent probe ended: exit code, wall time from spawn to exit, peak RSS as its parent saw it."""

    exit_code: int | None
    wall_real_s: float
    parent_maxrss_mb: float | None = None
    log_tail: list[str] = field(default_factory=list)
    container: dict[str, Any] | None = None


class ProbeSession(Protocol):
    """One persistent probe started by `Runner.start_session`: it loads, says Ready, then measures windows."""

    def ready(self, timeout_s: float) -> protocol.Ready: ...

    def window(self, request: protocol.WindowRequest, timeout_s: float) -> protocol.WindowResult: ...

    def close(self) -> SessionEnd:
        """Asks the probe to stop, waits for it (kills it when it does not end), returns how it ended."""
        ...

    def kill(self) -> None: ...


class MarkedLines:
    """The protocol lines of a probe's output stream, read by a daemon thread so that a wait can time out."""

    def __init__(self, lines: Iterable[str], describe: str) -> None:
        self.describe = describe
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(lines,), daemon=True, name="probe-lines")
        self._thread.start()

    def _pump(self, lines: Iterable[str]) -> None:
        try:
            for line in lines:
                self._queue.put(line.rstrip("\r\n"))
        except (OSError, ValueError):  # the stream was closed under the reader
            pass
        finally:
            self._queue.put(None)

    def next(self, timeout_s: float) -> tuple[str, Any]:
        """The next marked message; SessionDied on end of stream, an error line, a malformed line or a timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(0.0, left))
            except queue.Empty:
                raise SessionDied(f"{self.describe}: no answer within {timeout_s:.0f} s") from None
            if line is None:
                raise SessionDied(f"{self.describe}: the probe ended its output (it exited or was killed)")
            try:
                message = protocol.parse_marked(line)
            except protocol.ProtocolError as exc:
                raise SessionDied(f"{self.describe}: malformed protocol line ({exc})") from None
            if message is None:
                continue
            if message[0] == "error":
                raise SessionDied(f"{self.describe}: {message[1]}")
            return message

    def expect_ready(self, timeout_s: float) -> protocol.Ready:
        kind, message = self.next(timeout_s)
        if kind != "ready":
            raise SessionDied(f"{self.describe}: expected its ready line, got a {kind} line")
        return message

    def expect_window(self, window: int, timeout_s: float) -> protocol.WindowResult:
        kind, message = self.next(timeout_s)
        if kind != "window" or message.window != window:
            raise SessionDied(f"{self.describe}: expected window {window}, got a {kind} line")
        return message


class Runner(Protocol):
    name: str

    def describe(self) -> dict[str, Any]:
        """Runner facts for environment.json (images, engine version, ...)."""
        ...

    def resolve_allocators(self, names: list[str], libs: dict[str, str],
                           envs: dict[str, dict[str, str]]) -> list[Allocator]:
        """Allocator plans whose library paths are valid where this runner's probes run."""
        ...

    def run_probe(self, request: ProbeRequest) -> ProbeOutcome: ...

    def start_session(self, request: ProbeRequest) -> ProbeSession:
        """A persistent probe for the duet design (`python -m harness.probe --session`), started now."""
        ...

    def abort(self) -> None:
        """Kills every probe this runner has running (another thread may be waiting on it)."""
        ...

    def close(self) -> None: ...


def parse_probe_output(lines: list[str]) -> tuple[dict[str, Any] | None, str | None]:
    """Find the probe's result (or error) line in its stdout."""
    for line in reversed(lines):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):]), None
        if line.startswith(ERROR_MARKER):
            return None, json.loads(line[len(ERROR_MARKER):]).get("error", "probe error")
    return None, None
