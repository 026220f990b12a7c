"""The probe's session protocol: one persistent probe process answers measured windows on request.

Standard library only (it runs inside probe images). One JSON object per line each way:

- the probe, once its model is loaded and its cold `generate` done, prints READY_MARKER + `Ready`;
- the driver writes one `WindowRequest` per line on the probe's stdin;
- the probe answers each with WINDOW_MARKER + `WindowResult`, or ERROR_MARKER + {"error": ...} and exits;
- end of stdin (or a request with `stop` set) ends the process.

Anything else the probe's libraries print on stdout is not a marked line and is ignored by the driver.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

READY_MARKER = "HARNESS_PROBE_READY "
WINDOW_MARKER = "HARNESS_PROBE_WINDOW "
ERROR_MARKER = "HARNESS_PROBE_ERROR "
SCHEMA = "probe-session/1"


class ProtocolError(ValueError):
    """A line that claims to be a protocol message but is not a valid one."""


def _build(cls: type, data: Any) -> Any:
    """`cls` from a decoded JSON object: unknown keys are left out, a missing or mistyped field is an error."""
    if not isinstance(data, dict):
        raise ProtocolError(f"a {cls.__name__} must be a JSON object, not {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in names})
    except TypeError as exc:
        raise ProtocolError(f"not a {cls.__name__}: {exc}") from None


@dataclass(frozen=True)
class WindowRequest:
    """One measured window: `gens` generates, or as many as fill `seconds` of generation (at least one)."""

    window: int
    gens: int | None = None
    seconds: float | None = None
    stop: bool = False  # no window: the process ends

    def __post_init__(self) -> None:
        if self.stop:
            return
        if (self.gens is None) == (self.seconds is None):
            raise ProtocolError("a window is a number of generates or a number of seconds, exactly one of them")
        if self.gens is not None and (not isinstance(self.gens, int) or self.gens < 1):
            raise ProtocolError(f"window gens must be a positive integer, not {self.gens!r}")
        if self.seconds is not None and not (isinstance(self.seconds, (int, float)) and math.isfinite(self.seconds)
                                             and self.seconds > 0):
            raise ProtocolError(f"window seconds must be a positive finite number, not {self.seconds!r}")

    def line(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def parse(cls, line: str) -> WindowRequest:
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ProtocolError(f"not JSON: {exc}") from None
        return _build(cls, data)


@dataclass(frozen=True)
class Ready:
    """What the probe says once loaded: which malloc this process resolved, where it may run, what it loaded."""

    schema: str
    pid: int
    allocator: dict[str, Any]
    cpu_affinity: list[int]
    device: str
    dtype: str
    model: dict[str, Any]
    prompt_tokens: int
    max_new_tokens: int
    import_s: float
    device_init_s: float
    load_s: float
    cold: dict[str, Any]
    torch_threads: int
    versions: dict[str, Any]
    ready_s: float  # process start to ready, the probe's own clock

    def line(self) -> str:
        return READY_MARKER + json.dumps(asdict(self))


@dataclass(frozen=True)
class WindowResult:
    """One measured window of warm generates: per-generate latencies and the window's summary figures."""

    window: int
    gens: int
    latencies_s: list[float]
    gen_latency_s: float  # median over the window's generates
    measured_s: float  # seconds of generation
    window_s: float  # wall seconds of the window, as the probe saw it
    ttft_s: float | None
    tpot_s: float | None
    itl_p25_s: float | None
    itl_p50_s: float | None
    itl_p90_s: float | None
    rss_mb: float
    peak_rss_mb: float
    steal_pct: float | None
    involuntary_switches: int
    minor_faults: int
    major_faults: int
    gpu_peak_allocated_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return WINDOW_MARKER + json.dumps(asdict(self))


def parse_marked(line: str) -> tuple[str, Any] | None:
    """('ready', Ready) | ('window', WindowResult) | ('error', message) for a marked line; None for any other
    line. A marked line whose message is malformed raises ProtocolError: it is never silently dropped."""
    for marker, kind, cls in ((READY_MARKER, "ready", Ready), (WINDOW_MARKER, "window", WindowResult),
                              (ERROR_MARKER, "error", None)):
        if line.startswith(marker):
            try:
                data = json.loads(line[len(marker):])
            except json.JSONDecodeError as exc:
                raise ProtocolError(f"a {kind} line that is not JSON: {exc}") from None
            if cls is None:
                return kind, (data.get("error") if isinstance(data, dict) else None) or "probe error"
            return kind, _build(cls, data)
    return None
