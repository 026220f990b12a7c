"""Experiment A: the same generation under several allocators, interleaved, every run verified."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from harness.alloc.runners.base import Placement, ProbeOutcome, ProbeRequest, Runner, format_cpu_list
from harness.measure.allocators import KNOWN, Allocator
from harness.measure.records import AllocRun, Environment
from harness.measure.results import ResultsDir, ResultsError

RUNS_FILE = "alloc/runs.jsonl"
CONFIG_FILE = "alloc/config.json"

DEFAULT_WARM_GENS = 3  # measured warm generates per run, when the window is a count
DEFAULT_MEASURE_S = 25.0  # the measured window in seconds of generation, when a target or a time limit is set
WARMUP_MEASURE_S = 1.0  # a warm-up run's window, at most: it is not counted, only warms caches
METRICS = {"itl_p25": "itl_p25_s", "gen_latency": "gen_latency_s"}  # --metric → the per-run value compared
DEFAULT_METRIC = "itl_p25"
DESIGNS = ("duet", "sequential")
CPU_PLACEMENTS = ("split", "shared")
DEFAULT_DESIGN = "duet"  # its A/A passed on this project's 2-core host and on the lent H200
DEFAULT_SETS = 3  # duet: sets of fresh processes (with a target or a time limit: the sets before the first check)
DEFAULT_WINDOWS_PER_SET = 40  # duet: measured steps per set, one window per arm each
DEFAULT_WINDOW_GENS = 1  # duet: a window's generates, unless its window is given in seconds (--measure-s)
CALIBRATION_SUFFIX = "#2"  # the second arm of an A/A calibration: the baseline again, labelled apart


@dataclass(frozen=True)
class Arm:
    """One arm of a comparison: a label (unique in the experiment) and the allocator it runs."""

    label: str
    allocator: Allocator


@dataclass(frozen=True)
class AllocConfig:
    model: str
    device: str
    allocators: list[Allocator]
    runs: int
    warm_gens: int
    max_new_tokens: int
    warmup_runs: int = 1
    dtype: str = "auto"
    threads: int = 0
    seed: int = 0
    timeout_s: float = 1800.0
    runner: str = "local"
    paired: bool = False  # each candidate run alongside a baseline run, on the other half of the host
    placements: list[Placement] = field(default_factory=list)  # paired: the two halves (GPU, CPUs)
    affinity: tuple[int, ...] | None = None  # sequential: every probe pinned to these CPUs (pyperf's --affinity)
    measure_s: float | None = None  # the measured window in seconds of generation (replaces warm_gens)
    target_ci: float | None = None  # open-ended: stop once every ratio CI's half-width is this fraction or less
    metric: str = DEFAULT_METRIC  # the per-run value target_ci applies to (a key of METRICS)
    design: str = "sequential"  # sequential: one fresh process per run; duet: persistent probes, windows
    sets: int = DEFAULT_SETS  # duet
    windows_per_set: int = DEFAULT_WINDOWS_PER_SET  # duet: measured steps per set
    window_gens: int | None = None  # duet: a window of this many generates, or
    window_s: float | None = None  # duet: a window of this many seconds of generation
    calibration: bool = False  # A/A: the baseline against itself, in two arms labelled apart
    cpu_placement: str = "split"  # duet: split (each arm its own CPUs, rotated) or shared (every arm all of them)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def arms(self) -> list[Arm]:
        """The arms compared: one per allocator, or the baseline twice for an A/A calibration."""
        if self.calibration:
            base = self.baseline
            return [Arm(base.name, base), Arm(base.name + CALIBRATION_SUFFIX, base)]
        return [Arm(a.name, a) for a in self.allocators]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["allocators"] = [a.to_dict() for a in self.allocators]
        d["baseline"] = self.baseline.name
        d["arms"] = [a.label for a in self.arms]
        return d

    def identity(self) -> dict[str, Any]:
        """The fields a resumed directory must share with the one it continues."""
        ident = {"model": self.model, "device": self.device, "allocators": [a.name for a in self.allocators],
                 "warm_gens": self.warm_gens, "max_new_tokens": self.max_new_tokens, "dtype": self.dtype}
        if self.paired:
            ident["paired"] = True
        if self.affinity:
            ident["affinity"] = list(self.affinity)
        if self.measure_s is not None:  # a window in seconds: the count of generates varies, the window not
            del ident["warm_gens"]
            ident["measure_s"] = self.measure_s
        if self.design == "duet":
            for key in ("warm_gens", "measure_s"):
                ident.pop(key, None)
            ident.update(design="duet", window_gens=self.window_gens, window_s=self.window_s,
                         windows_per_set=self.windows_per_set, arms=[a.label for a in self.arms],
                         cpu_placement=self.cpu_placement)
        return ident

    def placement(self, run: PlannedRun) -> Placement | None:
        """Where `run` may run: its half of the host (paired), the --affinity CPUs, or anywhere."""
        if run.slot is not None:
            return self.placements[run.slot]
        if self.affinity:
            return Placement(cpus=self.affinity)
        return None

    @property
    def baseline(self) -> Allocator:
        """glibc when it is measured, else the first allocator: every ratio is against it."""
        return next((a for a in self.allocators if a.name == "glibc"), self.allocators[0])


@dataclass(frozen=True)
class PlannedRun:
    round: int  # negative rounds are warm-up rounds, not counted
    position: int
    allocator: Allocator
    pair: str | None = None  # paired design: the candidate of the pair this run belongs to
    slot: int | None = None  # paired design: the half of the host (placement) this run gets

    @property
    def warmup(self) -> bool:
        return self.round < 0

    @property
    def key(self) -> tuple[int, str, str | None]:
        return (self.round, self.allocator.name, self.pair)


def plan(config: AllocConfig) -> list[PlannedRun]:
    """Warm-up rounds first, then measured rounds; the order rotates every round so drift
    (thermal, page cache, background load) hits each allocator equally."""
    return [run for r in range(-config.warmup_runs, config.runs) for run in round_runs(config, r)]


def round_runs(config: AllocConfig, r: int) -> list[PlannedRun]:
    """The runs of round `r`, in order.

    Paired design: every candidate runs at the same time as a baseline run, each on its own half of
    the host, so a slow stretch of a shared host hits both; the halves swap every round."""
    if config.paired:
        base = config.baseline
        candidates = [a for a in config.allocators if a.name != base.name]
        shift = r % len(candidates)
        runs = []
        for j, cand in enumerate(candidates[shift:] + candidates[:shift]):
            side = (r + candidates.index(cand)) % 2
            runs.append(PlannedRun(r, 2 * j, base, pair=cand.name, slot=side))
            runs.append(PlannedRun(r, 2 * j + 1, cand, pair=cand.name, slot=1 - side))
        return runs
    shift = r % len(config.allocators)
    order = config.allocators[shift:] + config.allocators[:shift]
    return [PlannedRun(r, i, a) for i, a in enumerate(order)]


def round_units(config: AllocConfig, r: int) -> list[list[PlannedRun]]:
    """What runs at one time in round `r`: single runs, or the two runs of a pair."""
    runs = round_runs(config, r)
    size = 2 if config.paired else 1
    return [runs[i:i + size] for i in range(0, len(runs), size)]


def measured_seconds(probe: dict[str, Any] | None) -> float | None:
    """Seconds of measured generation in a run: its warm generates, else its cold one."""
    if not probe:
        return None
    if probe.get("measured_s") is not None:
        return probe["measured_s"]
    gens = probe.get("warm") or ([probe["cold"]] if probe.get("cold") else [])
    return sum(g["latency_s"] for g in gens) if gens else None


def verify(allocator: Allocator, probe: dict[str, Any], placement: Placement | None = None) -> str | None:
    """None when the probe's process really used `allocator` (and ran only on the CPUs it was pinned to);
    otherwise the reason it did not."""
    if placement and placement.cpus and probe.get("cpu_affinity") != sorted(placement.cpus):
        return (f"pinned to CPUs {format_cpu_list(placement.cpus)}, but the probe process was allowed "
                f"{format_cpu_list(probe.get('cpu_affinity') or [])}")
    loaded = probe.get("allocator") or {}
    got = loaded.get("name")
    lib = loaded.get("malloc_library")
    if allocator.name == "glibc":
        if got != "glibc":
            return f"expected glibc malloc, but malloc resolved to {lib} ({got})"
        return None
    wanted = {allocator.library, os.path.realpath(allocator.library or "")}
    # A name of the harness's own (jemalloc, ...) must also be what the library is; any other name
    # (--allocator-lib jebg=...) is verified by the library it was given alone.
    if (allocator.name in KNOWN and got != allocator.name) or not lib or os.path.realpath(lib) not in wanted:
        return (f"{allocator.name} library {allocator.library} was not loaded: malloc resolved to {lib} "
                f"(LD_PRELOAD={loaded.get('ld_preload')!r})")
    return None


def build_record(config: AllocConfig, run: PlannedRun, run_index: int, started_at: str,
                 outcome: ProbeOutcome, runner_name: str, environment: str | None = None) -> AllocRun:
    """The run's record; `environment`: the environment file its invocation wrote (which host ran it)."""
    probe = outcome.probe
    failure = outcome.error
    placement = config.placement(run)
    if probe is not None and failure is None:
        failure = verify(run.allocator, probe, placement)
    ok = probe is not None and failure is None
    gpu = (probe or {}).get("gpu") or {}
    container = outcome.container or {}
    measured_s = measured_seconds(probe)
    return AllocRun(**{
        "run_index": run_index,
        "round": run.round,
        "position": run.position,
        "pair": run.pair,
        "slot": run.slot,
        "placement": placement.to_dict() if placement else None,
        "concurrent_with": None,  # paired design: run_index of the run it ran beside
        "warmup": run.warmup,
        "allocator": run.allocator.name,
        "requested_library": run.allocator.library,
        "allocator_env": run.allocator.env,
        "runner": runner_name,
        "environment": environment,
        "model": config.model,
        "device": (probe or {}).get("device", config.device),
        "started_at": started_at,
        "status": "ok" if ok else "failed",
        "failure": failure,
        "verified": ok,
        "loaded_allocator": (probe or {}).get("allocator"),
        "exit_code": outcome.exit_code,
        "wall_real_s": outcome.wall_real_s,
        "gen_latency_s": (probe or {}).get("gen_latency_s"),
        "cold_latency_s": ((probe or {}).get("cold") or {}).get("latency_s"),
        "ttft_s": (probe or {}).get("ttft_s"),
        "tpot_s": (probe or {}).get("tpot_s"),
        "itl_p25_s": (probe or {}).get("itl_p25_s"),
        "itl_p50_s": (probe or {}).get("itl_p50_s"),
        "steal_pct": ((probe or {}).get("contention") or {}).get("steal_pct"),
        "involuntary_switches": ((probe or {}).get("contention") or {}).get("involuntary_switches"),
        "noise": (probe or {}).get("noise"),  # page faults, GPU clocks and throttle reasons, CPU frequency
        "measured_s": measured_s,
        "measured_share": measured_s / outcome.wall_real_s if measured_s and outcome.wall_real_s else None,
        "load_s": (probe or {}).get("load_s"),
        "import_s": (probe or {}).get("import_s"),
        "rss_mb": (probe or {}).get("peak_rss_mb"),
        "parent_maxrss_mb": outcome.parent_maxrss_mb,
        "gpu_peak_allocated_mb": gpu.get("peak_allocated_mb"),
        "gpu_peak_reserved_mb": gpu.get("peak_reserved_mb"),
        "container_peak_mb": container.get("peak_mb"),
        "container_working_set_peak_mb": container.get("working_set_peak_mb"),
        "container": outcome.container,
        "log_tail": outcome.log_tail,
        "probe": probe,
    })


def prepare_dir(results: ResultsDir, config: AllocConfig, resume: bool, held: str = RUNS_FILE,
                cls: type = AllocRun) -> list[Any]:
    """Checks the directory and returns the records of `held` already there (resume) or none."""
    results.ensure_writable()
    existing = results.read_records(held, cls)
    if existing and not resume:
        raise ResultsError(f"{results.root / held} already holds {len(existing)} records: "
                           "pass --resume to continue it or choose another --out")
    if resume:
        saved = results.read_json(CONFIG_FILE)
        if saved is None:
            raise ResultsError(f"nothing to resume in {results.root}: no {CONFIG_FILE}")
        if saved.get("identity") != config.identity():
            raise ResultsError(f"--resume with different settings than {results.root / CONFIG_FILE}: "
                               + identity_changes(saved.get("identity") or {}, config.identity()))
    results.write_json(CONFIG_FILE, {"identity": config.identity(), "config": config.to_dict()})
    return existing


def identity_changes(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """'warm_gens: 3 in the experiment, 2 now; ...' for every identity field that differs."""
    def show(value: Any) -> str:
        if value is None:
            return "not set"
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    keys = [k for k in {**saved, **now} if saved.get(k) != now.get(k)]
    return "; ".join(f"{k}: {show(saved.get(k))} in the experiment, {show(now.get(k))} now" for k in keys)


def environment_file(results: ResultsDir, resume: bool) -> str:
    """environment.json, or environment.resume-N.json when a resumed run may be on another host."""
    if not resume or not (results.root / "environment.json").exists():
        return "environment.json"
    n = 1
    while (results.root / f"environment.resume-{n}.json").exists():
        n += 1
    return f"environment.resume-{n}.json"


def execute(config: AllocConfig, runner: Runner, results: ResultsDir, resume: bool = False,
            environment: Environment | None = None,
            on_run: Callable[[PlannedRun, AllocRun], None] | None = None,
            on_start: Callable[[PlannedRun], None] | None = None,
            stopper: Any = None) -> list[AllocRun]:
    """Runs what is left of the plan, appending each record as it finishes. Returns all records.
    `environment` is written only once the directory is accepted, so a refused invocation leaves the
    experiment's own environment files as they were.

    Without `stopper` the plan is fixed (--runs rounds). With one (harness.stopping.Stopper) rounds go on
    until it stops them: it holds back a run that would likely end after the deadline and checks the
    precision after each measured round; every stop, Ctrl-C included, is recorded."""
    records = prepare_dir(results, config, resume)
    env_file = None
    if environment is not None:
        env_file = environment_file(results, resume)
        results.write_record(env_file, environment)
    hooks = _Hooks(on_run, on_start, env_file)
    if stopper is None:
        for r in range(-config.warmup_runs, config.runs):
            if not _run_round(config, runner, results, records, r, hooks):
                break
        return records
    try:
        reason = _run_open_ended(config, runner, results, records, stopper, hooks)
    except BaseException as exc:
        stopper.stop("interrupted" if isinstance(exc, KeyboardInterrupt) else "error", records)
        raise
    if reason:
        stopper.stop(reason, records)
    return records


@dataclass(frozen=True)
class _Hooks:
    """What a round calls as its runs start and end, and the environment file its records name."""

    on_run: Callable[[PlannedRun, AllocRun], None] | None = None
    on_start: Callable[[PlannedRun], None] | None = None
    environment: str | None = None


def _run_open_ended(config: AllocConfig, runner: Runner, results: ResultsDir, records: list[AllocRun],
                    stopper: Any, hooks: _Hooks) -> str | None:
    """Rounds until the stopper stops them; the stop reason, or None where the stopper recorded it itself."""
    done = {r.key for r in records}
    complete = None  # the last round that an earlier invocation finished: checked once before going on
    for r in stopper.rounds():
        if all(run.key in done for run in round_runs(config, r)):
            complete = r
            continue
        if complete is not None and complete >= 0 and stopper.round_done(complete, records):
            return None
        complete = None
        if not _run_round(config, runner, results, records, r, hooks, stopper):
            return "time" if stopper.held_back else "failed"
        if r >= 0 and stopper.round_done(r, records):
            return None
    if complete is not None and complete >= 0 and stopper.round_done(complete, records):
        return None
    return "max-runs"


def _run_round(config: AllocConfig, runner: Runner, results: ResultsDir, records: list[AllocRun], r: int,
               hooks: _Hooks, stopper: Any = None) -> bool:
    """Runs what is left of round `r`, appending each record as it finishes; False when the experiment
    must end here (the stopper held a run back, or every run of the first round failed alike)."""
    done = {x.key for x in records}
    left = [[run for run in unit if run.key not in done] for unit in round_units(config, r)]
    left = [todo for todo in left if todo]
    for i, todo in enumerate(left):
        if stopper is not None and not stopper.may_start(len(left) - i, records):
            return False
        for run in todo:
            if hooks.on_start:
                hooks.on_start(run)
        requests = [ProbeRequest(allocator=run.allocator, model=config.model, device=config.device,
                                 warm_gens=config.warm_gens, max_new_tokens=config.max_new_tokens,
                                 dtype=config.dtype, seed=config.seed, threads=config.threads,
                                 timeout_s=config.timeout_s, placement=config.placement(run),
                                 measure_s=_window_s(config, run))
                    for run in todo]
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
        clock = stopper.clock if stopper is not None else time.monotonic  # the deadline's own clock
        t0 = clock()
        outcomes = run_together(runner, requests)
        if stopper is not None:
            stopper.unit_done(clock() - t0)
        new = [build_record(config, run, len(records) + i, started, outcome, runner.name, hooks.environment)
               for i, (run, outcome) in enumerate(zip(todo, outcomes, strict=True))]
        if len(new) == 2:
            new = [replace(new[0], concurrent_with=new[1].run_index), replace(new[1], concurrent_with=new[0].run_index)]
        for run, record in zip(todo, new, strict=True):
            results.append_record(RUNS_FILE, record)
            records.append(record)
            if hooks.on_run:
                hooks.on_run(run, record)
        if _first_round_all_failed(records, config):
            return False  # the same failure every time: repeating it teaches nothing
    return True


def _window_s(config: AllocConfig, run: PlannedRun) -> float | None:
    """The run's measured window in seconds (None: counted in generates); a warm-up run's is short."""
    if config.measure_s is None or not run.warmup:
        return config.measure_s
    return min(config.measure_s, WARMUP_MEASURE_S)


def run_together(runner: Runner, requests: list[ProbeRequest]) -> list[ProbeOutcome]:
    """One request runs in this thread; several start at once, one thread each. On Ctrl-C or any
    error every probe still running is killed before the exception goes on."""
    if len(requests) == 1:
        return [runner.run_probe(requests[0])]
    pool = ThreadPoolExecutor(max_workers=len(requests), thread_name_prefix="probe")
    try:
        futures = [pool.submit(runner.run_probe, request) for request in requests]
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)  # a failed probe does not wait for its sibling
        for future in finished:
            future.result()  # raises the first failure: every sibling is then killed below
        return [f.result() for f in futures]
    except BaseException:
        runner.abort()
        raise
    finally:
        pool.shutdown(wait=True)


def _first_round_all_failed(records: list[AllocRun], config: AllocConfig) -> bool:
    first = min(-config.warmup_runs, 0)
    firsts = [r for r in records if r.round == first]
    planned = 2 * (len(config.allocators) - 1) if config.paired else len(config.allocators)
    return len(firsts) == planned and all(r.status == "failed" for r in firsts)
