"""Per-container memory from the engine's stats stream, computed as `docker stats` does."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

MB = 2**20


def working_set_bytes(memory_stats: dict[str, Any]) -> int | None:
    """Usage minus inactive file cache: `total_inactive_file` on cgroup v1, `inactive_file` on v2
    (docker CLI's calculateMemUsageUnixNoCache)."""
    usage = memory_stats.get("usage")
    if usage is None:
        return None
    stats = memory_stats.get("stats") or {}
    v1 = stats.get("total_inactive_file")
    if v1 is not None and v1 < usage:
        return usage - v1
    v2 = stats.get("inactive_file")
    if v2 is not None and v2 < usage:
        return usage - v2
    return usage


@dataclass
class MemoryPeaks:
    samples: int = 0
    usage_peak: int = 0
    working_set_peak: int = 0
    max_usage: int = 0  # cgroup v1 memory.max_usage_in_bytes: the kernel's own peak
    limit: int | None = None
    cgroup: str | None = None

    def add(self, sample: dict[str, Any]) -> None:
        mem = sample.get("memory_stats") or {}
        ws = working_set_bytes(mem)
        if ws is None:
            return  # the container has stopped: an empty sample
        self.samples += 1
        self.usage_peak = max(self.usage_peak, mem["usage"])
        self.working_set_peak = max(self.working_set_peak, ws)
        self.max_usage = max(self.max_usage, mem.get("max_usage") or 0)
        self.limit = mem.get("limit", self.limit)
        stats = mem.get("stats") or {}
        self.cgroup = "v1" if "total_inactive_file" in stats else "v2" if "inactive_file" in stats else None

    def to_dict(self) -> dict[str, Any]:
        if not self.samples:
            return {"peak_mb": None, "working_set_peak_mb": None, "stats_samples": 0}
        peak = max(self.usage_peak, self.max_usage)
        return {
            "peak_mb": peak / MB,
            "peak_source": "cgroup v1 max_usage" if self.max_usage >= self.usage_peak else "sampled usage",
            "working_set_peak_mb": self.working_set_peak / MB,
            "sampled_usage_peak_mb": self.usage_peak / MB,
            "stats_samples": self.samples,
            "memory_limit_mb": self.limit / MB if self.limit else None,
            "cgroup": self.cgroup,
        }


@dataclass
class StatsMonitor:
    """Streams a container's stats in a thread (about one sample a second) and keeps the peaks."""

    container: Any
    peaks: MemoryPeaks = field(default_factory=MemoryPeaks)
    error: str | None = None
    latest: tuple[int, int] | None = None  # (usage, working set) in bytes, from the last sample
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="docker-stats", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for sample in self.container.stats(stream=True, decode=True):
                self.peaks.add(sample)
                mem = sample.get("memory_stats") or {}
                ws = working_set_bytes(mem)
                if ws is not None:
                    self.latest = (mem["usage"], ws)
        except Exception as exc:  # the container was removed, or the daemon went away
            self.error = f"{type(exc).__name__}: {exc}"

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
