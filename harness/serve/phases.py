"""Start-up phases from the server log: milestones found by pattern, timed by line arrival.

A phase runs from the previous milestone found to this one, and its label names the work that ends
at that milestone's line (calibrated on vLLM 0.32 CPU and vLLM 0.26 CUDA logs; `transformers serve`
matches a few). Two milestones come from the process tags vLLM puts on its lines rather than from a
pattern: the API server's last line before the engine core's first (config resolution ends), and the
engine core's first line (its process start and imports end). Whatever lies between the last
milestone and /health 200 (or the whole start-up, when the log has none) is unaccounted.

Beside the phases: the figures the server logs about itself (weights GiB and seconds, torch.compile
seconds, KV cache GiB and tokens, CUDA graph seconds and GiB), whether the torch.compile cache was hit,
and the silent stretches (no line for `SILENCE_S` or more), which `stacks` names from Python stacks.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import asdict, dataclass
from typing import Any

SILENCE_S = 2.0  # a gap between two log lines this long is a silent stretch worth naming


@dataclass(frozen=True)
class Milestone:
    key: str
    label: str  # the work that ends at this milestone's line
    pattern: re.Pattern[str]


def _m(key: str, label: str, pattern: str) -> Milestone:
    return Milestone(key, label, re.compile(pattern))


# Band labels on the memory timeline.
SHORT = {"args": "API imports", "config": "config", "engine_start": "engine imports",
         "device_init": "device init", "model_init": "model init", "weights_loaded": "weights",
         "compile_start": "post-load", "dynamo": "Dynamo", "compile_done": "compile",
         "profile_run": "profile run", "warmup_done": "warm-up", "graph_memory": "graph mem",
         "kv_cache": "KV cache", "graph_capture": "CUDA graphs", "engine_ready": "engine rest",
         "server_start": "API set-up", "app_startup": "HTTP start"}


# In the order vLLM logs them. Process-tag milestones ("config", "engine_start") are found separately.
MILESTONES: list[Milestone] = [
    _m("args", "API server: interpreter start and imports",
       r"non-default args|vLLM API server version|^\[transformers\] Loading "),
    _m("device_init", "engine core: executor and worker start, device and distributed init",
       r"Starting to load model|Loading model from scratch"),
    _m("model_init", "model construction", r"Initializing model took"),
    _m("weights_loaded", "weights load",
       r"Model loading took|Loading weights took|Loading weights: 100%"),
    _m("compile_start", "post-load set-up", r"Warming up model for the compilation"),
    _m("dynamo", "torch.compile: Dynamo bytecode transform", r"Dynamo bytecode transform time"),
    _m("compile_done", "torch.compile: graph compile or cache load",
       r"torch\.compile took .* in total|torch\.compile takes|saved AOT compiled function|"
       r"Directly load AOT compilation"),
    _m("profile_run", "profiling / warm-up run", r"Initial profiling/warmup run took"),
    _m("warmup_done", "warm-up finish", r"Warming up done"),
    _m("graph_memory", "CUDA graph memory profiling", r"Estimated CUDA graph memory"),
    _m("kv_cache", "KV cache sizing", r"KV cache size: [\d,]+ tokens"),
    _m("graph_capture", "CUDA graph capture", r"Graph capturing finished"),
    _m("engine_ready", "rest of engine init (sampler and kernel warm-up, Triton JIT)",
       r"init engine \(profile, create kv cache, warmup model\) took"),
    _m("server_start", "API server set-up (engine handshake, tokenizer, chat template, routes)",
       r"Starting vLLM (API )?server on|Started server process"),
    _m("app_startup", "HTTP server start (uvicorn application start-up)", r"Application startup complete"),
]
CONFIG_LABEL = "API server: model and engine config resolution"
ENGINE_START_LABEL = "engine core: process start and imports"

_PROCESS_TAG = re.compile(r"^\((?P<role>[A-Za-z][\w-]*) pid=(?P<pid>\d+)\)")
_SELF_REPORTED = re.compile(r"took ([\d.]+) ?(s|sec|secs|seconds)\b|takes ([\d.]+) s in total|"
                            r"finished in ([\d.]+) secs?")
_LOG_TIME = re.compile(r"\b(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})\b")
_STAMPED = re.compile(r"^\[\s*(-?[\d.]+)\] ?(.*)$")

# Figures the server reports about its own start-up: (name, pattern, group -> value).
_FACTS: list[tuple[str, re.Pattern[str]]] = [
    ("weights_gib", re.compile(r"Model loading took ([\d.]+) GiB")),
    ("weights_s", re.compile(r"Model loading took [\d.]+ GiB (?:memory )?and ([\d.]+) seconds|"
                             r"Loading weights took ([\d.]+) seconds")),
    ("dynamo_s", re.compile(r"Dynamo bytecode transform time: ([\d.]+) s")),
    ("compile_s", re.compile(r"torch\.compile took ([\d.]+) s in total|torch\.compile takes ([\d.]+) s in total")),
    ("profile_run_s", re.compile(r"Initial profiling/warmup run took ([\d.]+) s")),
    ("kv_cache_gib", re.compile(r"Available KV cache memory: ([\d.]+) GiB|Explicitly set \(([\d.]+)/")),
    ("kv_cache_tokens", re.compile(r"KV cache size: ([\d,]+) tokens")),
    ("graph_capture_s", re.compile(r"Graph capturing finished in ([\d.]+) secs")),
    ("graph_gib", re.compile(r"Graph capturing finished in [\d.]+ secs, took ([\d.]+) GiB")),
    ("init_engine_s", re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s")),
]
_GRAPH_COMPILES = re.compile(r"Compiling a graph for compile range .* takes ([\d.]+) s")
_GRAPH_LOADS = re.compile(r"Directly load the compiled graph\(s\) for compile range .* took ([\d.]+) s")


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


@dataclass(frozen=True)
class Silence:
    """A stretch of start-up with no log line; `phase` is the phase it lies in."""

    start_s: float
    end_s: float
    phase: str

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def self_reported(line: str) -> float | None:
    m = _SELF_REPORTED.search(line)
    if not m:
        return None
    value = next(g for g in (m.group(1), m.group(3), m.group(4)) if g is not None)
    return float(value)


def process_role(line: str) -> str | None:
    """'APIServer', 'EngineCore', 'Worker', ... from vLLM's `(Role pid=N)` line prefix."""
    m = _PROCESS_TAG.match(line)
    return m.group("role") if m else None


def process_roles(lines: list[tuple[float, str]]) -> dict[int, str]:
    """PID -> role ('APIServer', 'EngineCore', ...) from vLLM's `(Role pid=N)` line prefixes."""
    roles: dict[int, str] = {}
    for _, line in lines:
        m = _PROCESS_TAG.match(line)
        if m:
            roles.setdefault(int(m.group("pid")), m.group("role"))
    return roles


def _is_api_server(role: str) -> bool:
    return role.startswith("APIServer")


def process_milestones(lines: list[tuple[float, str]]) -> list[tuple[str, str, float, str]]:
    """The API server's last line before the engine core's first, and that first line."""
    last_api: tuple[float, str] | None = None
    for t, line in lines:
        role = process_role(line)
        if role is None:
            continue
        if _is_api_server(role):
            last_api = (t, line)
            continue
        found = [("engine_start", ENGINE_START_LABEL, t, line.strip())]
        if last_api is not None:
            found.insert(0, ("config", CONFIG_LABEL, last_api[0], last_api[1].strip()))
        return found
    return []


def find_milestones(lines: list[tuple[float, str]]) -> list[tuple[str, str, float, str]]:
    """First occurrence of each milestone, in time order: (key, label, t, line)."""
    seen: dict[str, tuple[str, str, float, str]] = {}
    for t, line in lines:
        for ms in MILESTONES:
            if ms.key not in seen and ms.pattern.search(line):
                seen[ms.key] = (ms.key, ms.label, t, line.strip())
    for found in process_milestones(lines):
        seen.setdefault(found[0], found)
    return sorted(seen.values(), key=lambda m: m[2])


def phases(lines: list[tuple[float, str]], ready_s: float | None) -> tuple[list[Phase], float | None]:
    """Phases from spawn (t=0) through the milestones, and the unaccounted rest up to `ready_s`.
    Milestones after `ready_s` (a line logged after /health answered) are left out."""
    out: list[Phase] = []
    prev = 0.0
    for key, label, t, line in find_milestones(lines):
        if ready_s is not None and t > ready_s:
            break
        out.append(Phase(key, label, prev, t, self_reported(line), line[:240]))
        prev = t
    unaccounted = None if ready_s is None else max(ready_s - prev, 0.0)
    return out, unaccounted


def facts(lines: list[tuple[float, str]]) -> dict[str, float]:
    """The server's own figures about its start-up (first occurrence of each), plus the summed
    per-range graph compile and cache-load seconds."""
    out: dict[str, float] = {}
    compiles: list[float] = []
    loads: list[float] = []
    for _, line in lines:
        for name, pattern in _FACTS:
            m = pattern.search(line)
            if m and name not in out:
                out[name] = float(next(g for g in m.groups() if g is not None).replace(",", ""))
        if m := _GRAPH_COMPILES.search(line):
            compiles.append(float(m.group(1)))
        if m := _GRAPH_LOADS.search(line):
            loads.append(float(m.group(1)))
    if compiles:
        out["graph_compile_s"], out["graph_compiles"] = sum(compiles), float(len(compiles))
    if loads:
        out["graph_cache_load_s"], out["graph_cache_loads"] = sum(loads), float(len(loads))
    return out


def compile_cache_use(lines: list[tuple[float, str]]) -> str | None:
    """'hit' when vLLM loaded its compiled graphs from the cache, 'miss' when it compiled them."""
    text = [line for _, line in lines]
    if any("Directly load AOT compilation" in t or "Directly load the compiled graph" in t for t in text):
        return "hit"
    if any("saved AOT compiled function" in t or "Compiling model again" in t or
           "Compiling a graph for compile range" in t for t in text):
        return "miss"
    return None


def silences(lines: list[tuple[float, str]], ready_s: float | None, phase_list: list[Phase],
             min_s: float = SILENCE_S) -> list[Silence]:
    """Gaps of `min_s` or more between consecutive lines (from spawn, up to `ready_s`)."""
    end = ready_s if ready_s is not None else (lines[-1][0] if lines else 0.0)
    times = [0.0] + [t for t, _ in lines if t <= end] + [end]
    out = []
    for a, b in zip(times, times[1:], strict=False):
        if b - a >= min_s:
            out.append(Silence(a, b, phase_at(phase_list, (a + b) / 2)))
    return out


def phase_at(phase_list: list[Phase], t: float) -> str:
    for p in phase_list:
        if p.start_s <= t <= p.end_s:
            return p.label
    return "after the last milestone (unaccounted)"


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


def lines_from_stamped_log(text: str) -> list[tuple[float, str]]:
    """(t, line) from a harness `server-K.log`, whose lines carry their arrival time: `[   12.345] line`."""
    out: list[tuple[float, str]] = []
    for raw in text.splitlines():
        m = _STAMPED.match(raw)
        if m:
            out.append((float(m.group(1)), m.group(2)))
    return out
