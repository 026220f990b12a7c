"""`harness`: the command line. Validates input, picks a runner, runs an experiment, writes reports."""

from __future__ import annotations

import datetime as dt
import itertools
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harness.alloc import report as alloc_report
from harness.alloc import run as alloc
from harness.alloc.runners.base import RunnerError, describe_cpus, describe_placement, format_cpu_list, parse_cpu_list
from harness.alloc.stopping import AllocStopper
from harness.measure import environment, stopping
from harness.measure.allocators import KNOWN, AllocatorError, parse_allocator_envs, parse_allocator_libs, resolve
from harness.measure.records import AllocRun
from harness.measure.results import ResultsDir, ResultsError
from harness.measure.signals import exit_code_of
from harness.probe.models import ModelError, parse_model

console = Console(stderr=True)

REAL_PHI3 = "microsoft/Phi-3-mini-4k-instruct"
# `harness bench` (what `make bench` runs): the allocator part on a time budget, about 2 minutes on 2 cores.
BENCH_ALLOC_TIME = "2m"
BENCH_MEASURE_S = 3.0
BENCH_MIN_ROUNDS = 3


class HarnessError(click.ClickException):
    """One clear line, non-zero exit."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class HarnessFault(HarnessError):
    """A fault, not a usage error: one clear line, exit code 1."""

    exit_code = 1


def default_out(prefix: str = "") -> str:
    """results/<prefix><timestamp>, created here: a second command started in the same second gets its own
    directory (<timestamp>-2, ...), never the first one's."""
    base = Path("results") / (prefix + dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    for n in itertools.count(1):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError:
            return str(base)  # ensure_writable says why it cannot be written
        return str(candidate)
    raise AssertionError("unreachable")


def gpu_visible() -> tuple[bool, str]:
    info = environment.gpus()
    if info.get("available"):
        return True, ", ".join(d["name"] for d in info["devices"])
    return False, info.get("reason", "no NVIDIA GPU found")


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise HarnessError(f"unknown --device {device!r} (auto, cpu, cuda)")
    has_gpu, why = gpu_visible()
    if device.startswith("cuda") and not has_gpu:
        raise HarnessError(f"--device {device} asked for, but no NVIDIA GPU is visible ({why})")
    if device == "auto":
        return "cuda" if has_gpu else "cpu"
    return device


def real_phi3_cached() -> bool:
    """Whether the real Phi-3-mini sits in the local Hugging Face cache (no download is attempted)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(REAL_PHI3, "config.json"), str)
    except Exception:
        return False


def default_model(device: str) -> str:
    if device.startswith("cuda"):
        return REAL_PHI3 if real_phi3_cached() else "synthetic:phi3-mini"
    return "synthetic:tiny"


def validate_model(model: str) -> str:
    try:
        return parse_model(model).name
    except ModelError as exc:
        raise HarnessError(str(exc)) from None


def make_runner(kind: str, device: str, allocator_names: list[str], libs: dict[str, str] | None = None):
    """The runner named by --runner; `auto` prefers docker when an engine and the images are usable."""
    from harness.measure.allocators import KNOWN

    if kind == "local":
        from harness.alloc.runners.local import LocalRunner

        return LocalRunner()
    custom = [n for n in allocator_names if n not in KNOWN]
    if kind == "auto" and (custom or libs):
        from harness.alloc.runners.local import LocalRunner

        why = (f"no probe image has {', '.join(custom)}" if custom
               else "--allocator-lib names libraries of this host")
        console.print(f"[yellow]runner auto: local ({why})[/]")
        return LocalRunner()
    try:
        from harness.alloc.runners import docker as docker_runner
        from harness.containers import engine
    except ImportError as exc:
        if kind == "docker":
            raise HarnessError(f"the docker runner is unavailable: {exc}") from None
        console.print(f"[yellow]runner auto: local (docker runner unavailable: {exc})[/]")
        from harness.alloc.runners.local import LocalRunner

        return LocalRunner()
    ok, why = engine.docker_available(device, allocator_names)
    if kind == "docker":
        if not ok:
            raise HarnessError(f"--runner docker: {why}")
        try:
            return docker_runner.make_docker_runner(device, allocator_names)
        except AllocatorError as exc:
            raise HarnessError(f"--runner docker: {exc}") from None
    if ok:
        try:
            runner = docker_runner.make_docker_runner(device, allocator_names)
            console.print(f"runner auto: docker ({why})")
            return runner
        except RunnerError as exc:
            why = str(exc)
    from harness.alloc.runners.local import LocalRunner

    console.print(f"[yellow]runner auto: local ({why})[/]")
    return LocalRunner()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="slm-memory-harness")
def main() -> None:
    """Measure what the memory layer and the serving path do to a small language model's latency."""


def _csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@main.command("alloc")
@click.option("--runner", "runner_kind", type=click.Choice(["auto", "local", "docker"]), default="auto",
              show_default=True, help="Where each probe runs: a fresh process or a fresh container.")
@click.option("--model", default=None, help="synthetic:tiny | synthetic:phi3-mini | hub id | local directory "
              "[default: synthetic:tiny on CPU, Phi-3-mini (real if cached, else synthetic) on CUDA]")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
@click.option("--allocators", default="glibc,jemalloc", show_default=True,
              help="Comma-separated: glibc, jemalloc, tcmalloc, mimalloc (or names given with --allocator-lib).")
@click.option("--allocator-lib", multiple=True, metavar="NAME=PATH", help="Library to preload for NAME.")
@click.option("--allocator-env", multiple=True, metavar="NAME:VAR=VALUE",
              help="Environment for one allocator's runs, e.g. jemalloc:MALLOC_CONF=background_thread:true.")
@click.option("--runs", default=5, show_default=True, type=click.IntRange(1),
              help="Measured runs per allocator; with --target-ci, the rounds before its first check.")
@click.option("--warmup-runs", default=1, show_default=True, type=click.IntRange(0),
              help="Discarded warm-up runs per allocator (page cache, bytecode) before measuring.")
@click.option("--warm-gens", default=None, type=click.IntRange(1),
              help="Warm generate calls per run after the cold one; gen_latency_s is their median "
                   f"[default: {alloc.DEFAULT_WARM_GENS}].")
@click.option("--measure-s", default=None, type=click.FloatRange(0, min_open=True), metavar="S",
              help="The measured window in seconds instead: warm generates until S seconds of generation are "
                   f"measured, at least one [default with --target-ci or --max-time: {alloc.DEFAULT_MEASURE_S:g}].")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1))
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0),
              help="torch intra-op threads in the probe (0: torch's default).")
@click.option("--timeout", "timeout_s", default=1800.0, show_default=True, type=click.FloatRange(1),
              help="Seconds before one run is killed and recorded as failed.")
@click.option("--paired", is_flag=True,
              help="Run every other allocator at the same time as a run of the baseline (glibc, else the first "
                   "allocator), each on its own half of the host "
                   "(one GPU and half the CPUs each, sides swapped every round), and compare within pairs: a "
                   "slow stretch of a shared host then hits both sides. Local runner; on CUDA, 2 GPUs.")
@click.option("--affinity", default=None, metavar="CPUS",
              help="Pin every probe (process or container) to these CPUs, e.g. 2-5 or 2,3 (as pyperf's "
                   "--affinity): the scheduler then cannot move the decode loop across cores or NUMA nodes "
                   "between runs. Each run checks that its process was pinned.")
@click.option("--target-ci", default=None, type=click.FloatRange(0, min_open=True), metavar="PCT",
              help="Add interleaved rounds until the ratio CI of every allocator against the baseline, on --metric, "
                   "is ±PCT % wide or narrower (its width alone, checked once a round from round --runs on), or "
                   "--max-time is up. --resume continues towards the same target.")
@click.option("--max-time", default=None, metavar="DURATION",
              help="Start no run that would likely end after this much time (90s, 2m, 1h30m); a run in flight "
                   "is never cut. Without --target-ci: rounds until then.")
@click.option("--max-runs", default=None, type=click.IntRange(1),
              help="With --target-ci or --max-time: at most this many measured rounds.")
@click.option("--metric", default=None, type=click.Choice(sorted(alloc.METRICS)),
              help=f"The value --target-ci applies to [default: {alloc.DEFAULT_METRIC}].")
@click.option("--out", default=None, help="Results directory [default: results/<timestamp>].")
@click.option("--resume", is_flag=True, help="Continue an interrupted --out directory.")
def alloc_command(**kw: Any) -> None:
    """Allocator impact: the same generation under each allocator (LD_PRELOAD), fresh verified runs."""
    sys.exit(exit_code_of(lambda: run_alloc(**kw)))


def run_alloc(runner_kind: str = "auto", model: str | None = None, device: str = "auto",
              allocators: str = "glibc,jemalloc", allocator_lib: tuple[str, ...] = (),
              allocator_env: tuple[str, ...] = (), runs: int = 5, warmup_runs: int = 1, warm_gens: int | None = None,
              max_new_tokens: int = 32, dtype: str = "auto", threads: int = 0, timeout_s: float = 1800.0,
              out: str | None = None, resume: bool = False, paired: bool = False,
              affinity: str | None = None, measure_s: float | None = None, target_ci: float | None = None,
              max_time: str | None = None, max_runs: int | None = None, metric: str | None = None) -> int:
    """Runs experiment A; returns the exit code (0: all runs verified, 1: some run failed). `target_ci` is in
    percent, `max_time` a duration such as 2m."""
    names = _csv_list(allocators)
    max_time_s = _duration(max_time) if max_time is not None else None
    cpus = _affinity(affinity) if affinity is not None else None
    if paired and cpus:
        raise HarnessError("--paired splits the host's CPUs itself: leave out --affinity")
    if paired and runner_kind == "docker":
        raise HarnessError("--paired runs with the local runner only (--runner local)")
    if paired and len(names) < 2:
        raise HarnessError("--paired needs a baseline and at least one other allocator")
    try:
        libs = parse_allocator_libs(allocator_lib)
        envs = parse_allocator_envs(allocator_env)
        resolve(names, libs, envs, check_files=False)  # names and syntax: fail before anything starts
    except AllocatorError as exc:
        raise HarnessError(str(exc)) from None
    dev = resolve_device(device)
    model_name = validate_model(model or default_model(dev))
    results = ResultsDir(out or default_out())
    try:
        results.lock()  # held until this process ends
    except ResultsError as exc:
        raise HarnessError(str(exc)) from None
    saved = (results.read_json(alloc.CONFIG_FILE) or {}).get("config") if resume else None
    if saved and target_ci is None and saved.get("target_ci"):  # --resume continues towards the same target
        target_ci = saved["target_ci"] * 100
    metric = metric or (saved or {}).get("metric") or alloc.DEFAULT_METRIC
    open_ended = target_ci is not None or max_time_s is not None
    if max_runs is not None and not open_ended:
        raise HarnessError("--max-runs caps an open-ended experiment: give --target-ci or --max-time with it")
    warm_gens, measure_s = _window(warm_gens, measure_s, open_ended, saved)

    placements = []
    if paired:
        from harness.alloc.runners.local import PlacementError, split_host

        try:
            placements = split_host(dev)
        except PlacementError as exc:
            raise HarnessError(str(exc)) from None
        runner_kind = "local"
    runner = make_runner(runner_kind, dev, names, libs)
    try:
        resolved = runner.resolve_allocators(names, libs, envs)  # host paths, or paths inside the images
    except AllocatorError as exc:
        runner.close()
        raise HarnessError(str(exc)) from None
    config = alloc.AllocConfig(model=model_name, device=dev, allocators=resolved, runs=runs,
                               warm_gens=warm_gens, max_new_tokens=max_new_tokens, warmup_runs=warmup_runs,
                               dtype=dtype, threads=threads, timeout_s=timeout_s, runner=runner.name,
                               paired=paired, placements=placements, affinity=cpus, measure_s=measure_s,
                               target_ci=target_ci / 100 if target_ci is not None else None, metric=metric)
    stop_rule = (stopping.StopRule(target=config.target_ci, metric=metric, max_time_s=max_time_s, min_rounds=runs,
                                   max_rounds=max_runs) if open_ended else None)
    design = (f", paired with {config.baseline.name} on two host halves "
              f"({'; '.join(describe_placement(p.to_dict()) for p in placements)})" if paired else "")
    if cpus:
        design += f", pinned to {describe_cpus(cpus)}"
    console.print(f"alloc: {model_name} on {dev}, allocators {', '.join(names)}, {_extent(config, stop_rule)} "
                  f"(+{warmup_runs} warm-up) each{design}, runner {runner.name} → {results.root}")
    try:
        records = _run_with_progress(config, runner, results, resume,
                                     environment.collect({"runner": runner.describe()}), stop_rule)
    except ResultsError as exc:
        raise HarnessError(str(exc)) from None
    except RunnerError as exc:
        _report(results, config, names)
        raise HarnessError(f"{exc} (runs so far kept in {results.root / alloc.RUNS_FILE})") from None
    except KeyboardInterrupt:
        _report(results, config, names)
        console.print(f"[red]interrupted[/]: runs so far kept in {results.root / alloc.RUNS_FILE}; "
                      "continue with --resume")
        return 130
    finally:
        runner.close()
    rows = _report(results, config, names)
    failed = [r for r in records if not r.ok]
    if rows:
        _print_rows(rows, results)
    elif records and len(failed) == len(records):
        console.print(f"[red]error[/]: every warm-up run failed ({_failures(failed)}): no round was measured "
                      f"and no summary was written; the runs are in {results.root / alloc.RUNS_FILE}", soft_wrap=True)
        return 1
    else:
        console.print(f"no measured run yet, so no summary was written; the warm-up runs are in "
                      f"{results.root / alloc.RUNS_FILE} (continue with --resume)", soft_wrap=True)
    for line in alloc_answer(results):
        click.echo(line)
    if failed:
        for reason in sorted({r.failure or "unknown" for r in failed}):
            console.print(f"[red]failed run[/]: {reason}")
        return 1
    return 0


def _duration(text: str) -> float:
    try:
        return stopping.parse_duration(text)
    except ValueError as exc:
        raise HarnessError(f"--max-time: {exc}") from None


def _window(warm_gens: int | None, measure_s: float | None, open_ended: bool,
            saved: dict[str, Any] | None) -> tuple[int, float | None]:
    """(warm generates, measured seconds): a count of warm generates, or a window in seconds (the default of
    an open-ended experiment). A resumed experiment keeps its own window unless one is given."""
    if warm_gens is not None and measure_s is not None:
        raise HarnessError("--warm-gens counts the measured generates and --measure-s times them: give one of them")
    if saved and warm_gens is None and measure_s is None:
        return saved.get("warm_gens", alloc.DEFAULT_WARM_GENS), saved.get("measure_s")
    if warm_gens is not None:
        return warm_gens, None
    return alloc.DEFAULT_WARM_GENS, measure_s if measure_s is not None else (
        alloc.DEFAULT_MEASURE_S if open_ended else None)


def _extent(config: alloc.AllocConfig, rule: stopping.StopRule | None) -> str:
    """How many runs: '5 runs', or until what an open-ended experiment goes on."""
    if rule is None:
        return f"{config.runs} runs"
    until = []
    if rule.target is not None:
        until.append(f"every ratio CI on {config.metric} is ±{rule.target * 100:g} % (checked from round "
                     f"{rule.min_rounds})")
    if rule.max_time_s is not None:
        until.append(f"{stopping.format_duration(rule.max_time_s)} are up")
    if rule.max_rounds is not None:
        until.append(f"{rule.max_rounds} rounds")
    return "runs until " + " or ".join(until)


def _failures(failed: list[AllocRun]) -> str:
    return "; ".join(sorted({r.failure or "unknown" for r in failed}))


def _affinity(text: str) -> tuple[int, ...]:
    """--affinity as CPU numbers, each one this process may use (the probes inherit no more than that)."""
    try:
        cpus = parse_cpu_list(text)
    except ValueError as exc:
        raise HarnessError(f"--affinity: {exc}") from None
    allowed = os.sched_getaffinity(0)
    outside = [c for c in cpus if c not in allowed]
    if outside:
        raise HarnessError(f"--affinity: CPU(s) {format_cpu_list(outside)} not available here "
                           f"(this process may use CPUs {format_cpu_list(allowed)})")
    return cpus


def _report(results: ResultsDir, config: alloc.AllocConfig, names: list[str]) -> list[alloc_report.AllocRow]:
    records = results.read_records(alloc.RUNS_FILE, AllocRun)
    if not any(not r.warmup for r in records):
        return []
    return alloc_report.write(results, records, config.to_dict(), names)


def _run_with_progress(config: alloc.AllocConfig, runner: Any, results: ResultsDir, resume: bool,
                       env: dict[str, Any], rule: stopping.StopRule | None = None):
    per_round = len(alloc.round_runs(config, 0))
    rounds = config.runs if rule is None else rule.max_rounds
    total = (config.warmup_runs + rounds) * per_round if rounds is not None else None  # open-ended: n/?
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task("runs", total=total)
        done_before = len(results.read_records(alloc.RUNS_FILE, AllocRun)) if resume else 0
        skipped = results.skipped_note(alloc.RUNS_FILE) if resume else None
        if skipped:
            progress.console.print(f"[yellow]warning[/]: {skipped}; runs it held are run again", soft_wrap=True)
        progress.update(task, completed=done_before)
        stopper = None
        if rule is not None:
            stopper = AllocStopper(rule, results, [a.name for a in config.allocators], config.paired,
                                       config.warmup_runs, on_check=lambda c: progress.console.print(
                                           _check_text(c, stopper)))

        def on_start(run: alloc.PlannedRun) -> None:
            label = "warm-up" if run.warmup else f"round {run.round + 1}" + (f"/{rounds}" if rounds else "")
            if stopper is not None and stopper.remaining() is not None:
                label += f", {stopping.format_duration(max(0.0, stopper.remaining()))} left"
            who = f"{config.baseline.name} ‖ {run.pair}" if run.pair else run.allocator.name
            progress.update(task, description=f"{who:<9} {label}")

        def on_run(run: alloc.PlannedRun, record: AllocRun) -> None:
            progress.advance(task)
            if not record.ok:
                progress.console.print(f"[red]run failed[/] ({run.allocator.name}): {record.failure}")

        records = alloc.execute(config, runner, results, resume=resume, environment=env, on_run=on_run,
                                on_start=on_start, stopper=stopper)
    if stopper is not None and stopper.outcome is not None:
        console.print(f"stopped: {stopping.STOP_REASONS.get(stopper.outcome['reason'], '')}")
    return records


def _check_text(check: dict[str, Any], stopper: stopping.Stopper) -> str:
    """One line per precision check: the round, the widest CI against the target, the time used and left."""
    widest = check["widest"]
    width = "no CI yet" if math.isnan(widest) else f"widest ratio CI ±{widest * 100:.1f} %"
    left = stopper.remaining()
    return (f"round {check['round'] + 1}: {width} on {check['metric']} (target ±{check['target'] * 100:g} %), "
            f"{stopping.format_duration(check['elapsed_s'])} elapsed"
            + (f", {stopping.format_duration(max(0.0, left))} left" if left is not None else ""))


def _cell(value: Any) -> Any:
    """A figure for the console table; "–" where there is none (an allocator whose runs all failed)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return float(f"{value:.4g}") if isinstance(value, float) else value


def _print_rows(rows: list[alloc_report.AllocRow], results: ResultsDir) -> None:
    from tabulate import tabulate

    table = [[r.allocator, *(_cell(getattr(r, k)) for k in ("gen_latency_s", "wall_real_s", "rss_mb",
                                                             "ratio_vs_baseline", "p_value")), r.n, r.n_failed]
             for r in rows]
    click.echo(tabulate(table, headers=["allocator", "gen_latency_s", "wall_real_s", "rss_mb", "ratio", "p", "n",
                                        "failed"], disable_numparse=True))
    written = [results.root / rel for rel in (alloc_report.CSV_FILE, alloc_report.SUMMARY_FILE, alloc.RUNS_FILE)]
    written += sorted(results.root.glob("environment*.json"))
    click.echo("\nwrote " + "\n      ".join(str(p) for p in written if p.exists()))


@main.command("report")
@click.argument("directory")
def report_command(directory: str) -> None:
    """Recompute an experiment's reports from what it left on disk (after a run was copied off another
    host, or after the report code changed). Runs nothing. Allocator experiment: CSV, summary and plots
    from runs.jsonl and config.json; serve experiment: the start-up analysis (from each server's log and
    stacks), first_token_latency.md and the timeline plot."""
    results = ResultsDir(directory)
    if results.root.is_dir():
        try:
            results.lock()  # runs.jsonl is not read while another command appends to it
        except ResultsError as exc:
            raise HarnessError(str(exc)) from None
    records = results.read_records(alloc.RUNS_FILE, AllocRun)
    saved = results.read_json(alloc.CONFIG_FILE)
    has_serve = (results.root / "serve" / "config.json").exists()
    if not (records and saved is not None) and not has_serve:
        raise HarnessError(f"{results.root} holds no experiment ({alloc.RUNS_FILE} and {alloc.CONFIG_FILE}, "
                           "or serve/config.json)")
    if records and saved is not None:
        if alloc_report.measured(records):
            _rebuild_alloc(results, records, saved)
        elif has_serve:
            console.print(f"[yellow]warning[/]: {_no_measured_runs(results, records)}", soft_wrap=True)
        else:
            raise HarnessFault(_no_measured_runs(results, records))
    if has_serve:
        from harness.serve import report as serve_report

        click.echo(f"wrote {serve_report.rebuild(results)}")


def _no_measured_runs(results: ResultsDir, records: list[AllocRun]) -> str:
    failed = [r for r in records if not r.ok]
    why = (f"{len(failed)} warm-up runs failed ({_failures(failed)})" if failed
           else f"{len(records)} warm-up runs only: continue it with --resume")
    return f"{results.root} holds no measured runs: {why}"


def _rebuild_alloc(results: ResultsDir, records: list[AllocRun], saved: dict[str, Any]) -> None:
    skipped = results.skipped_note(alloc.RUNS_FILE)
    if skipped:
        console.print(f"[yellow]warning[/]: {skipped}", soft_wrap=True)
    config = saved.get("config", {})
    names = [a["name"] for a in config.get("allocators", [])]
    rows = alloc_report.write(results, records, config, names)
    _print_rows(rows, results)


@main.command("bench")
@click.option("--model", default=None, help="Same model for both experiments [default: as `harness alloc`].")
@click.option("--device", default="auto", show_default=True)
@click.option("--runner", "runner_kind", type=click.Choice(["auto", "local", "docker"]), default="auto",
              show_default=True, help="Runner of both experiments (probes and the server).")
@click.option("--allocators", default="glibc,jemalloc", show_default=True)
@click.option("--runs", default=BENCH_MIN_ROUNDS, show_default=True, type=click.IntRange(1),
              help="Allocator rounds before the first precision check.")
@click.option("--target-ci", default=alloc_report.PRECISION_TARGET * 100, show_default=True,
              type=click.FloatRange(0, min_open=True), metavar="PCT",
              help="The allocator part stops once every ratio CI is ±PCT % wide or narrower, or --alloc-time is up.")
@click.option("--alloc-time", default=BENCH_ALLOC_TIME, show_default=True, metavar="DURATION",
              help="The allocator part's time budget (as alloc --max-time).")
@click.option("--measure-s", default=BENCH_MEASURE_S, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Seconds of measured generation per allocator run.")
@click.option("--engine", type=click.Choice(["vllm", "transformers"]), default="vllm", show_default=True)
@click.option("--cold-starts", default=1, show_default=True, type=click.IntRange(1))
@click.option("--warm-requests", default=5, show_default=True, type=click.IntRange(0))
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--out", default=None, help="Results directory [default: results/bench-<timestamp>].")
def bench_command(model: str | None, device: str, runner_kind: str, allocators: str, runs: int, target_ci: float,
                  alloc_time: str, measure_s: float, engine: str, cold_starts: int, warm_requests: int, port: int,
                  out: str | None) -> None:
    """Both experiments on one model: `alloc` on a time budget, then `serve`, and DIR/index.md linking both
    reports. Ends with the allocator answer: a verdict, or how many runs a usable one needs on this host."""
    from harness.serve.config import ServeConfig
    from harness.serve.run import run_serve

    out = out or default_out("bench-")
    dev = resolve_device(device)
    model_name = validate_model(model or default_model(dev))

    def both() -> int:
        alloc_code = run_alloc(runner_kind=runner_kind, model=model_name, device=dev, allocators=allocators,
                               runs=runs, out=out, target_ci=target_ci, max_time=alloc_time, measure_s=measure_s)
        if alloc_code == 130:
            return 130
        outcome = run_serve(ServeConfig(model=model_name, out=out, engine=engine, runner=runner_kind,
                                        cold_starts=cold_starts, warm_requests=warm_requests, port=port,
                                        device=dev if engine == "transformers" else "auto"))
        index = write_index(ResultsDir(out), model_name, alloc_code, outcome.exit_code, outcome.error)
        click.echo(f"wrote {index}")
        for line in alloc_answer(ResultsDir(out)):  # the last word: what the allocator part found
            click.echo(line)
        return alloc_code or outcome.exit_code

    sys.exit(exit_code_of(both))


def alloc_answer(results: ResultsDir) -> list[str]:
    """The allocator experiment's answer lines (alloc_report.answer_lines), from its files."""
    records = results.read_records(alloc.RUNS_FILE, AllocRun)
    config = (results.read_json(alloc.CONFIG_FILE) or {}).get("config")
    if not records or not config:
        return []
    return alloc_report.answer_lines(records, config, [a["name"] for a in config["allocators"]])


def write_index(results: ResultsDir, model: str, alloc_code: int, serve_code: int, serve_error: str | None) -> Path:
    """DIR/index.md: what ran, how it ended, and links to both reports."""
    from harness.alloc.report import CSV_FILE, PLOT_FILE, SUMMARY_FILE

    def status(code: int) -> str:
        return "completed" if code == 0 else f"ended with exit code {code}"

    def links(*files: tuple[str, str]) -> str:
        """Links to the files that were written; no link to one that was not."""
        return ", ".join(f"[{label}]({rel})" for label, rel in files if (results.root / rel).exists()) or "no files"

    lines = [f"# Benchmark: {model}", "",
             f"- A. Allocator impact ({status(alloc_code)}): " + links(
                 ("summary", SUMMARY_FILE), ("CSV", CSV_FILE), ("plot", PLOT_FILE), ("runs", "alloc/runs.jsonl")),
             f"- B. First-token path ({status(serve_code)}" + (f": {serve_error}" if serve_error else "") + "): "
             + links(("report", "serve/first_token_latency.md"), ("requests", "serve/requests.jsonl"),
                     ("start-up", "serve/startup.jsonl"), ("memory timeline", "serve/memory_timeline.png")),
             "- Environment: " + links(("environment.json", "environment.json")), "",
             *(f"**{line}**" for line in alloc_answer(results)), ""]
    for rel in (SUMMARY_FILE, "serve/first_token_latency.md"):
        if (results.root / rel).exists():
            text = re.sub(r"^(#+) ", r"#\1 ", (results.root / rel).read_text(), flags=re.M)  # one level down
            lines += ["---", "", text, ""]
    return results.write_text("index.md", "\n".join(lines))


@main.command("images")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]),
              help="cpu: the local Debian base; cuda: a CUDA PyTorch base (probe) and the official vLLM image.")
@click.option("--allocators", default=",".join(KNOWN), show_default=True,
              help="Probe images (and, with --vllm on CPU, server images) for these allocators.")
@click.option("--rebuild", is_flag=True, help="Rebuild even the images that are current.")
@click.option("--driver/--no-driver", default=True, show_default=True,
              help="The harness-driver image (compose's alloc services).")
@click.option("--vllm", is_flag=True, help="Also the vLLM server image (CPU: harness-vllm:cpu and "
              "harness-vllm:cpu-<allocator>; cuda: vllm/vllm-openai).")
@click.option("--vllm-only", is_flag=True, help="Only the vLLM server image(s).")
def images_command(device: str, allocators: str, rebuild: bool, driver: bool, vllm: bool, vllm_only: bool) -> None:
    """Build what `make images` builds: the probe images, the driver image and the vLLM server images, each
    only when its sources changed (wheelhouse from the host, base image from debootstrap)."""
    from harness.containers import build as containers_build
    from harness.containers import images, wheelhouse

    def build() -> int:
        try:
            containers_build.build(device, _csv_list(allocators), rebuild, driver, vllm, vllm_only)
        except (images.ImageError, wheelhouse.WheelhouseError) as exc:
            raise HarnessFault(f"images: {exc}") from None
        return 0

    sys.exit(exit_code_of(build))


def _register() -> None:
    from harness.doctor import doctor
    from harness.serve.command import serve

    main.add_command(doctor)
    main.add_command(serve)


_register()

if __name__ == "__main__":
    main()
