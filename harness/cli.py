"""`harness`: the command line. Validates input, picks a runner, runs an experiment, writes reports."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from harness.alloc import command as alloc_command
from harness.alloc import report as alloc_report
from harness.alloc import run as alloc
from harness.errors import EXIT_INTERRUPTED, HarnessError, Interrupted, UsageError
from harness.measure import options
from harness.measure.allocators import KNOWN
from harness.measure.options import csv_list, default_out
from harness.measure.records import AllocRun
from harness.measure.results import ResultsDir
from harness.measure.signals import exit_code_of
from harness.serve import command as serve_command

console = Console(stderr=True)

# `harness bench` (what `make bench` runs): the allocator part on a time budget, about 2 minutes on 2 cores.
BENCH_ALLOC_TIME = "2m"
BENCH_MEASURE_S = 3.0
BENCH_MIN_ROUNDS = 3
BENCH_DESIGN = "duet"
BENCH_WINDOWS_PER_SET = 20  # shorter sets than alloc's default: more of them fit the budget (the CI is over sets)


class OneLineErrors(click.Group):
    """A command line that cannot be parsed (a value out of range, NaN, an unknown option) ends in one line,
    `error: <what>`, and exit code 2, as every other usage error does: not click's usage block."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.UsageError as exc:
            hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="slm-memory-harness")
def main() -> None:
    """Measure what the memory layer and the serving path do to a small language model's latency."""


@main.command("report")
@click.argument("directory")
def report_command(directory: str) -> None:
    """Recompute an experiment's reports from what it left on disk (after a run was copied off another
    host, or after the report code changed). Runs nothing. Allocator experiment: CSV, summary and plots
    from runs.jsonl and config.json; serve experiment: the start-up analysis (from each server's log and
    stacks), first_token_latency.md and the timeline plot."""
    sys.exit(exit_code_of(lambda: rebuild_reports(ResultsDir(directory))))


def rebuild_reports(results: ResultsDir) -> None:
    """`harness report`: every report of the experiments in `results`, from its files."""
    if results.root.is_dir():
        results.lock()  # runs.jsonl is not read while another command appends to it
    has_serve = (results.root / "serve" / "config.json").exists()
    if rebuild_duet(results) and not has_serve:
        return
    records = results.read_records(alloc.RUNS_FILE, AllocRun)
    saved = results.read_json(alloc.CONFIG_FILE)
    if not (records and saved is not None) and not has_serve:
        raise UsageError(f"{results.root} holds no experiment ({alloc.RUNS_FILE} and {alloc.CONFIG_FILE}, "
                         "or serve/config.json)")
    if records and saved is not None and (saved.get("config") or {}).get("design") != "duet":
        if alloc_report.measured(records):
            alloc_command.rebuild_report(results, records, saved)
        elif has_serve:
            console.print(f"[yellow]warning[/]: {alloc_command.no_measured_runs(results, records)}", soft_wrap=True)
        else:
            raise HarnessError(alloc_command.no_measured_runs(results, records))
    if has_serve:
        from harness.serve import report as serve_report

        click.echo(f"wrote {serve_report.rebuild(results)}")


def rebuild_duet(results: ResultsDir) -> bool:
    """`harness report` for a duet experiment (and its calibration beside it); False when `results` holds none."""
    from harness.alloc import duet_command, duet_report

    found = False
    for directory in (ResultsDir(results.root / duet_report.CALIBRATION_DIR), results):
        loaded = duet_report.Duet.load(directory)
        if loaded is None:
            continue
        if not loaded.counted:
            raise HarnessError(f"{directory.root} holds no counted set of its duet experiment")
        duet_command.print_rows(duet_report.write(directory, loaded), directory)
        found = True
    return found


@main.command("bench")
@alloc_command.model_option(help="Same model for both experiments [default: as `harness alloc`].")
@alloc_command.device_option()
@options.runner(help="Runner of both experiments (probes and the server): " + options.RUNNER_HELP)
@options.allocators(alloc_command.DEFAULT_ALLOCATORS, "The allocator part's allocators (as alloc --allocators).")
@alloc_command.runs_option(default=BENCH_MIN_ROUNDS, help="Allocator sets (duet) or rounds before the first check.")
@options.target_ci(default=alloc_report.PRECISION_TARGET * 100, show_default=True,
                   help="The allocator part stops once every ratio CI is ±PCT % wide or narrower, or --alloc-time "
                        "is up.")
@options.max_time("--alloc-time", "max_time", default=BENCH_ALLOC_TIME, show_default=True,
                  help="The allocator part's time budget (as alloc --max-time).")
@alloc_command.design_option(default=BENCH_DESIGN, help="The allocator part's design (as alloc --design).")
@alloc_command.measure_s_option(help="Seconds of measured generation per allocator run (sequential) or window "
                                     f"(duet) [default: sequential {BENCH_MEASURE_S:g}; duet: one generate a window].")
@serve_command.engine_option(type=click.Choice(["vllm", "transformers"]))
@serve_command.cold_starts_option()
@serve_command.warm_requests_option()
@serve_command.port_option()
@options.out(help="Results directory [default: results/bench-<timestamp>].")
def bench_command(**kw: Any) -> None:
    """Both experiments on one model: `alloc` on a time budget, then `serve`, and DIR/index.md linking both
    reports. Ends with the allocator answer: a verdict, or how many runs a usable one needs on this host.
    Every other setting is the default of `harness alloc` and `harness serve`."""
    sys.exit(exit_code_of(lambda: run_bench(**kw)))


def run_bench(model: str | None, device: str, runner: str, allocators: str, runs: int, target_ci: float,
              max_time: str, design: str, measure_s: float | None, engine: str, cold_starts: int, warm_requests: int,
              port: int, out: str | None) -> None:
    """`harness bench`: each experiment's configuration is its command's defaults with bench's values."""
    from harness.serve.run import run_serve

    dev = alloc_command.resolve_device(device)
    model_name = alloc_command.validate_model(model or alloc_command.default_model(dev))
    out = out or default_out("bench-")
    alloc_error = _error_of(lambda: alloc_command.run_alloc(**{
        **options.defaults_of(alloc_command.alloc_command), "runner": runner, "model": model_name, "device": dev,
        "allocators": allocators, "runs": runs, "out": out, "target_ci": target_ci, "max_time": max_time,
        "design": design, "measure_s": BENCH_MEASURE_S if measure_s is None and design == "sequential" else measure_s,
        "sets": runs if design == "duet" else None, "windows_per_set": BENCH_WINDOWS_PER_SET}))
    if isinstance(alloc_error, Interrupted):
        raise alloc_error
    serve_error = _error_of(lambda: run_serve(serve_command.config_from_options(**{
        **options.defaults_of(serve_command.serve), "model": model_name, "out": out, "engine": engine,
        "runner": runner, "cold_starts": cold_starts, "warm_requests": warm_requests, "port": port,
        "device": dev if engine == "transformers" else "auto"})).failure())
    index = write_index(ResultsDir(out), model_name, alloc_error, serve_error)
    click.echo(f"wrote {index}")
    for line in alloc_command.alloc_answer(ResultsDir(out)):  # the last word: what the allocator part found
        click.echo(line)
    if alloc_error and serve_error:
        both_failed = HarnessError(f"allocator part: {alloc_error}; serve part: {serve_error}")
        both_failed.exit_code = max(alloc_error.exit_code, serve_error.exit_code)
        raise both_failed
    if alloc_error or serve_error:
        raise alloc_error or serve_error


def _error_of(part: Callable[[], HarnessError | int | None]) -> HarnessError | None:
    """The error one part of `bench` raised or returned, so that the next part still runs."""
    try:
        result = part()
    except HarnessError as exc:
        return exc
    return result if isinstance(result, HarnessError) else None


def write_index(results: ResultsDir, model: str, alloc_error: HarnessError | None,
                serve_error: HarnessError | None) -> Path:
    """DIR/index.md: what ran, how it ended, and links to both reports."""
    from harness.alloc.report import CSV_FILE, PLOT_FILE, SUMMARY_FILE

    def status(error: HarnessError | None) -> str:
        return "completed" if error is None else f"ended with exit code {error.exit_code}: {error}"

    def links(*files: tuple[str, str]) -> str:
        """Links to the files that were written; no link to one that was not."""
        return ", ".join(f"[{label}]({rel})" for label, rel in files if (results.root / rel).exists()) or "no files"

    lines = [f"# Benchmark: {model}", "",
             f"- A. Allocator impact ({status(alloc_error)}): " + links(
                 ("summary", SUMMARY_FILE), ("CSV", CSV_FILE), ("plot", PLOT_FILE), ("runs", "alloc/runs.jsonl"),
                 ("window ratios", "alloc/window_ratios.png"), ("windows", "alloc/windows.jsonl"),
                 ("sets", "alloc/sets.jsonl")),
             f"- B. First-token path ({status(serve_error)}): "
             + links(("report", "serve/first_token_latency.md"), ("requests", "serve/requests.jsonl"),
                     ("start-up", "serve/startup.jsonl"), ("memory timeline", "serve/memory_timeline.png")),
             "- Environment: " + links(("environment.json", "environment.json")), "",
             *(f"**{line}**" for line in alloc_command.alloc_answer(results)), ""]
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

    sys.exit(exit_code_of(lambda: containers_build.build(device, csv_list(allocators), rebuild, driver, vllm,
                                                         vllm_only)))


def _register() -> None:
    from harness.doctor import doctor

    main.add_command(alloc_command.alloc_command)
    main.add_command(doctor)
    main.add_command(serve_command.serve)


_register()

if __name__ == "__main__":
    main()
