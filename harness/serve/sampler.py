"""Memory timeline: GPU memory per device (NVML) and the server's host memory, with event markers.

Host memory: the RSS of the server's process tree (local runner), or the container's memory usage
and working set from the engine's stats stream (docker runner; about one new value a second).

One sampler thread runs from before the first server starts until after the last request. Times
are seconds since the sampler started (`time.perf_counter()`, the same clock as the client).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from harness.containers.stats import MB, StatsMonitor

CHILD_REFRESH_S = 1.0  # re-list the server's children at most this often (cheap on 2 cores)


@dataclass
class Marker:
    t_s: float
    label: str
    kind: str  # "spawn" | "ready" | "request_start" | "request_end" | "stop" | "event"


class _Gpus:
    """NVML handles, or a reason why there are none."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.reason: str | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            if not self.handles:
                self.reason = "NVML reports no GPU"
        except Exception as exc:  # ImportError or NVMLError: no GPU series, said in the report
            self.reason = f"no GPU series: NVML unavailable ({exc})"

    def used_mb(self) -> list[float]:
        return [self._nvml.nvmlDeviceGetMemoryInfo(h).used / 2**20 for h in self.handles]

    def close(self) -> None:
        if self.handles:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()


@dataclass
class MemorySampler:
    """`with MemorySampler(hz) as s: s.set_root(pid); s.mark('ready', 'ready')` ."""

    hz: float = 20.0
    enabled: bool = True
    rows: list[dict[str, Any]] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    gpu_reason: str | None = None
    n_gpus: int = 0
    has_container: bool = False  # a docker-run server was sampled: container columns in the CSV
    _root: int | None = None
    _monitor: StatsMonitor | None = None
    _procs: list[psutil.Process] = field(default_factory=list)
    _procs_at: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _active: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def start(self) -> MemorySampler:
        if not self.enabled:
            return self
        self._active.set()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def set_root(self, pid: int | None) -> None:
        """The server process whose tree is measured (None: between servers / attached)."""
        with self._lock:
            self._root = pid
            self._procs = []
            self._procs_at = 0.0

    def set_container(self, monitor: StatsMonitor | None) -> None:
        """The stats stream of the server's container (None: between servers)."""
        with self._lock:
            self._monitor = monitor
            if monitor is not None:
                self.has_container = True

    def _container_mb(self) -> tuple[float | None, float | None]:
        monitor = self._monitor
        latest = monitor.latest if monitor is not None else None
        return (None, None) if latest is None else (latest[0] / MB, latest[1] / MB)

    def pause(self) -> None:
        """Stop sampling until resume() (the thread blocks; used to measure the sampler's own cost)."""
        self._active.clear()

    def resume(self) -> None:
        self._active.set()

    def mark(self, label: str, kind: str = "event") -> float:
        t = self.now()
        self.markers.append(Marker(t, label, kind))
        return t

    def _tree(self) -> list[psutil.Process]:
        now = time.perf_counter()
        with self._lock:
            if self._root is not None and (not self._procs or now - self._procs_at > CHILD_REFRESH_S):
                try:
                    root = psutil.Process(self._root)
                    self._procs = [root, *root.children(recursive=True)]
                except psutil.Error:
                    self._procs = []
                self._procs_at = now
            return list(self._procs)

    def _rss_mb(self) -> float | None:
        procs = self._tree()
        if not procs:
            return None
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        return total / 2**20

    def _run(self) -> None:
        gpus = _Gpus()
        self.gpu_reason, self.n_gpus = gpus.reason, len(gpus.handles)
        period = 1.0 / self.hz
        next_t = time.perf_counter()
        try:
            while not self._stop.is_set():
                if not self._active.is_set():
                    self._active.wait()
                    next_t = time.perf_counter()
                    continue
                row: dict[str, Any] = {"t_s": self.now()}
                rss = self._rss_mb()
                if rss is not None or not self.has_container:  # docker runs: container columns instead
                    row["server_rss_mb"] = rss
                if self.has_container:
                    row["container_usage_mb"], row["container_working_set_mb"] = self._container_mb()
                if gpus.handles:
                    for i, used in enumerate(gpus.used_mb()):
                        row[f"gpu{i}_used_mb"] = used
                self.rows.append(row)
                next_t += period
                self._stop.wait(max(next_t - time.perf_counter(), 0.0))
        finally:
            gpus.close()

    def stop(self) -> None:
        self._stop.set()
        self._active.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> MemorySampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
