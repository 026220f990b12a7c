"""The typed, versioned records every results directory holds, and the one way to read and write them.

Each record type is a frozen dataclass with a schema tag (`family/version`), `to_dict()` (what is
written) and `load(dict)` (what is read), in the spirit of pyperf's one JSON model. `load` reads every
older shape of its family:

- a field an older shape lacks takes its default (each class says what the defaults mean), and is not
  written back, so re-writing an older record changes nothing of it;
- a key the model does not know is kept in `extra` and written back, so nothing read is lost;
- the keys are written back in the order they were read (a freshly built record: in field order).

A tag of another family, or of a newer version than this harness knows, is a RecordError.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from harness.errors import UsageError
from harness.measure import field_types

SCHEMA_KEY = "schema"
_BOOKKEEPING = ("extra", "read_keys")  # fields of every record that are not keys of the written dict

R = TypeVar("R", bound="Record")


class RecordError(UsageError, ValueError):
    """A dict that is not a record of the expected family (or of a version newer than this harness): the
    directory given cannot be read by this harness (exit code 2)."""


class FieldTypeError(RecordError):
    """A record of the family whose field holds a value of another type (a corrupted or hand-edited file)."""


@dataclass(frozen=True, kw_only=True)
class Record:
    """Base of every record. `extra`: keys the model does not know, kept as read. `read_keys`: the keys
    of the dict this record was loaded from, in order (None: built here, every field is written)."""

    FAMILY: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    TAGGED: ClassVar[bool] = True  # whether the written dict carries the schema tag

    extra: dict[str, Any] = field(default_factory=dict)
    read_keys: tuple[str, ...] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def tag(cls, version: int | None = None) -> str:
        return f"{cls.FAMILY}/{cls.VERSION if version is None else version}"

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in _BOOKKEEPING]

    @property
    def version(self) -> int:
        """The version of the shape this record was written in (an untagged older file: 1)."""
        schema = getattr(self, SCHEMA_KEY, None)
        return int(schema.rsplit("/", 1)[1]) if schema else 1

    def recorded(self, name: str) -> bool:
        """Whether the record carries `name` itself (False: an older shape without it, read as its default)."""
        return self.read_keys is None or name in self.read_keys

    # --- writing --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """What is written: the keys read, in their order, then fields set since; unknown keys kept."""
        values = {name: getattr(self, name) for name in self.field_names()}
        if not self.TAGGED or (self.read_keys is not None and SCHEMA_KEY not in self.read_keys):
            values.pop(SCHEMA_KEY, None)
        if self.read_keys is None:
            return {**values, **self.extra}
        defaults = _defaults(type(self))
        out: dict[str, Any] = {}
        for key in self.read_keys:
            if key in values:
                out[key] = values[key]
            elif key in self.extra:
                out[key] = self.extra[key]
        for key, value in values.items():  # fields an older shape lacked, set since it was read
            if key not in out and key != SCHEMA_KEY and value != defaults.get(key, _MISSING):
                out[key] = value
        out.update((k, v) for k, v in self.extra.items() if k not in out)
        return out

    # --- reading --------------------------------------------------------------------------------
    @classmethod
    def load(cls: type[R], data: dict[str, Any]) -> R:
        """The record from a dict of any shape of this family (RecordError if it is not one)."""
        if not isinstance(data, dict):
            raise RecordError(f"a {cls.FAMILY} record must be a JSON object, not {type(data).__name__}")
        cls._check_tag(data.get(SCHEMA_KEY))
        names = set(cls.field_names())
        known = {k: v for k, v in data.items() if k in names}
        missing = [f.name for f in fields(cls) if f.name in names and f.name not in known
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise RecordError(f"not a {cls.FAMILY} record: no {', '.join(missing)}")
        mismatch = field_types.first_mismatch(cls, known)
        if mismatch:
            raise FieldTypeError(mismatch)
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra, read_keys=tuple(data))

    @classmethod
    def _check_tag(cls, schema: Any) -> None:
        if schema is None:
            return  # an untagged older file
        family, _, version = str(schema).partition("/")
        if family != cls.FAMILY or not version.isdigit():
            raise RecordError(f"a {schema!r} record is not a {cls.tag()} record")
        if int(version) > cls.VERSION:
            raise RecordError(f"{schema} was written by a newer harness (this one reads {cls.FAMILY} up to "
                              f"version {cls.VERSION}): update the harness")


_MISSING = object()


def _defaults(cls: type[Record]) -> dict[str, Any]:
    out = {}
    for f in fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


# --- experiment A ------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class AllocRun(Record):
    """One probe run of `harness alloc` (alloc/runs.jsonl).

    Versions: alloc-run/1 records hold 35 keys (no pairing, contention or window fields), 39 (pairing) or
    44 (contention, noise, measured window); read from them, the fields they lack are None (pair, slot,
    placement, concurrent_with: not paired; steal_pct, involuntary_switches, noise: not recorded, see
    `recorded`; measured_s, measured_share: computed from `probe` where asked). alloc-run/2 adds
    `environment`: the environment file of the invocation that ran it (None in /1: the host is then
    told from the environments' timestamps)."""

    FAMILY: ClassVar[str] = "alloc-run"
    VERSION: ClassVar[int] = 2

    schema: str = "alloc-run/2"
    run_index: int
    round: int  # negative: a warm-up round, not counted
    position: int
    pair: str | None = None
    slot: int | None = None
    placement: dict[str, Any] | None = None
    concurrent_with: int | None = None  # paired design: run_index of the run it ran beside
    warmup: bool = False
    allocator: str
    requested_library: str | None = None
    allocator_env: dict[str, str] | None = None
    runner: str | None = None
    environment: str | None = None  # alloc-run/2: environment.json or environment.resume-N.json
    model: str | None = None
    device: str | None = None
    started_at: str | None = None
    status: str  # "ok" or "failed"
    failure: str | None = None
    verified: bool = False
    loaded_allocator: dict[str, Any] | None = None
    exit_code: int | None = None
    wall_real_s: float | None = None
    gen_latency_s: float | None = None
    cold_latency_s: float | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    itl_p25_s: float | None = None
    itl_p50_s: float | None = None
    steal_pct: float | None = None
    involuntary_switches: int | None = None
    noise: dict[str, Any] | None = None  # page faults, GPU clocks and throttle reasons, CPU frequency
    measured_s: float | None = None
    measured_share: float | None = None
    load_s: float | None = None
    import_s: float | None = None
    rss_mb: float | None = None
    parent_maxrss_mb: float | None = None
    gpu_peak_allocated_mb: float | None = None
    gpu_peak_reserved_mb: float | None = None
    container_peak_mb: float | None = None
    container_working_set_peak_mb: float | None = None
    container: dict[str, Any] | None = None
    log_tail: list[str] | None = None
    probe: dict[str, Any] | None = None  # what the probe reported, as it reported it

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def key(self) -> tuple[int, str, str | None]:
        """What identifies the run in the plan: (round, allocator, pair)."""
        return (self.round, self.allocator, self.pair)

    def value(self, name: str) -> Any:
        """A per-run figure by its field name (the metric a report compares)."""
        return getattr(self, name)


@dataclass(frozen=True, kw_only=True)
class AllocSet(Record):
    """One set of the duet design (alloc/sets.jsonl): one fresh persistent probe per arm, started together,
    each verified in its own process, written when the set ends. `arms`: per arm its label, allocator,
    start position, placement, PID, verification, what it loaded and how its process ended. `status`: ok
    (its windows are counted), failed (a probe died, timed out or was not verified: never counted) or
    interrupted; `ended_by` says what ended it (windows done, time, a death, an interrupt)."""

    FAMILY: ClassVar[str] = "alloc-set"
    VERSION: ClassVar[int] = 1

    schema: str = "alloc-set/1"
    set_index: int
    status: str
    ended_by: str
    failure: str | None = None
    steps: int = 0  # measured steps (one window per arm each) completed
    started_at: str | None = None
    wall_s: float | None = None
    runner: str | None = None
    environment: str | None = None
    model: str | None = None
    device: str | None = None
    arms: list[dict[str, Any]] = field(default_factory=list)

    @property
    def counted(self) -> bool:
        return self.status in ("ok", "interrupted") and self.steps > 0


@dataclass(frozen=True, kw_only=True)
class AllocWindow(Record):
    """One measured window of one arm in a duet set (alloc/windows.jsonl), appended as soon as it is
    measured. `step`: the step of the set (one window per arm, in `position` order); negative steps are
    warm-up, never counted. `t_s`: when the window started, seconds since its set's probes were all ready."""

    FAMILY: ClassVar[str] = "alloc-window"
    VERSION: ClassVar[int] = 1

    schema: str = "alloc-window/1"
    set_index: int
    step: int
    position: int
    arm: str
    allocator: str
    warmup: bool = False
    t_s: float | None = None
    gens: int
    latencies_s: list[float] = field(default_factory=list)
    gen_latency_s: float | None = None
    measured_s: float | None = None
    window_s: float | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    itl_p25_s: float | None = None
    itl_p50_s: float | None = None
    itl_p90_s: float | None = None
    rss_mb: float | None = None
    peak_rss_mb: float | None = None
    steal_pct: float | None = None
    involuntary_switches: int | None = None
    minor_faults: int | None = None
    major_faults: int | None = None
    gpu_peak_allocated_mb: float | None = None
    noise: dict[str, Any] | None = None

    def value(self, name: str) -> Any:
        return getattr(self, name)


# --- experiment B ------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ServeRequest(Record):
    """One request to a server of `harness serve` (serve/requests.jsonl).

    Versions: serve-request/1 streamed records ended e2e_s and tpot_s after the usage chunk and [DONE];
    serve-request/2 end them at the last token event (vLLM's benchmark client), see `ends_at_stream_end`.
    Fields a shape lacks are None: allocator and round outside an allocator comparison, set_index, step and
    position outside the duet design (its set, its step, negative for the warm-up step, and its place in the
    step), failure_kind unless the request failed, the timing fields unless it succeeded."""

    FAMILY: ClassVar[str] = "serve-request"
    VERSION: ClassVar[int] = 2

    schema: str = "serve-request/2"
    server: int
    index: int
    kind: str  # cold, warm or idle
    idle_gap_s: float | None = None
    mode: str | None = None  # stream or plain
    engine: str | None = None
    model: str | None = None
    max_tokens: int | None = None
    started_at: str | None = None
    t_start_s: float | None = None
    since_ready_s: float | None = None
    allocator: str | None = None
    round: int | None = None
    set_index: int | None = None
    step: int | None = None
    position: int | None = None
    t_end_s: float | None = None
    status: str | None = None
    failure: str | None = None
    failure_kind: str | None = None
    wall_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    tpot_s: float | None = None
    itl_s: list[float] | None = None
    n_events: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    text_head: str | None = None
    server_ttft_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def ends_at_stream_end(self) -> bool:
        """A streamed serve-request/1 record: its e2e_s and tpot_s run to the end of the stream."""
        return self.version == 1 and self.mode == "stream"


@dataclass(frozen=True, kw_only=True)
class StartupRecord(Record):
    """One server's start-up (serve/startup.jsonl): how it was started, when it answered, the phases of its
    log, and how it ended. serve-startup/1 shapes differ in which keys they hold (the allocator fields
    only in a comparison, the fault fields only on a failure, the analysis fields as the analysis grew)
    and in their order; a missing key reads as None (lists and dicts: empty), and is not written back."""

    FAMILY: ClassVar[str] = "serve-startup"
    VERSION: ClassVar[int] = 1

    schema: str = "serve-startup/1"
    server: int
    engine: str | None = None
    runner: str | None = None
    argv: list[str] | None = None
    started_at: str | None = None
    log: str | None = None  # the server's stamped log, relative to the results directory
    allocator: str | None = None
    round: int | None = None
    position: int | None = None
    allocator_library: str | None = None
    allocator_env: dict[str, str] | None = None
    pid: int | None = None
    container_name: str | None = None
    spawn_to_health_s: float | None = None
    spawn_to_models_s: float | None = None
    models: list[str] | None = None
    allocators_mapped: dict[str, list[str]] | None = None
    processes: list[dict[str, Any]] | None = None
    server_preload: str | None = None
    preload_verified: bool | None = None
    allocator_check: dict[str, Any] | None = None
    spawn_to_first_token_s: float | None = None
    status: str | None = None
    failure: str | None = None
    exit_code: int | None = None
    exit: str | None = None
    log_tail: list[str] | None = None
    fault: str | None = None
    memory_peaks: dict[str, float] | None = None
    container: dict[str, Any] | None = None
    stopped_exit: str | None = None
    phases: list[dict[str, Any]] = field(default_factory=list)
    unaccounted_s: float | None = None
    server_figures: dict[str, Any] = field(default_factory=dict)
    silences: list[dict[str, Any]] = field(default_factory=list)
    stacks_reason: str | None = None
    import_shares: dict[str, Any] = field(default_factory=dict)
    compile_cache: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def log_path(self) -> str:
        return self.log or f"serve/server-{self.server}.log"

    def coverage(self) -> float | None:
        """Share of spawn -> /health 200 that lies in a named phase."""
        if not self.spawn_to_health_s or self.unaccounted_s is None:
            return None
        return max(0.0, 1.0 - self.unaccounted_s / self.spawn_to_health_s)


@dataclass(frozen=True, kw_only=True)
class ServeSet(Record):
    """One set of `harness serve --design duet` (serve/sets.jsonl): one fresh server per arm, all up at once,
    written when the set ends. `servers`: per server its number, allocator, start position, port, CPUs and
    whether it was verified. `status`: ok (its warm requests count), failed (a server died, failed or was
    not verified: never counted) or interrupted; `ended_by` says what ended it."""

    FAMILY: ClassVar[str] = "serve-set"
    VERSION: ClassVar[int] = 1

    schema: str = "serve-set/1"
    set_index: int
    status: str
    ended_by: str
    failure: str | None = None
    steps: int = 0  # measured steps (one warm request per server each) completed
    started_at: str | None = None
    wall_s: float | None = None
    servers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def counted(self) -> bool:
        return self.status in ("ok", "interrupted") and self.steps > 0


@dataclass(frozen=True, kw_only=True)
class ServeEnd(Record):
    """serve/end.json: how a serve run ended, as its report said it. `stopped_early`: why it stopped early,
    the line the live report and the command's error gave (a server's fault with the console's hint, an
    interrupt, a comparison that could not go on), None when it ran to its end. A run older than this file
    is told from its failed start-ups."""

    FAMILY: ClassVar[str] = "serve-end"
    VERSION: ClassVar[int] = 1

    schema: str = "serve-end/1"
    stopped_early: str | None = None


@dataclass(frozen=True, kw_only=True)
class TimelineSample:
    """One row of serve/memory_timeline.csv: a memory sample (`values`, MiB per series) or a marker
    (`marker`: kind:label). The CSV has one column per series, so a row's schema is its header; the
    series names end in `_mb` (a column that does not is kept in `extra`)."""

    t_s: float
    values: dict[str, float] = field(default_factory=dict)
    marker: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"t_s": self.t_s, **self.values, **self.extra}
        if self.marker:
            row["marker"] = self.marker
        return row

    @classmethod
    def load(cls, row: dict[str, Any]) -> TimelineSample:
        """From a CSV row (strings; an empty cell is no value) or a dict written by to_dict."""
        if row.get("t_s") in (None, ""):
            raise RecordError("not a timeline sample: no t_s")
        values = {k: float(v) for k, v in row.items() if k.endswith("_mb") and v not in ("", None)}
        extra = {k: v for k, v in row.items()
                 if k not in ("t_s", "marker") and not k.endswith("_mb") and v not in ("", None)}
        return cls(t_s=float(row["t_s"]), values=values, marker=row.get("marker") or None, extra=extra)


@dataclass(frozen=True, kw_only=True)
class TimelineMeta(Record):
    """serve/timeline.json: how the timeline was sampled. Untagged older files read as timeline/1; a
    missing key has the sampler's default (20 Hz, enabled, no GPU reason, process-tree RSS)."""

    FAMILY: ClassVar[str] = "timeline"
    VERSION: ClassVar[int] = 1

    schema: str = "timeline/1"
    hz: float = 20.0
    enabled: bool = True
    gpu_reason: str | None = None
    has_container: bool = False


# --- both ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Environment(Record):
    """environment.json (and environment.resume-N.json): the host, its GPUs and the software of one
    invocation. Untagged older files read as environment/1; what an experiment adds (runner, serve_engine,
    server_vllm, ...) is in `extra`, written at the top level as before. A missing section reads as empty."""

    FAMILY: ClassVar[str] = "environment"
    VERSION: ClassVar[int] = 1

    schema: str = "environment/1"
    collected_at: str | None = None
    host: dict[str, Any] = field(default_factory=dict)
    gpu: dict[str, Any] = field(default_factory=dict)
    software: dict[str, Any] = field(default_factory=dict)
    allocator_libraries: Any = None

    @property
    def host_key(self) -> str:
        """What tells one host apart: its GPUs' UUIDs, else its hostname (else its CPU model)."""
        devices = (self.gpu or {}).get("devices") or []
        if devices:
            return ",".join(str(d.get("uuid", "?"))[:12] for d in devices)
        return str(self.host.get("hostname") or self.host.get("cpu_model") or "unknown host")

    @property
    def gpu_name(self) -> str:
        devices = (self.gpu or {}).get("devices") or []
        return devices[0]["name"] if devices else "no GPU"

    def added(self, name: str) -> Any:
        """What an experiment added to the file (`server_vllm`, `runner`, ...), or None."""
        return (self.extra.get("extra") or self.extra).get(name)

