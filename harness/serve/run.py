"""run_serve(config): fresh servers, the cold request then warm ones, the memory timeline, the report.

Results are appended as they arrive (requests.jsonl, startup.jsonl); on any fault the server is
stopped, the fault (exit code, log tail) goes into the report, and what was measured is kept.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from harness.containers import runner_choice
from harness.containers.runner_choice import RunnerChoice
from harness.errors import EXIT_FAULT, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, HarnessError, Interrupted, UsageError
from harness.measure import environment, lifetime
from harness.measure.allocators import Allocator
from harness.measure.records import ServeEnd, ServeRequest, StartupRecord
from harness.measure.results import ResultsDir
from harness.measure.signals import Shielded
from harness.measure.stopping import StopRule
from harness.serve import allocation, comparison, duet, duet_stats, engines, metrics, report, startup, timeline
from harness.serve.allocation import AllocatorMismatchError
from harness.serve.client import RequestError, RequestResult, plain_request, stream_request, transport_reason
from harness.serve.config import ServeConfig
from harness.serve.runners import LocalServers, Server, ServerRunner
from harness.serve.sampler import MemorySampler
from harness.serve.server import (
    Readiness,
    ServerDiedError,
    ServerError,
    WrongModelError,
    check_model,
    describe_exit,
    free_port,
    listener_pids,
    mapped_allocators,
    models_listed,
    process_facts,
)
from harness.serve.stacks import StackSampler

REQUESTS_FILE, STARTUP_FILE, CONFIG_FILE = report.REQUESTS_FILE, report.STARTUP_FILE, report.CONFIG_FILE
REQUEST_SCHEMA = report.REQUEST_SCHEMA

__all__ = ["EXIT_FAULT", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "ServeOutcome", "run_serve"]


@dataclass
class ServeOutcome:
    """How a serve run that measured ended: its exit code, the fault that ended it (None when it ran to its
    end), the report, and what was measured."""

    exit_code: int
    error: str | None = None
    report: Path | None = None
    requests: list[ServeRequest] = field(default_factory=list)
    startups: list[StartupRecord] = field(default_factory=list)

    def failure(self) -> HarnessError | None:
        """The error the command ends with (its line and exit code), or None when everything was measured."""
        if self.exit_code == EXIT_OK:
            return None
        if self.exit_code == EXIT_INTERRUPTED:
            return Interrupted(self.error or "interrupted (Ctrl-C / SIGTERM)")
        failed = [s for s in self.startups if not s.ok]
        return HarnessError(self.error or f"{len(failed)} of {len(self.startups)} servers failed and were not "
                                          "counted (listed above)")


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def listening_pid(url: str) -> int | None:
    """The local process listening on the URL's port (attach mode: its RSS is still sampled)."""
    parsed = urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    return min((pid for pid in listener_pids(parsed.port or 80) if pid is not None), default=None)


@dataclass
class Launch:
    """One fresh server as the session starts, measures and stops it, and the start-up record it writes."""

    k: int
    spec: engines.ServerSpec
    arm: Allocator | None
    server: Server
    runner: ServerRunner
    rec: dict[str, Any]
    t_spawn: float | None = None
    t_ready: float | None = None
    ready: Readiness | None = None
    model: str = ""
    profiler: StackSampler | None = None


class _Session:
    """State of one run_serve call."""

    def __init__(self, config: ServeConfig, results: ResultsDir, log: Callable[[str], None],
                 runner: ServerRunner) -> None:
        self.config = config
        self.runner = runner
        self.results = results
        self.log = log
        self.sampler = MemorySampler(hz=config.sample_hz, enabled=config.sampler)
        self.sampler.has_container = runner.has_container  # container memory, not a process tree's RSS
        self.requests: list[ServeRequest] = []
        self.startups: list[StartupRecord] = []
        self.body_extra = {"ignore_eos": True} if config.engine == "vllm" else None
        self.has_metrics = True  # switched off after the first scrape finds no TTFT histogram
        self.request_tags: dict[str, Any] = {"allocator": None}  # the arm of the server being measured
        self.failed_arms: dict[str, str] = {}  # allocator -> why its server did not run under it
        self.server_build: dict[str, Any] | None = None  # the vLLM build the servers run (CPU or CUDA)

    # --- requests -----------------------------------------------------------------------------
    def one_request(self, client: httpx.Client, base_url: str, model: str, server: int, index: int, kind: str,
                    ready_t: float | None, gap: float | None = None, alive: Callable[[], None] | None = None
                    ) -> dict[str, Any]:
        cfg = self.config
        label = f"s{server} {kind}{index if kind == 'warm' else ''}"
        label += f" {gap:g}s" if gap is not None else ""
        scrape = self.has_metrics and cfg.request_mode == "stream"
        before = metrics.scrape(client, base_url) if scrape else None
        if before is None:
            self.has_metrics = False
        started_at = _now_iso()
        t_start = self.sampler.mark(label, "request_start")
        record: dict[str, Any] = {
            "schema": REQUEST_SCHEMA, "server": server, "index": index, "kind": kind, "idle_gap_s": gap,
            "mode": cfg.request_mode, "engine": cfg.engine, "model": model, "max_tokens": cfg.max_tokens,
            "started_at": started_at, "t_start_s": t_start,
            "since_ready_s": None if ready_t is None else t_start - ready_t, **self.request_tags,
        }
        try:
            fn = stream_request if cfg.request_mode == "stream" else plain_request
            result: RequestResult = fn(client, base_url, model, cfg.prompt, cfg.max_tokens,
                                       extra=self.body_extra, deadline_s=cfg.request_timeout_s)
        except RequestError as exc:
            self.sampler.mark(label, "request_end")
            record.update(status="failed", failure=str(exc), failure_kind=exc.kind)
            self._append_request(record)
            if alive is not None:
                alive()  # raises ServerDiedError (exit code, health, its own error line) when it died
            raise
        record["t_end_s"] = self.sampler.mark(label, "request_end")
        after = metrics.scrape(client, base_url) if before is not None else None
        record.update(status="ok", failure=None, **{k: v for k, v in result.to_dict().items() if k != "text"},
                      text_head=result.text[:80], server_ttft_s=metrics.mean_delta(before, after))
        self._append_request(record)
        self.log(_request_line(record))
        return record

    def _append_request(self, record: dict[str, Any]) -> None:
        typed = ServeRequest.load(record)  # the record as built, through the model (its keys, in their order)
        self.results.append_record(REQUESTS_FILE, typed)
        self.requests.append(typed)

    def request_sequence(self, base_url: str, model: str, server: int, ready_t: float | None,
                         alive: Callable[[], None] | None = None) -> float | None:
        """Cold, warm 1..M, then one request after each idle gap. Returns the cold TTFT/wall."""
        cfg = self.config
        first = None
        with httpx.Client(timeout=cfg.request_timeout_s) as client:
            cold = self.one_request(client, base_url, model, server, 0, "cold", ready_t, alive=alive)
            first = cold.get("ttft_s") or cold.get("wall_s")
            for i in range(1, cfg.warm_requests + 1):
                self.one_request(client, base_url, model, server, i, "warm", ready_t, alive=alive)
            for j, gap in enumerate(cfg.idle_gaps):
                self.sampler.mark(f"s{server} idle {gap:g}s", "event")
                time.sleep(gap)
                self.one_request(client, base_url, model, server, cfg.warm_requests + 1 + j, "idle", ready_t,
                                 gap=gap, alive=alive)
        return first

    # --- one fresh server ---------------------------------------------------------------------
    def cold_start(self, k: int, spec: engines.ServerSpec, arm: Allocator | None = None,
                   round_: int | None = None, position: int | None = None) -> None:
        """One fresh server: start, ready, (its allocator checked,) the request sequence, stop. Appends its
        start-up record whatever happens; raises ServerError / RequestError after recording a fault."""
        launch = self.new_server(k, spec, arm, round_, position)
        self.request_tags = {"allocator": launch.rec["allocator"], **({"round": round_} if arm is not None else {})}
        try:
            self.spawn(launch)
            self.await_ready(launch)
            self.request_sequence(launch.server.base_url, launch.model, k, launch.t_ready,
                                  alive=lambda: launch.server.check_serving("the measured requests"))
            launch.rec.update(status="ok", failure=None)
        except (ServerError, RequestError) as exc:
            self.record_fault(launch, exc)
            raise
        except KeyboardInterrupt:  # Ctrl-C / SIGTERM: what this server measured so far is still its own
            launch.rec.update(status="interrupted", failure="interrupted (Ctrl-C / SIGTERM)", fault="Interrupted")
            raise
        finally:
            self.shut_down(launch)
        if launch.server.stop_signalled:  # Ctrl-C / SIGTERM while a finished server was stopped: stop here
            raise KeyboardInterrupt

    def new_server(self, k: int, spec: engines.ServerSpec, arm: Allocator | None, round_: int | None = None,
                   position: int | None = None, runner: ServerRunner | None = None) -> Launch:
        """Server k, not started yet, and the start-up record it will write (`runner`: another than the
        session's, as the duet design's, which places each server of a set)."""
        cfg = self.config
        runner = runner or self.runner
        server = runner.server(k, spec, arm, self.results.path(f"serve/server-{k}.log"))
        rec: dict[str, Any] = {"schema": "serve-startup/1", "server": k, "engine": cfg.engine,
                               "runner": cfg.runner, "argv": spec.argv, "started_at": _now_iso(),
                               "log": f"serve/server-{k}.log", "allocator": arm.name if arm else None}
        if arm is not None:
            rec.update(round=round_, position=position, allocator_library=arm.library, allocator_env=arm.env)
        return Launch(k, spec, arm, server, runner, rec)

    def spawn(self, launch: Launch) -> None:
        """Starts the server (in the calling thread: the server dies with it) and, if asked, its stack sampler."""
        cfg, k, arm, server = self.config, launch.k, launch.arm, launch.server
        under = f" under {arm.name}" if arm is not None else ""
        self.log(f"server {k}: starting {cfg.engine}{under}{launch.runner.where(arm)} on "
                 f"{cfg.host}:{getattr(server, 'port', cfg.port)}")
        launch.t_spawn = self.sampler.mark(f"s{k} spawn", "spawn")
        server.start()
        launch.rec["pid"] = server.pid
        launch.runner.started(server, launch.rec, self.sampler)
        if cfg.profile_startup and server.pid:
            launch.profiler = StackSampler(server.pid, server.t_spawn, self.results.path(startup.stacks_file(k)),
                                           hz=cfg.stack_hz).start()
            if launch.profiler.reason:
                self.log(f"server {k}: no start-up stacks: {launch.profiler.reason}")

    def await_ready(self, launch: Launch) -> None:
        """/health 200 and /v1/models, what the tree maps, and (in a comparison) its allocator checked."""
        k, server, rec = launch.k, launch.server, launch.rec
        launch.ready = ready = server.wait_ready(self.config.health_timeout_s, launch.spec.served_model)
        launch.t_ready = self.sampler.mark(f"s{k} ready", "ready")
        self._stop_profiler(launch.profiler, k)
        launch.model = launch.spec.served_model or ready.models[0]
        pids = server.pids()
        maps = mapped_allocators(pids)
        rec.update(spawn_to_health_s=ready.health_s, spawn_to_models_s=ready.models_s,
                   models=ready.models, allocators_mapped=maps, processes=process_facts(pids),
                   server_preload=self.config.server_preload,
                   preload_verified=preload_verified(self.config.server_preload, maps))
        self.log(f"server {k}: /health 200 after {ready.health_s:.1f} s")
        if launch.arm is not None:
            self._check_allocator(k, launch.arm, server, pids, rec)

    def record_fault(self, launch: Launch, exc: Exception) -> None:
        """The fault that ended the server's measurement, into its start-up record."""
        rec = launch.rec
        if isinstance(exc, ServerError):
            rec.update(status="failed", failure=str(exc), exit_code=exc.server_exit_code,
                       exit=describe_exit(exc.server_exit_code) if exc.server_exit_code is not None else None,
                       log_tail=exc.log_tail, fault=type(exc).__name__)
        elif isinstance(exc, RequestError):
            rec.update(status="failed", failure=str(exc), fault=exc.kind, log_tail=launch.server.log_tail(15))

    def shut_down(self, launch: Launch) -> None:
        """Stops the server and appends its start-up record, with the analysis of its log."""
        cfg, k, server, rec, ready = self.config, launch.k, launch.server, launch.rec, launch.ready
        profiler = launch.profiler
        self._stop_profiler(profiler, k)
        first = self._first_token_s(k, launch.t_spawn)
        if first is not None:  # measured by its cold request, however the server's sequence ended
            rec["spawn_to_first_token_s"] = first
        t_stop = self.sampler.mark(f"s{k} stop", "stop")  # the serving window ends when the stop is asked
        server.stop(log=self.log)
        if launch.t_spawn is not None:
            rec["memory_peaks"] = timeline.peaks(self.sampler.rows, launch.t_spawn, t_stop)
        new_caches = launch.runner.finished(server, rec, self.sampler)  # started with empty compile caches
        rec.setdefault("exit_code", server.exit_code)
        rec["stopped_exit"] = describe_exit(server.exit_code)
        samples = startup.stacks.load(self.results.root / startup.stacks_file(k)) if profiler else []
        analysis = startup.analyse(server.lines, ready.health_s if ready else server.since_spawn(), samples,
                                   profiler.reason if profiler else "not asked for (--profile-startup)")
        vllm_cache = cfg.compile_cache if cfg.engine == "vllm" else None
        rec.update(analysis, compile_cache={"mode": vllm_cache, "use": analysis.pop("compile_cache_use"),
                                            "triton": ("fresh" if new_caches else "shared") if vllm_cache
                                            else None})
        typed = StartupRecord.load(rec)  # the record as built, through the model
        self.results.append_record(STARTUP_FILE, typed)
        self.startups.append(typed)

    def _first_token_s(self, k: int, t_spawn: float | None) -> float | None:
        """Spawn → first token of server `k`: from its cold request, once that was measured."""
        cold = next((r for r in self.requests if r.server == k and r.kind == "cold" and r.status == "ok"), None)
        first = (cold.ttft_s or cold.wall_s) if cold is not None else None
        return None if t_spawn is None or first is None else cold.t_start_s - t_spawn + first

    def _check_allocator(self, k: int, arm: Allocator, server: Server, pids: list[int],
                         rec: dict[str, Any]) -> None:
        """Raises AllocatorMismatchError (the server is then stopped, recorded failed and never counted)
        unless every serving process of the tree runs under `arm`."""
        check = allocation.check_server(arm, pids, server.pid, server.lines, self.config.engine,
                                        host_pids_in_log=self.runner.host_pids_in_log)
        rec["allocator_check"] = check
        if not check["verified"]:
            raise AllocatorMismatchError(check["reason"])
        roles = sorted({p["role"] for p in check["processes"] if p.get("verified")})
        self.log(f"server {k}: {arm.name} verified in {', '.join(roles)} (/proc/PID/maps)")

    def compare_allocators(self, spec: engines.ServerSpec, arms: list[Allocator],
                           rule: allocation.FixedRounds | comparison.ServeStopper) -> str | None:
        """Rounds of one fresh server per arm, order rotated each round, until `rule` ends them (it records
        why, Ctrl-C included). A server that fails is recorded and the next one starts; an arm whose server
        ran under another allocator is left out of later rounds (its launcher does the same every time).
        Returns why the comparison ended early as an error for the report, or None."""
        try:
            reason, error = self._compare_rounds(spec, arms, rule)
        except KeyboardInterrupt:
            rule.stop("interrupted", self.startups)
            raise
        if reason:
            rule.stop(reason, self.startups)
        return error

    def _compare_rounds(self, spec: engines.ServerSpec, arms: list[Allocator],
                        rule: allocation.FixedRounds | comparison.ServeStopper) -> tuple[str | None, str | None]:
        """(the stop reason for `rule`, or None where it recorded the stop itself; an error, or None)."""
        k = 0
        for r in rule.rounds():
            order = [arm for arm in allocation.rotated(arms, r) if arm.name not in self.failed_arms]
            baseline = self.config.baseline
            if not order or (baseline in self.failed_arms and len(arms) > 1):
                return "failed", (f"the baseline {baseline} is left out, so there are no ratios to measure: "
                                  if order else "no allocator arm is left: ") + "; ".join(self.failed_arms.values())
            self.log(f"round {r + 1}: {', '.join(arm.name for arm in order)}")
            for i, arm in enumerate(order):
                if not rule.may_start(len(order) - i, self.startups):
                    self.log("the time is up (--max-time): the next server would likely end after it")
                    return "time", None
                t0 = time.perf_counter()
                try:
                    self.cold_start(k, allocation.arm_spec(spec, arm, self.config.runner), arm, r, i)
                except AllocatorMismatchError as exc:
                    self.failed_arms[arm.name] = str(exc)
                    self.log(f"server {k}: {exc}; not counted, and {arm.name} is left out of later rounds")
                except (ServerError, RequestError) as exc:
                    self.log(f"server {k} ({arm.name}) failed, not counted: {_fault_line(exc)}")
                rule.unit_done(time.perf_counter() - t0)
                k += 1
            if r == 0 and not any(s.ok for s in self.startups):
                return "failed", "every server of the first round failed: " + "; ".join(
                    sorted({s.failure or "?" for s in self.startups}))
            if rule.round_done(r, self.startups):
                return None, None
        return "max-runs", None

    def stopping_rule(self, arms: list[Allocator]) -> allocation.FixedRounds | comparison.ServeStopper:
        """--cold-starts rounds, or harness alloc's open-ended rule (--target-ci / --max-time)."""
        cfg = self.config
        if not cfg.open_ended:
            return allocation.FixedRounds(cfg.cold_starts)
        rule = StopRule(target=cfg.target_ci, metric=cfg.metric, max_time_s=cfg.max_time_s,
                        min_rounds=cfg.cold_starts, max_rounds=cfg.max_rounds)

        def on_check(check: dict[str, Any]) -> None:
            widest = check["widest"]
            width = "no CI yet" if math.isnan(widest) else f"widest ratio CI ±{widest * 100:.1f} %"
            self.log(f"round {check['round'] + 1}: {width} on {check['metric']} "
                     f"(target ±{check['target'] * 100:g} %)")

        assert cfg.baseline is not None
        return comparison.ServeStopper(rule, self.results, [a.name for a in arms], cfg.baseline, self.requests,
                                       on_check=on_check)

    def compare_duet(self, arms: list[Allocator]) -> str | None:
        """Sets of one server per arm up at once, warm requests alternating (harness.serve.duet)."""
        cfg = self.config
        rule: allocation.FixedRounds | duet_stats.DuetServeStopper = allocation.FixedRounds(cfg.cold_starts)
        if cfg.open_ended:
            assert cfg.baseline is not None
            stop = StopRule(target=cfg.target_ci, metric=cfg.metric, max_time_s=cfg.max_time_s,
                            min_rounds=cfg.cold_starts, max_rounds=cfg.max_rounds)
            rule = duet_stats.DuetServeStopper(stop, self.results, [a.name for a in arms], cfg.baseline,
                                               self.requests, on_check=duet_stats.on_check_line(self.log))
        return duet.run_sets(self, arms, rule, self.server_build)

    def _stop_profiler(self, profiler: StackSampler | None, k: int) -> None:
        if profiler is None or not profiler.running:
            return
        profiler.stop()
        self.log(f"server {k}: {profiler.samples} stack samples" if not profiler.reason
                 else f"server {k}: no start-up stacks: {profiler.reason}")

    def attach(self) -> None:
        cfg = self.config
        assert cfg.url is not None
        base_url = cfg.url.rstrip("/")
        self.sampler.set_root(listening_pid(base_url))
        expected = cfg.served_model_name or cfg.model
        try:
            with httpx.Client(timeout=10.0) as client:
                r = client.get(base_url + "/v1/models")
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach {base_url}: {transport_reason(exc)}") from exc
        if r.status_code != 200:
            raise ServerError(f"{base_url}/v1/models answered HTTP {r.status_code}")
        models = models_listed(r, base_url + "/v1/models")
        check_model(expected, models)
        self.sampler.mark("attached", "ready")
        self.request_sequence(base_url, expected, 0, self.sampler.now())

    def finish(self, error: str | None) -> Path:
        """Saves the timeline and how the run ended, then writes the report from disk, as `harness report`."""
        snapshot = timeline.from_sampler(self.sampler)
        timeline.save(self.results, snapshot)
        self.results.write_record(report.END_FILE, ServeEnd(stopped_early=error))
        return report.rebuild(self.results)


def preload_verified(lib: str | None, maps: dict[str, list[str]]) -> bool | None:
    """Whether every process of the server tree maps the preloaded library (None: nothing asked)."""
    if not lib:
        return None
    real = os.path.realpath(lib)
    return bool(maps) and all(real in libs or lib in libs for libs in maps.values())


def _request_line(r: dict[str, Any]) -> str:
    name = f"s{r['server']} {r['kind']}{r['index'] if r['kind'] == 'warm' else ''}"
    if r.get("ttft_s") is not None:
        srv = f" (server {r['server_ttft_s'] * 1e3:.1f} ms)" if r.get("server_ttft_s") is not None else ""
        return (f"  {name:<10} TTFT {r['ttft_s'] * 1e3:8.1f} ms{srv}  E2E {r['e2e_s'] * 1e3:8.1f} ms  "
                f"tokens {r.get('completion_tokens')}")
    return f"  {name:<10} wall {r['wall_s'] * 1e3:8.1f} ms  tokens {r.get('completion_tokens')}"


def choose_runner(config: ServeConfig) -> RunnerChoice:
    """The server runner for config.runner (containers.runner_choice decides, as for alloc's probes)."""
    host_libraries = config.runner == "auto" and (config.allocator_lib or config.server_preload)
    local_only = ("attached to a running server (--url): nothing is started" if config.attach
                  else f"the docker runner serves --engine vllm only, not {config.engine}" if config.engine != "vllm"
                  else "--allocator-lib or --server-preload names libraries of this host" if host_libraries
                  else "the duet design (--design duet) runs its servers locally for now" if config.design == "duet"
                  else None)

    def docker_usable() -> tuple[bool, str]:
        from harness.serve import docker_setup

        return docker_setup.docker_usable(config)

    return runner_choice.choose_runner(config.runner, docker_usable, local_only)


def run_serve(config: ServeConfig, log: Callable[[str], None] = _stderr) -> ServeOutcome:
    """Runs the serve experiment. Raises UsageError (ConfigError, ResultsError) for unusable options, before
    anything is started, and Interrupted when Ctrl-C / SIGTERM stops the preparation. Once servers run, every
    fault is measured data: exit_code 0: all measured; 1: a fault (partial results kept, the report says
    which); 130: interrupted. `ServeOutcome.failure()` is the error the command then ends with."""
    requested = config.runner
    config.validate()
    choice = choose_runner(config)
    config = dataclasses.replace(config, runner=choice.kind)
    if config.port is None and not config.attach:  # a free port: no other server answers in this run's place
        config = dataclasses.replace(config, port=free_port(config.host))
    results = ResultsDir(config.out)
    results.check_room()  # before anything is built (a synthetic model is written to disk) or created
    spec = None if config.attach else engines.build(config, choice.kind)
    results.lock()  # another command writing the same directory would mix two runs' results
    if requested == "auto" and not config.attach:  # said once the command line proved usable
        log(choice.line())
    for left in lifetime.leftovers():  # what a harness killed hard left running (it may hold memory or a port)
        log(f"warning: still running: {left.describe()}; stop it with `kill -9 {left.pid}`")
    try:
        return _prepare_and_run(config, results, spec, log,
                                {"runner_requested": requested, "runner_reason": choice.why})
    finally:
        results.unlock()


def _prepare_and_run(config: ServeConfig, results: ResultsDir, spec: engines.ServerSpec | None,
                     log: Callable[[str], None], runner_info: dict[str, str]) -> ServeOutcome:
    _set_aside_unfinished(results, log)
    try:
        runner = _server_runner(config, log)
    except KeyboardInterrupt:
        raise Interrupted("interrupted while preparing the vLLM image: nothing was started") from None
    try:
        arms = runner.arms(config) if config.allocators else []  # the library each arm's servers preload
    except HarnessError:
        runner.close()
        raise
    info: dict[str, Any] = dict(runner_info)
    if arms:
        info["allocator_arms"] = [arm.to_dict() for arm in arms]
    try:
        return _run(config, results, spec, runner, log, info, arms)
    finally:
        runner.close()


def _set_aside_unfinished(results: ResultsDir, log: Callable[[str], None]) -> None:
    """An --out whose serve part holds a completed server is refused with what to do; one that holds only
    servers that never completed (a failed start, a killed or interrupted run) is kept beside it, as
    serve.attempt-N, and this run starts afresh."""
    held = results.root / "serve"
    if not (results.read_jsonl(REQUESTS_FILE) or results.read_jsonl(STARTUP_FILE)):
        return
    completed = sum(1 for s in results.read_records(STARTUP_FILE, StartupRecord) if s.ok)
    if completed:
        raise UsageError(f"{held} already holds the serve results of {completed} completed server"
                         f"{'s' if completed > 1 else ''}: choose another --out (a serve run cannot be continued)")
    n = 1
    while (results.root / f"serve.attempt-{n}").exists():
        n += 1
    kept = results.root / f"serve.attempt-{n}"
    held.rename(kept)
    log(f"{held} held no completed server (a failed start or a killed run): kept as {kept}; starting afresh")


def _server_runner(config: ServeConfig, log: Callable[[str], None]) -> ServerRunner:
    """The runner config.runner names (auto is decided by now); the docker one connects, clears stopped
    leftovers and builds or pulls the image first."""
    if config.runner != "docker":
        return LocalServers(config)
    from harness.serve import docker_setup

    return docker_setup.prepare(config, log)


def _run(config: ServeConfig, results: ResultsDir, spec: engines.ServerSpec | None,
         runner: ServerRunner, log: Callable[[str], None],
         runner_info: dict[str, Any], arms: list[Allocator]) -> ServeOutcome:
    results.write_json(CONFIG_FILE, {**config.to_dict(), **runner_info})
    extra: dict[str, Any] = {"serve_engine": config.engine, "serve_runner": config.runner,
                             **{k: v for k, v in runner_info.items() if k != "allocator_arms"}}
    extra.update(runner.environment(log))
    results.write_record("serve/environment.json", environment.collect(extra))
    session = _Session(config, results, log, runner)
    session.server_build = extra.get("server_vllm")
    error = None
    code = EXIT_OK
    session.sampler.start()
    try:
        if spec is None:
            session.attach()
        elif arms and config.design == "duet":
            error = session.compare_duet(arms)
        elif arms:
            error = session.compare_allocators(spec, arms, session.stopping_rule(arms))
        else:
            for k in range(config.cold_starts):
                session.cold_start(k, spec)
    except (ServerError, RequestError) as exc:
        error = _fault_line(exc)
        code = EXIT_FAULT
    except KeyboardInterrupt:
        error = "interrupted (Ctrl-C / SIGTERM); measured requests kept"
        code = EXIT_INTERRUPTED
    finally:
        session.sampler.stop()
    with Shielded(log, "writing the report first") as shield:
        path = session.finish(error)
    if shield.signalled and code == EXIT_OK:
        error, code = "interrupted (Ctrl-C / SIGTERM) while the report was written", EXIT_INTERRUPTED
    failed = [s for s in session.startups if not s.ok]
    if error:
        code = code or EXIT_FAULT
    elif failed and arms:  # a comparison goes on past a failed server; the command still says so
        for reason in sorted({s.failure or "unknown" for s in failed}):
            log(f"failed server, not counted: {reason}")
        code = EXIT_FAULT
    log(f"wrote {path}")
    return ServeOutcome(code, error, path, session.requests, session.startups)


def _fault_line(exc: Exception) -> str:
    if isinstance(exc, ServerDiedError):
        return f"{exc} — see the log tail in the report"
    if isinstance(exc, WrongModelError):
        return f"wrong model name: {exc}"
    return str(exc)
