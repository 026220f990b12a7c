"""`harness serve --allocators ... --design duet`: sets of fresh servers up at once, warm requests alternating.

A set is one fresh server per allocator, all started at once, each on its own free port, on its own CPUs
(disjoint groups of this process's CPUs, rotated across sets) and with the memory settings that apply
halved (vLLM CUDA: `--gpu-memory-utilization`; vLLM CPU: its KV cache space, `--kv-cache-gib`), so that they fit
together. Each is verified as a sequential server is (its allocator in every serving process, and here also
its CPUs). Each gets its cold request; then the driver sends warm requests one at a time, one per server
each step, who goes first alternating every step (ABBA for two arms, a rotation for more), after one
warm-up step that is recorded but not counted. Adjacent requests see the same host state, so the host's
slow stretches cancel out of their ratio (harness.serve.duet_stats).

A server that dies, fails a request or is not verified ends its set: the set is recorded as failed
(serve/sets.jsonl) and never counted; the comparison goes on with a new set.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psutil

from harness.measure.allocators import Allocator
from harness.measure.records import ServeRequest, ServeSet
from harness.serve import allocation, engines
from harness.serve.client import RequestError
from harness.serve.config import ServeConfig
from harness.serve.runners import LocalServers, Server
from harness.serve.sampler import MemorySampler
from harness.serve.server import LocalServer, ServerError, free_port

SETS_FILE = "serve/sets.jsonl"
WARMUP_STEPS = 1  # steps at the start of each set that are measured but not counted
DEFAULT_GPU_UTILIZATION = 0.9  # vLLM's own default, halved when none is given


class PlacementError(ServerError):
    """A server process ran outside the CPUs its set gave it."""


class PlacedServers(LocalServers):
    """The local runner for one server of a set: its own port and CPUs; the memory sampler is left alone
    (it follows one process tree, and a set has several up at once)."""

    def __init__(self, config: ServeConfig, cpus: tuple[int, ...] | None) -> None:
        super().__init__(config)
        self.cpus = cpus

    def server(self, k: int, spec: engines.ServerSpec, arm: Allocator | None, log_path: Any) -> Server:
        server = super().server(k, spec, arm, log_path)
        assert isinstance(server, LocalServer)
        server.cpus = self.cpus
        return server

    def where(self, arm: Allocator | None) -> str:
        return f" on CPUs {cpu_text(self.cpus)}" if self.cpus else ""

    def started(self, server: Server, record: dict[str, Any], sampler: MemorySampler) -> None:
        record["cpus"] = list(self.cpus) if self.cpus else None


def cpu_text(cpus: tuple[int, ...] | None) -> str:
    return ",".join(map(str, cpus)) if cpus else "all"


def rotated(items: list[Any], shift: int) -> list[Any]:
    shift %= len(items)
    return items[shift:] + items[:shift]


def placements(arms: list[Allocator], set_index: int, cpus: tuple[int, ...]) -> list[tuple[int, ...] | None]:
    """Each arm's CPUs in set `set_index`: disjoint equal groups of `cpus`, rotated every len(arms) sets (start
    order rotates every set, so the two are not confounded); None each where there are fewer CPUs than arms."""
    n = len(arms)
    if len(cpus) < n:
        return [None] * n
    size = len(cpus) // n
    groups = [tuple(cpus[i * size:(i + 1) * size]) for i in range(n)]
    shift = set_index // n
    return [groups[(i + shift) % n] for i in range(n)]


def step_order(arms: list[Allocator], set_index: int, step: int) -> list[Allocator]:
    """Who is asked first in a step: alternating every step (ABBA...), the first step's order rotated by set."""
    return rotated(arms, set_index + step)


def halved(config: ServeConfig, build: dict[str, Any] | None) -> ServeConfig:
    """The memory settings that apply to this server, halved so that two fit at once: on vLLM's CUDA build
    --gpu-memory-utilization (vLLM's 0.9 when none is given); on its CPU build the KV cache space."""
    if config.engine != "vllm":
        return config
    if (build or {}).get("build") == "cuda":
        return dataclasses.replace(config, gpu_memory_utilization=(config.gpu_memory_utilization
                                                                   or DEFAULT_GPU_UTILIZATION) / 2)
    return dataclasses.replace(config, kv_cache_gib=config.kv_cache_gib / 2)


def memory_line(config: ServeConfig, build: dict[str, Any] | None) -> str:
    half = halved(config, build)
    if config.engine != "vllm":
        return f"memory: --engine {config.engine} has no memory setting to halve; the servers share the host"
    if half.gpu_memory_utilization != config.gpu_memory_utilization:
        return f"memory: each server --gpu-memory-utilization {half.gpu_memory_utilization:g}"
    return (f"memory: each server --kv-cache-memory-bytes {half_kv_bytes(config)} "
            f"({kv_space(config) / 2:g} GiB of KV cache)")


def distinct_ports(host: str, n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return ports


def kv_space(config: ServeConfig) -> float:
    """A vLLM CPU server's KV cache space (GiB): this environment's VLLM_CPU_KVCACHE_SPACE, else --kv-cache-gib."""
    return float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or config.kv_cache_gib)


def half_kv_bytes(config: ServeConfig) -> int:
    return int(kv_space(config) * 2**30 / 2)


def server_spec(config: ServeConfig, build: dict[str, Any] | None, arm: Allocator, port: int) -> engines.ServerSpec:
    """The launch of one server of a set: its port, its halved memory, its allocator's preload. vLLM's CPU build
    reads VLLM_CPU_KVCACHE_SPACE as whole GiB (and lets it override the option), so there the half goes in
    bytes through --kv-cache-memory-bytes."""
    cfg = dataclasses.replace(halved(config, build), port=port)
    spec = engines.build(cfg, "local")
    if cfg.engine == "vllm" and cfg.kv_cache_gib != config.kv_cache_gib:
        spec.env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        spec = dataclasses.replace(spec, argv=[*spec.argv, "--kv-cache-memory-bytes", str(half_kv_bytes(config))])
    return allocation.arm_spec(spec, arm, "local")


def check_placement(pids: list[int], cpus: tuple[int, ...] | None) -> dict[str, Any]:
    """Every process of the tree may run only on `cpus` (os.sched_getaffinity of each)."""
    seen: dict[str, list[int]] = {}
    for pid in pids:
        try:
            seen[str(pid)] = sorted(psutil.Process(pid).cpu_affinity())
        except (psutil.Error, OSError):
            continue
    outside = {pid: c for pid, c in seen.items() if cpus and not set(c) <= set(cpus)}
    return {"cpus": list(cpus) if cpus else None, "affinity": seen, "verified": not outside,
            "reason": (f"processes {', '.join(outside)} may run outside CPUs {cpu_text(cpus)}" if outside else None)}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


class ServeDuetSet:
    """One set: start every server at once, verify each, cold requests, alternating warm steps, stop all;
    `run()` appends and returns its ServeSet. `session` is serve's run session (its launch, request and
    record methods)."""

    def __init__(self, session: Any, arms: list[Allocator], set_index: int, first_k: int,
                 build: dict[str, Any] | None, deadline: Callable[[float], bool] | None = None) -> None:
        self.session, self.arms, self.index = session, arms, set_index
        self.deadline = deadline  # deadline(seconds a step takes): True when the next step would end too late
        cfg = session.config
        host_cpus = tuple(sorted(os.sched_getaffinity(0)))
        cpus = dict(zip([a.name for a in arms], placements(arms, set_index, host_cpus), strict=True))
        ports = distinct_ports(cfg.host, len(arms))
        self.start_order = rotated(arms, set_index)
        self.launches = {}
        for i, arm in enumerate(self.start_order):
            runner = PlacedServers(dataclasses.replace(cfg, port=ports[i]), cpus[arm.name])
            self.launches[arm.name] = session.new_server(first_k + i, server_spec(cfg, build, arm, ports[i]), arm,
                                                         set_index, i, runner)
        self.placement: dict[str, dict[str, Any]] = {}
        self.started_at, self.t0 = _now(), time.monotonic()
        self.steps, self.indices = 0, {name: 1 for name in self.launches}
        self.status, self.ended_by, self.failure = "ok", "steps", None

    def run(self) -> ServeSet:
        try:
            self._measure()
        except (_Ended, ServerError, RequestError) as exc:
            self._fail(exc)
        except BaseException:
            self.status, self.ended_by = "interrupted", "interrupted"
            self._close()
            self._write()
            raise
        signalled = self._close()
        record = self._write()
        if signalled:
            raise KeyboardInterrupt
        return record

    def _measure(self) -> None:
        for arm in self.start_order:  # in this thread: each server dies with it
            self.session.spawn(self.launches[arm.name])
        self._up_together()
        with httpx.Client(timeout=self.session.config.request_timeout_s) as client:
            for arm in self.start_order:
                self._request(client, arm, None, 0, "cold")
            self._steps(client)

    def _up_together(self) -> None:
        """Waits for every server at once (each one's start-up times its own), then checks each one's CPUs."""
        pool = ThreadPoolExecutor(len(self.launches))
        futures = {name: pool.submit(self.session.await_ready, launch) for name, launch in self.launches.items()}
        errors = []
        try:
            for name, future in futures.items():
                try:
                    future.result()
                except (ServerError, RequestError) as exc:
                    errors.append((name, exc))
        finally:  # a Ctrl-C does not wait for the others: stopping the servers ends their waits
            pool.shutdown(wait=False, cancel_futures=True)
        if errors:
            name, exc = errors[0]
            raise _Ended(name, exc)
        for name, launch in self.launches.items():
            check = check_placement(launch.server.pids(), launch.runner.cpus)
            self.placement[name] = check
            launch.rec["placement_check"] = check
            if not check["verified"]:
                raise _Ended(name, PlacementError(check["reason"]))

    def _steps(self, client: httpx.Client) -> None:
        step_seconds: list[float] = []
        for step in range(-WARMUP_STEPS, self.session.config.warm_requests):
            if step >= 0 and self.deadline and step_seconds and self.deadline(max(step_seconds)):
                self.ended_by = "time"
                return
            t_step = time.monotonic()
            for position, arm in enumerate(step_order(self.arms, self.index, step)):
                self._request(client, arm, step, position, "warm")
            step_seconds.append(time.monotonic() - t_step)
            if step >= 0:
                self.steps += 1

    def _request(self, client: httpx.Client, arm: Allocator, step: int | None, position: int | None,
                 kind: str) -> None:
        launch = self.launches[arm.name]
        session = self.session
        session.request_tags = {"allocator": arm.name, "round": self.index, "set_index": self.index, "step": step,
                                "position": position}
        index = 0 if kind == "cold" else self.indices[arm.name]
        try:
            session.one_request(client, launch.server.base_url, launch.model, launch.k, index, kind, launch.t_ready,
                                alive=lambda: launch.server.check_serving("the measured requests"))
        except (ServerError, RequestError) as exc:
            raise _Ended(arm.name, exc) from exc
        if kind != "cold":  # spawn → first token is taken from the cold request as the server is shut down
            self.indices[arm.name] += 1

    def _fail(self, exc: Exception) -> None:
        """The set ends: the server at fault records its fault, the others that their set ended."""
        name, cause = (exc.arm, exc.cause) if isinstance(exc, _Ended) else (None, exc)
        at_fault = self.launches.get(name) if name else None
        if at_fault is not None:
            self.session.record_fault(at_fault, cause)
        self.status, self.failure = "failed", f"server {at_fault.k if at_fault else '?'} ({name}): {cause}"
        self.ended_by = ("verification" if isinstance(cause, (allocation.AllocatorMismatchError, PlacementError))
                         else "start" if at_fault is not None and at_fault.ready is None else "died")
        self.session.log(f"set {self.index + 1} failed, not counted: {self.failure}")

    def _close(self) -> bool:
        """Stops every server and appends its start-up record; True when a Ctrl-C came while they stopped."""
        signalled = False
        for arm in self.start_order:
            launch = self.launches[arm.name]
            if launch.rec.get("status") is None and launch.ready is not None and self.status != "interrupted":
                launch.rec.update(status="ok", failure=None)
            self.session.shut_down(launch)
            signalled = signalled or bool(launch.server.stop_signalled)
        return signalled

    def _write(self) -> ServeSet:
        servers = [{"server": launch.k, "allocator": name, "start_position": self.start_order.index(launch.arm),
                    "port": launch.server.port, "cpus": list(launch.runner.cpus) if launch.runner.cpus else None,
                    "pid": launch.rec.get("pid"), "status": launch.rec.get("status"),
                    "verified": bool((launch.rec.get("allocator_check") or {}).get("verified"))
                    and bool(self.placement.get(name, {}).get("verified")),
                    "failure": launch.rec.get("failure")} for name, launch in self.launches.items()]
        record = ServeSet(set_index=self.index, status=self.status, ended_by=self.ended_by, failure=self.failure,
                          steps=self.steps, started_at=self.started_at, wall_s=time.monotonic() - self.t0,
                          servers=servers)
        self.session.results.append_record(SETS_FILE, record)
        return record


class _Ended(Exception):
    """The fault of one server of a set (`arm`), which ends the set."""

    def __init__(self, arm: str, cause: Exception) -> None:
        super().__init__(str(cause))
        self.arm, self.cause = arm, cause


def counted_requests(sets: list[ServeSet], requests: list[ServeRequest]) -> list[ServeRequest]:
    """The measured warm requests of the sets that count (never a warm-up step, a failed set or a cold request)."""
    good = {s.set_index for s in sets if s.counted}
    return [r for r in requests if r.set_index in good and r.step is not None and r.step >= 0 and r.ok]


def run_sets(session: Any, arms: list[Allocator], rule: Any, build: dict[str, Any] | None) -> str | None:
    """Sets until `rule` ends them (allocation.FixedRounds: --cold-starts sets, or the duet's stopper); returns
    an error for the report when the first set failed at its start, else None."""
    sets: list[ServeSet] = []
    k, reason, error = 0, "max-runs", None
    session.log(memory_line(session.config, build))
    try:
        for index in rule.rounds():
            if not rule.may_start(1, []):
                session.log("the time is up (--max-time): the next set would likely end after it")
                reason = "time"
                break
            session.log(f"set {index + 1}: {', '.join(a.name for a in rotated(arms, index))} at once")
            record = ServeDuetSet(session, arms, index, k, build, _step_deadline(rule)).run()
            sets.append(record)
            k += len(arms)
            rule.unit_done(record.wall_s or 0.0)
            if len(sets) == 1 and record.status == "failed" and record.ended_by in ("start", "verification"):
                reason, error = "failed", f"the first set failed, so no other was started: {record.failure}"
                break
            if record.counted and rule.round_done(index, counted_requests(sets, session.requests)):
                return None
            if record.ended_by == "time":
                reason = "time"
                break
    except KeyboardInterrupt:
        rule.stop("interrupted", counted_requests(sets, session.requests))
        raise
    rule.stop(reason, counted_requests(sets, session.requests))
    return error


def _step_deadline(rule: Any) -> Callable[[float], bool] | None:
    remaining = getattr(rule, "remaining", None)
    if remaining is None or remaining() is None:
        return None
    return lambda step_s: remaining() < step_s
