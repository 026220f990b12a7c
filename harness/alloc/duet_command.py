"""`harness alloc --design duet`: runs the sets with a progress display, writes and prints the reports."""

from __future__ import annotations

import math
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harness.alloc import duet, duet_report
from harness.alloc import run as alloc
from harness.alloc.stopping import DuetStopper
from harness.errors import HarnessError, Interrupted, RunnerError
from harness.measure import stopping
from harness.measure.records import AllocSet, AllocWindow, Environment
from harness.measure.results import ResultsDir

console = Console(stderr=True)


def run_duet(config: alloc.AllocConfig, runner: Any, results: ResultsDir, resume: bool, env: Environment,
             rule: stopping.StopRule | None) -> int:
    """Runs the duet experiment in `results`: 0 once every set was verified and counted; raises otherwise."""
    existing = alloc.prepare_dir(results, config, resume, duet.SETS_FILE, AllocSet)
    env_file = alloc.environment_file(results, resume)
    labels = [a.label for a in config.arms]
    try:
        sets = _run_with_progress(config, runner, results, existing, env, env_file, rule, labels)
    except RunnerError as exc:
        write_reports(results)
        raise RunnerError(f"{exc} (windows so far kept in {results.root / duet.WINDOWS_FILE})") from None
    except KeyboardInterrupt:
        write_reports(results)
        raise Interrupted(f"interrupted: windows so far kept in {results.root / duet.WINDOWS_FILE}; "
                          "continue with --resume") from None
    rows = write_reports(results)
    if rows:
        print_rows(rows, results)
    for line in answer(results):
        click.echo(line)
    failed = [s for s in sets if s.status == "failed"]
    if failed:
        raise HarnessError(f"{len(failed)} of {len(sets)} sets failed: "
                           + "; ".join(sorted({s.failure or s.ended_by for s in failed})))
    if not any(s.counted for s in sets):
        raise HarnessError(f"no set was measured, so no verdict; the sets are in {results.root / duet.SETS_FILE}")
    return 0


def _run_with_progress(config: alloc.AllocConfig, runner: Any, results: ResultsDir, existing: list[AllocSet],
                       env: Environment, env_file: str, rule: stopping.StopRule | None,
                       labels: list[str]) -> list[AllocSet]:
    per_set = (config.windows_per_set + duet.WARMUP_STEPS) * len(labels)
    planned = config.sets if rule is None else rule.max_rounds
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task("windows", total=planned * per_set if planned else None)
        stopper = None
        if rule is not None:
            stopper = DuetStopper(rule, results, labels, warmup_rounds=0, arms=labels,
                                  baseline=labels[0] if config.calibration else config.baseline.name,
                                  on_check=lambda c: progress.console.print(
                                      stopping.check_line(c, stopper.remaining(), "after set")))

        def on_set_start(index: int, arms: list[alloc.Arm]) -> None:
            left = ""
            if stopper is not None and stopper.remaining() is not None:
                left = f", {stopping.format_duration(max(0.0, stopper.remaining()))} left"
            of = f"/{planned}" if planned else ""
            progress.update(task, description=f"set {index + 1}{of}: starting {len(arms)} probes{left}")

        def on_window(window: AllocWindow) -> None:
            what = "warm-up" if window.warmup else f"step {window.step + 1}/{config.windows_per_set}"
            progress.update(task, advance=1, description=f"set {window.set_index + 1}: {what}")

        def on_set(record: AllocSet) -> None:
            progress.console.print(set_line(record, results), soft_wrap=True)

        hooks = duet.DuetHooks(on_set_start=on_set_start, on_window=on_window, on_set=on_set, environment=env_file)
        sets = duet.execute(config, runner, results, existing, env, hooks, stopper)
    if stopper is not None and stopper.outcome is not None:
        console.print(f"stopped: {duet_report.DUET_STOP_REASONS.get(stopper.outcome['reason'], '')}")
    return sets


def set_line(record: AllocSet, results: ResultsDir) -> str:
    """One line as each set ends: how it ended and, once counted, its own ratio of each arm."""
    head = f"set {record.set_index + 1}"
    if record.status == "failed":
        return f"[red]{head} failed[/] ({record.ended_by}): {record.failure}"
    loaded = duet_report.Duet.load(results)
    if loaded is None:
        return f"{head}: {record.status}"
    mine = [w for w in loaded.counted if w.set_index == record.set_index]
    parts = [f"{label}/{loaded.baseline} {comp.ratio:.3f}" for label, comp in
             duet_report.Duet(loaded.config, [record], mine).comparisons(alloc.METRICS[loaded.metric]).items()
             if not math.isnan(comp.ratio)]
    ended = "" if record.ended_by == "windows" else f", ended by {record.ended_by}"
    return f"{head}: {record.steps} steps in {stopping.format_duration(record.wall_s or 0)}{ended}; " + (
        ", ".join(parts) or "no step measured")


def write_reports(results: ResultsDir) -> list[dict[str, Any]]:
    loaded = duet_report.Duet.load(results)
    if loaded is None or not loaded.counted:
        return []
    return duet_report.write(results, loaded)


def answer(results: ResultsDir) -> list[str]:
    loaded = duet_report.Duet.load(results)
    return duet_report.answer_lines(loaded) if loaded and loaded.counted else []


def print_rows(rows: list[dict[str, Any]], results: ResultsDir) -> None:
    from tabulate import tabulate

    def cell(value: Any) -> Any:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        return float(f"{value:.4g}") if isinstance(value, float) else value

    table = [[r["allocator"], *(cell(r.get(k)) for k in ("gen_latency_s", "itl_p25_s", "wall_real_s", "rss_mb",
                                                          "itl_ratio_vs_baseline", "ratio_vs_baseline")),
              r["n_windows"], r["n_sets"]] for r in rows]
    click.echo(tabulate(table, headers=["arm", "gen_latency_s", "itl_p25_s", "wall_real_s", "rss_mb", "itl ratio",
                                        "gen ratio", "windows", "sets"], disable_numparse=True))
    written = [results.root / rel for rel in (duet_report.CSV_FILE, duet_report.SUMMARY_FILE, duet.WINDOWS_FILE,
                                              duet.SETS_FILE, duet_report.RATIO_PLOT_FILE)]
    written += sorted(results.root.glob("environment*.json"))
    click.echo("\nwrote " + "\n      ".join(str(p) for p in written if p.exists()))
