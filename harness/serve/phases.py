"""Start-up phases from the server log: milestones found by pattern, timed by line arrival.

A phase runs from the previous milestone found to this one; whatever lies between the last
milestone and /health 200 (or the whole start-up, when the log has none) is shown as unaccounted.
Durations the server reports itself ("took 47.40 s") are kept beside the measured ones.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import asdict, dataclass
from typing import Any

# (key, phase label, pattern). Order is the order vLLM (CPU and CUDA) logs them; `transformers serve`
# matches args, weights_loaded, server_start and app_startup.
MILESTONES: list[tuple[str, str, str]] = [
    ("args", "interpreter start, imports, argument parsing",
     r"non-default args|vLLM API server version|^\[transformers\] Loading "),
    ("engine_init", "model config resolution, engine process spawn", r"Initializing a V1 LLM engine"),
    ("load_start", "worker start-up, device/distributed init", r"Starting to load model"),
    ("model_init", "model construction", r"Initializing model took"),
    ("weights_loaded", "weights loaded", r"Loading weights took|Model loading took|Loading weights: 100%"),
    ("compile_start", "post-load set-up", r"Warming up model for the compilation|Dynamo bytecode transform"),
    ("compile_done", "torch.compile / warm-up", r"Warming up done|torch\.compile takes|Compil\w+ .*took"),
    ("kv_cache", "KV cache allocation", r"KV cache size|Available KV cache memory"),
    ("graph_capture", "CUDA graph capture", r"Graph capturing finished"),
    ("engine_ready", "engine init finish", r"init engine \(profile, create kv cache, warmup model\) took"),
    ("server_start", "API server set-up", r"Starting vLLM (API )?server on|Started server process"),
    ("app_startup", "application startup complete", r"Application startup complete"),
]
_COMPILED = [(k, label, re.compile(p)) for k, label, p in MILESTONES]
_SELF_REPORTED = re.compile(r"took ([\d.]+) ?(s|sec|secs|seconds)\b|takes ([\d.]+) s in total|"
                            r"finished in ([\d.]+) secs?")
_LOG_TIME = re.compile(r"\b(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})\b")


@dataclass(frozen=True)
class Phase:
    key: str
    label: str
    start_s: float
    end_s: float
    reported_s: float | None = None  # the server's own figure for this step, if it logs one
    line: str = ""

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "duration_s": self.duration_s}


def self_reported(line: str) -> float | None:
    m = _SELF_REPORTED.search(line)
    if not m:
        return None
    value = next(g for g in (m.group(1), m.group(3), m.group(4)) if g is not None)
    return float(value)


def find_milestones(lines: list[tuple[float, str]]) -> list[tuple[str, str, float, str]]:
    """First occurrence of each milestone, in time order: (key, label, t, line)."""
    seen: dict[str, tuple[str, str, float, str]] = {}
    for t, line in lines:
        for key, label, pattern in _COMPILED:
            if key not in seen and pattern.search(line):
                seen[key] = (key, label, t, line.strip())
    return sorted(seen.values(), key=lambda m: m[2])


def phases(lines: list[tuple[float, str]], ready_s: float | None) -> tuple[list[Phase], float | None]:
    """Phases from spawn (t=0) through the milestones, and the unaccounted rest up to `ready_s`."""
    out: list[Phase] = []
    prev = 0.0
    for key, label, t, line in find_milestones(lines):
        out.append(Phase(key, label, prev, t, self_reported(line), line[-200:]))
        prev = t
    unaccounted = None if ready_s is None else max(ready_s - prev, 0.0)
    return out, unaccounted


def compile_cache_use(lines: list[tuple[float, str]]) -> str | None:
    """'hit' when vLLM loaded its AOT-compiled model from the cache, 'miss' when it compiled."""
    text = [line for _, line in lines]
    if any("Directly load AOT compilation" in t or "Directly load the compiled graph" in t for t in text):
        return "hit"
    if any("saved AOT compiled function" in t or "Compiling model again" in t for t in text):
        return "miss"
    return None


def lines_from_log_timestamps(text: str) -> list[tuple[float, str]]:
    """(t, line) from a raw vLLM log using its own one-second timestamps (no arrival times)."""
    out: list[tuple[float, str]] = []
    t0: dt.datetime | None = None
    last = 0.0
    for line in text.splitlines():
        m = _LOG_TIME.search(line)
        if m:
            mo, d, h, mi, s = (int(x) for x in m.groups())
            stamp = dt.datetime(2000, mo, d, h, mi, s)
            t0 = t0 or stamp
            last = (stamp - t0).total_seconds()
        out.append((last, line))
    return out
