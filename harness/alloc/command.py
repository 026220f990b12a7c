"""`harness alloc`: experiment A's command line. Validates input, picks a runner, runs the allocator
experiment with a progress display, prints and writes its reports. Register it with
`main.add_command(alloc_command)`."""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harness.alloc import duet_report
from harness.alloc import report as alloc_report
from harness.alloc import run as alloc
from harness.alloc.runners.base import describe_cpus, describe_placement, format_cpu_list, parse_cpu_list
from harness.alloc.stopping import AllocStopper
from harness.containers.runner_choice import RunnerChoice, choose_runner
from harness.errors import HarnessError, Interrupted, RunnerError, UsageError
from harness.measure import environment, options, stopping
from harness.measure.allocators import KNOWN, parse_allocator_envs, parse_allocator_libs, resolve
from harness.measure.options import csv_list, default_out
from harness.measure.records import AllocRun, Environment
from harness.measure.results import ResultsDir
from harness.measure.signals import exit_code_of
from harness.probe.models import ModelError, parse_model

console = Console(stderr=True)

REAL_PHI3 = "microsoft/Phi-3-mini-4k-instruct"


def gpu_visible() -> tuple[bool, str]:
    info = environment.gpus()
    if info.get("available"):
        return True, ", ".join(d["name"] for d in info["devices"])
    return False, info.get("reason", "no NVIDIA GPU found")


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"unknown --device {device!r} (auto, cpu, cuda)")
    has_gpu, why = gpu_visible()
    if device.startswith("cuda") and not has_gpu:
        raise UsageError(f"--device {device} asked for, but no NVIDIA GPU is visible ({why})")
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
        raise UsageError(str(exc)) from None


def make_runner(kind: str, device: str, allocator_names: list[str], libs: dict[str, str] | None = None):
    """The probe runner for `--runner kind`: containers.runner_choice decides, and `auto` says which and why."""
    from harness.alloc.runners.local import LocalRunner

    custom = [n for n in allocator_names if n not in KNOWN]
    local_only = (f"no probe image has {', '.join(custom)}" if custom
                  else "--allocator-lib names libraries of this host" if libs and kind == "auto" else None)

    def docker_usable() -> tuple[bool, str]:
        from harness.containers import engine

        return engine.docker_available(device, allocator_names)

    choice = choose_runner(kind, docker_usable, local_only)
    if choice.kind == "docker":
        from harness.alloc.runners import docker as docker_runner

        try:
            runner = docker_runner.make_docker_runner(device, allocator_names)
        except RunnerError as exc:
            if kind == "docker":
                raise
            choice = RunnerChoice("local", str(exc))
        else:
            if kind == "auto":
                console.print(choice.line())
            return runner
    if kind == "auto":
        console.print(f"[yellow]{choice.line()}[/]")
    return LocalRunner()


# The options `harness bench` shares with `harness alloc` (it composes the rest from alloc's defaults).
model_option = options.option(
    "--model", default=None, help="synthetic:tiny | synthetic:phi3-mini | hub id | local directory "
    "[default: synthetic:tiny on CPU, Phi-3-mini (real if cached, else synthetic) on CUDA]")
device_option = options.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
DEFAULT_ALLOCATORS = "glibc,jemalloc"
runs_option = options.option("--runs", default=5, show_default=True, type=click.IntRange(1),
                             help="sequential: measured runs per allocator; with --target-ci, the rounds before its "
                                  "first check.")
measure_s_option = options.option(
    "--measure-s", default=None, type=options.Number(0, min_open=True), metavar="S",
    help="The measured window in seconds instead: warm generates until S seconds of generation are "
         f"measured, at least one [default with --target-ci or --max-time: {alloc.DEFAULT_MEASURE_S:g}].")


design_option = options.option(
    "--design", default=alloc.DEFAULT_DESIGN, show_default=True, type=click.Choice(alloc.DESIGNS),
    help="duet: sets of persistent probes, one per allocator, measured in alternating windows (adjacent windows "
         "see the same host state; the CI is over sets of fresh processes); sequential: one fresh process per "
         "run, rounds rotated.")


@click.command("alloc")
@options.runner(help="Where each probe runs: local (a fresh process), docker (a fresh container of its "
                     "allocator's probe image), auto (docker when the engine answers and the images are there or "
                     "can be built, else local; it says which and why).")
@model_option()
@device_option()
@options.allocators(DEFAULT_ALLOCATORS, "Comma-separated: glibc, jemalloc, tcmalloc, mimalloc (or names given "
                                        "with --allocator-lib).")
@options.allocator_lib()
@options.allocator_env()
@runs_option()
@click.option("--warmup-runs", default=1, show_default=True, type=click.IntRange(0),
              help="sequential: discarded warm-up runs per allocator (page cache, bytecode) before measuring.")
@click.option("--warm-gens", default=None, type=click.IntRange(1),
              help="Warm generate calls per run after the cold one (duet: per window); gen_latency_s is their median "
                   f"[default: {alloc.DEFAULT_WARM_GENS}].")
@measure_s_option()
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1))
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0),
              help="torch intra-op threads in the probe (0: torch's default).")
@click.option("--timeout", "timeout_s", default=1800.0, show_default=True, type=options.Number(1),
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
@options.target_ci(help="Add interleaved rounds until the ratio CI of every allocator against the baseline, on "
                        "--metric, is ±PCT % wide or narrower (its width alone, checked once a round from round "
                        "--runs on), or --max-time is up. --resume continues towards the same target.")
@options.max_time()
@options.max_rounds
@click.option("--metric", default=None, type=click.Choice(sorted(alloc.METRICS)),
              help=f"The value --target-ci applies to [default: {alloc.DEFAULT_METRIC}].")
@design_option()
@click.option("--sets", default=None, type=click.IntRange(1),
              help=f"duet: sets of fresh probes; with --target-ci or --max-time, the sets before the first check "
                   f"[default: {alloc.DEFAULT_SETS}].")
@click.option("--windows-per-set", default=alloc.DEFAULT_WINDOWS_PER_SET, show_default=True, type=click.IntRange(1),
              help="duet: measured steps per set, one window per allocator each (after one warm-up step). The "
                   "window is --warm-gens generates, or --measure-s seconds of generation "
                   f"[default: {alloc.DEFAULT_WINDOW_GENS} generate].")
@click.option("--cpu-placement", default="split", show_default=True, type=click.Choice(alloc.CPU_PLACEMENTS),
              help="duet: split gives each probe of a set its own CPUs (from --affinity or the host), rotated "
                   "across sets; shared puts every probe on all of them (one generates at a time).")
@click.option("--calibrate", is_flag=True,
              help="Run an A/A instead: the baseline against itself in two arms, with the same design and budget, "
                   "into DIR/calibration; it prints the bias found, how many sets alone called a difference and "
                   "the smallest effect the budget resolves. DIR's summary then quotes it.")
@options.out()
@click.option("--resume", is_flag=True, help="Continue an interrupted --out directory.")
def alloc_command(**kw: Any) -> None:
    """Allocator impact: the same generation under each allocator (LD_PRELOAD), every process verified; by
    default persistent probes measured in alternating windows (duet), or one fresh process per run."""
    given = _given_on_command_line(SEQUENTIAL_ONLY)
    sys.exit(exit_code_of(lambda: run_alloc(**_refuse_sequential_only(kw, given))))


SEQUENTIAL_ONLY = ("runs", "warmup_runs")  # options only the sequential design reads


def _given_on_command_line(names: tuple[str, ...]) -> list[str]:
    ctx = click.get_current_context()
    return [n for n in names if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]


def _refuse_sequential_only(kw: dict[str, Any], given: list[str]) -> dict[str, Any]:
    if kw.get("design") == "duet" and given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise UsageError(f"{flags}: the sequential design's option; the duet design has --sets and "
                         "--windows-per-set (or give --design sequential)")
    return kw


def run_alloc(*, runner: str, model: str | None, device: str, allocators: str, allocator_lib: tuple[str, ...],
              allocator_env: tuple[str, ...], runs: int, warmup_runs: int, warm_gens: int | None,
              max_new_tokens: int, dtype: str, threads: int, timeout_s: float, out: str | None, resume: bool,
              paired: bool, affinity: str | None, measure_s: float | None, target_ci: float | None,
              max_time: str | None, max_rounds: int | None, metric: str | None, design: str = "sequential",
              sets: int | None = None, windows_per_set: int = alloc.DEFAULT_WINDOWS_PER_SET,
              calibrate: bool = False, cpu_placement: str = "split") -> int:
    """Runs experiment A (every option of `harness alloc`, by name; `defaults_of(alloc_command)` has them
    all): returns 0 once every run was verified; raises the error it ended with otherwise. `target_ci` is in
    percent, `max_time` a duration such as 2m."""
    names = csv_list(allocators)
    max_time_s = _duration(max_time) if max_time is not None else None
    cpus = _affinity(affinity) if affinity is not None else None
    if paired and cpus:
        raise UsageError("--paired splits the host's CPUs itself: leave out --affinity")
    if paired and runner == "docker":
        raise UsageError("--paired runs with the local runner only (--runner local)")
    if paired and len(names) < 2:
        raise UsageError("--paired needs a baseline and at least one other allocator")
    if design == "duet" and paired:
        raise UsageError("--paired is a way of the sequential design: give --design sequential with it")
    if design == "duet" and len(names) < 2 and not calibrate:
        raise UsageError("the duet design compares a baseline with at least one other allocator "
                         "(or --calibrate: the baseline against itself)")
    if calibrate and design != "duet":
        raise UsageError("--calibrate runs an A/A of the duet design: give --design duet")
    libs = parse_allocator_libs(allocator_lib)
    envs = parse_allocator_envs(allocator_env)
    resolve(names, libs, envs, check_files=False)  # names and syntax: fail before anything starts
    dev = resolve_device(device)
    model_name = validate_model(model or default_model(dev))
    out = out or default_out()
    if calibrate:
        names = names[:1] if "glibc" not in names else ["glibc"]  # the baseline, against itself
        out = os.path.join(out, duet_report.CALIBRATION_DIR)
    results = ResultsDir(out)
    results.lock()  # held until this process ends
    saved = (results.read_json(alloc.CONFIG_FILE) or {}).get("config") if resume else None
    if saved and target_ci is None and saved.get("target_ci"):  # --resume continues towards the same target
        target_ci = saved["target_ci"] * 100
    metric = metric or (saved or {}).get("metric") or alloc.DEFAULT_METRIC
    open_ended = target_ci is not None or max_time_s is not None
    if max_rounds is not None and not open_ended:
        raise UsageError("--max-rounds caps an open-ended experiment: give --target-ci or --max-time with it")
    if design == "duet":
        window_gens, window_s = _duet_window(warm_gens, measure_s, saved)
        warm_gens, measure_s = window_gens or alloc.DEFAULT_WARM_GENS, None
    else:
        window_gens = window_s = None
        warm_gens, measure_s = _window(warm_gens, measure_s, open_ended, saved)

    placements = []
    if paired:
        from harness.alloc.runners.local import split_host

        placements = split_host(dev)
        runner = "local"
    probes = make_runner(runner, dev, names, libs)
    try:
        resolved = probes.resolve_allocators(names, libs, envs)  # host paths, or paths inside the images
    except HarnessError:
        probes.close()
        raise
    config = alloc.AllocConfig(model=model_name, device=dev, allocators=resolved, runs=runs,
                               warm_gens=warm_gens, max_new_tokens=max_new_tokens, warmup_runs=warmup_runs,
                               dtype=dtype, threads=threads, timeout_s=timeout_s, runner=probes.name,
                               paired=paired, placements=placements, affinity=cpus, measure_s=measure_s,
                               target_ci=target_ci / 100 if target_ci is not None else None, metric=metric,
                               design=design, sets=sets or alloc.DEFAULT_SETS, windows_per_set=windows_per_set,
                               window_gens=window_gens, window_s=window_s, calibration=calibrate,
                               cpu_placement=cpu_placement)
    first_check = (sets or alloc.DEFAULT_SETS) if design == "duet" else runs
    stop_rule = (stopping.StopRule(target=config.target_ci, metric=metric, max_time_s=max_time_s,
                                   min_rounds=first_check, max_rounds=max_rounds) if open_ended else None)
    if design == "duet":
        return _start_duet(config, probes, results, resume, stop_rule)
    design = (f", paired with {config.baseline.name} on two host halves "
              f"({'; '.join(describe_placement(p.to_dict()) for p in placements)})" if paired else "")
    if cpus:
        design += f", pinned to {describe_cpus(cpus)}"
    console.print(f"alloc: {model_name} on {dev}, allocators {', '.join(names)}, {_extent(config, stop_rule)} "
                  f"(+{warmup_runs} warm-up) each{design}, runner {probes.name} → {results.root}")
    try:
        records = _run_with_progress(config, probes, results, resume,
                                     environment.collect({"runner": probes.describe()}), stop_rule)
    except RunnerError as exc:
        _report(results, config, names)
        raise RunnerError(f"{exc} (runs so far kept in {results.root / alloc.RUNS_FILE})") from None
    except KeyboardInterrupt:
        _report(results, config, names)
        raise Interrupted(f"interrupted: runs so far kept in {results.root / alloc.RUNS_FILE}; "
                          "continue with --resume") from None
    finally:
        probes.close()
    rows = _report(results, config, names)
    failed = [r for r in records if not r.ok]
    if rows:
        _print_rows(rows, results)
    elif records and len(failed) == len(records):
        raise HarnessError(f"every warm-up run failed ({_failures(failed)}): no round was measured and no "
                           f"summary was written; the runs are in {results.root / alloc.RUNS_FILE}")
    else:
        console.print(f"no measured run yet, so no summary was written; the warm-up runs are in "
                      f"{results.root / alloc.RUNS_FILE} (continue with --resume)", soft_wrap=True)
    for line in alloc_answer(results):
        click.echo(line)
    if failed:
        raise HarnessError(f"{len(failed)} of {len(records)} runs failed: {_failures(failed)}")
    return 0


def _start_duet(config: alloc.AllocConfig, probes: Any, results: ResultsDir, resume: bool,
                rule: stopping.StopRule | None) -> int:
    from harness.alloc import duet_command

    arms = ", ".join(a.label for a in config.arms)
    window = (f"{config.window_s:g} s windows" if config.window_s is not None
              else f"windows of {config.window_gens} generates")
    extent = (f"{config.sets} sets" if rule is None
              else _extent(config, rule).replace("runs until", "sets until").replace("round", "set"))
    console.print(f"alloc: {config.model} on {config.device}, duet design, arms {arms}, {extent} of "
                  f"{config.windows_per_set} steps, {window}, runner {probes.name} → {results.root}", soft_wrap=True)
    try:
        return duet_command.run_duet(config, probes, results, resume,
                                     environment.collect({"runner": probes.describe()}), rule)
    finally:
        probes.close()


def _duet_window(warm_gens: int | None, measure_s: float | None,
                 saved: dict[str, Any] | None) -> tuple[int | None, float | None]:
    """(generates, seconds) of a duet window: one of them; a resumed experiment keeps its own."""
    if warm_gens is not None and measure_s is not None:
        raise UsageError("--warm-gens counts a window's generates and --measure-s times it: give one of them")
    if saved and warm_gens is None and measure_s is None:
        return saved.get("window_gens"), saved.get("window_s")
    if measure_s is not None:
        return None, measure_s
    return warm_gens or alloc.DEFAULT_WINDOW_GENS, None


def _duration(text: str) -> float:
    try:
        return stopping.parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"--max-time: {exc}") from None


def _window(warm_gens: int | None, measure_s: float | None, open_ended: bool,
            saved: dict[str, Any] | None) -> tuple[int, float | None]:
    """(warm generates, measured seconds): a count of warm generates, or a window in seconds (the default of
    an open-ended experiment). A resumed experiment keeps its own window unless one is given."""
    if warm_gens is not None and measure_s is not None:
        raise UsageError("--warm-gens counts the measured generates and --measure-s times them: give one of them")
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
        raise UsageError(f"--affinity: {exc}") from None
    allowed = os.sched_getaffinity(0)
    outside = [c for c in cpus if c not in allowed]
    if outside:
        raise UsageError(f"--affinity: CPU(s) {format_cpu_list(outside)} not available here "
                           f"(this process may use CPUs {format_cpu_list(allowed)})")
    return cpus


def _report(results: ResultsDir, config: alloc.AllocConfig, names: list[str]) -> list[alloc_report.AllocRow]:
    records = results.read_records(alloc.RUNS_FILE, AllocRun)
    if not any(not r.warmup for r in records):
        return []
    return alloc_report.write(results, records, config.to_dict(), names)


def _run_with_progress(config: alloc.AllocConfig, runner: Any, results: ResultsDir, resume: bool,
                       env: Environment, rule: stopping.StopRule | None = None):
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
                                           stopping.check_line(c, stopper.remaining(), "round")))

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


def no_measured_runs(results: ResultsDir, records: list[AllocRun]) -> str:
    failed = [r for r in records if not r.ok]
    why = (f"{len(failed)} warm-up runs failed ({_failures(failed)})" if failed
           else f"{len(records)} warm-up runs only: continue it with --resume")
    return f"{results.root} holds no measured runs: {why}"


def rebuild_report(results: ResultsDir, records: list[AllocRun], saved: dict[str, Any]) -> None:
    """`harness report` for an allocator experiment: CSV, summary and plots from its runs, and the table."""
    skipped = results.skipped_note(alloc.RUNS_FILE)
    if skipped:
        console.print(f"[yellow]warning[/]: {skipped}", soft_wrap=True)
    config = saved.get("config", {})
    names = [a["name"] for a in config.get("allocators", [])]
    rows = alloc_report.write(results, records, config, names)
    _print_rows(rows, results)


def alloc_answer(results: ResultsDir) -> list[str]:
    """The allocator experiment's answer lines (alloc_report.answer_lines), from its files."""
    loaded = duet_report.Duet.load(results)
    if loaded is not None:
        return duet_report.answer_lines(loaded) if loaded.counted else []
    records = results.read_records(alloc.RUNS_FILE, AllocRun)
    config = (results.read_json(alloc.CONFIG_FILE) or {}).get("config")
    if not records or not config:
        return []
    return alloc_report.answer_lines(records, config, [a["name"] for a in config["allocators"]])
