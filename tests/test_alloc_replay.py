"""Fast tier: `harness alloc`'s orchestration on a runner that replays committed runs (tests/fakes.py).

Rounds, rotation, warm-up, --resume, the --target-ci / --max-time stop, failing runs, a sibling abort in
--paired and Ctrl-C run for real (harness.alloc.run.execute), and `harness report` renders what they wrote,
on numbers real probes recorded, in milliseconds. test_alloc_cli.py runs the same on real probe processes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from fakes import BLOCK, FAIL, INTERRUPT, RUNNER_ERROR, WRONG_LIBRARY, FakeClock, ReplayRunner

from harness.alloc import run as alloc
from harness.alloc.report import CSV_FILE, STOP_FILE, SUMMARY_FILE, runs_for
from harness.alloc.runners.base import Placement, RunnerError
from harness.alloc.stopping import AllocStopper
from harness.cli import main
from harness.measure import stats
from harness.measure.records import Environment
from harness.measure.results import ResultsDir, ResultsError
from harness.measure.stopping import StopRule

pytestmark = pytest.mark.fast

SINGLE = "h100-phi3-mini"  # four allocators, 22 rounds of 8 warm generates each on an H100
PAIRED = "h100x2-phi3-mini-paired"  # four allocators side by side with glibc on two H100s
TWO = ["glibc", "jemalloc"]
FOUR = ["glibc", "jemalloc", "tcmalloc", "mimalloc"]
HALVES = [Placement("0", tuple(range(0, 8))), Placement("1", tuple(range(8, 16)))]


def _config(runner: ReplayRunner, names: list[str], runs: int, warmup_runs: int = 1, **kw: Any) -> alloc.AllocConfig:
    return alloc.AllocConfig(model="synthetic:phi3-mini", device="cuda", allocators=runner.resolve_allocators(
        names, {}, {}), runs=runs, warm_gens=8, max_new_tokens=32, warmup_runs=warmup_runs, runner=runner.name, **kw)


def _environment(hostname: str) -> Environment:
    collected_at = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    return Environment(collected_at=collected_at, host={"hostname": hostname})


def _runs(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / alloc.RUNS_FILE).read_text().splitlines()]


def _report(out: Path):
    """`harness report DIR`, in this process."""
    return CliRunner().invoke(main, ["report", str(out)])


def _csv(out: Path) -> dict[str, dict[str, str]]:
    with open(out / CSV_FILE) as fh:
        return {row["allocator"]: row for row in csv.DictReader(fh)}


def _line(out: Path, prefix: str) -> str:
    return next(line for line in (out / SUMMARY_FILE).read_text().splitlines() if line.startswith(prefix))


def _measured(runs: list[dict[str, Any]], name: str, key: str = "itl_p25_s") -> list[float]:
    return [r[key] for r in runs if r["allocator"] == name and not r["warmup"] and r["status"] == "ok"]


# --- rounds, rotation, warm-up --------------------------------------------------------------------
def test_every_round_rotates_the_order_and_warm_up_runs_are_not_counted(tmp_path: Path) -> None:
    runner = ReplayRunner(SINGLE)
    alloc.execute(_config(runner, FOUR, runs=3, measure_s=25.0), runner, ResultsDir(tmp_path))
    order = {-1: ["mimalloc", "glibc", "jemalloc", "tcmalloc"],  # the warm-up round
             0: ["glibc", "jemalloc", "tcmalloc", "mimalloc"],
             1: ["jemalloc", "tcmalloc", "mimalloc", "glibc"],
             2: ["tcmalloc", "mimalloc", "glibc", "jemalloc"]}
    assert [r.allocator.name for r in runner.requests] == [name for rnd in order for name in order[rnd]]
    runs = _runs(tmp_path)
    assert [(r["round"], r["position"], r["allocator"]) for r in runs] == [
        (rnd, i, name) for rnd in order for i, name in enumerate(order[rnd])]
    assert [r["warmup"] for r in runs] == [True] * 4 + [False] * 12
    assert [r.measure_s for r in runner.requests] == [1.0] * 4 + [25.0] * 12  # a warm-up run only warms caches
    assert all(r["status"] == "ok" and r["verified"] for r in runs)

    result = _report(tmp_path)
    assert result.exit_code == 0, result.output
    rows = _csv(tmp_path)
    assert {name: (rows[name]["n"], rows[name]["n_failed"]) for name in FOUR} == {name: ("3", "0") for name in FOUR}
    gen = sorted(_measured(runs, "jemalloc", "gen_latency_s"))  # the median of the measured runs only
    assert float(rows["jemalloc"]["gen_latency_s"]) == pytest.approx(gen[1], rel=1e-5)


def test_paired_rounds_rotate_the_pairs_and_swap_the_sides(tmp_path: Path) -> None:
    runner = ReplayRunner(PAIRED)
    config = _config(runner, FOUR, runs=2, warmup_runs=0, paired=True, placements=HALVES)
    alloc.execute(config, runner, ResultsDir(tmp_path))
    runs = _runs(tmp_path)
    assert [(r["round"], r["pair"], r["allocator"], r["slot"]) for r in runs] == [
        (0, "jemalloc", "glibc", 0), (0, "jemalloc", "jemalloc", 1),
        (0, "tcmalloc", "glibc", 1), (0, "tcmalloc", "tcmalloc", 0),
        (0, "mimalloc", "glibc", 0), (0, "mimalloc", "mimalloc", 1),
        (1, "tcmalloc", "glibc", 0), (1, "tcmalloc", "tcmalloc", 1),
        (1, "mimalloc", "glibc", 1), (1, "mimalloc", "mimalloc", 0),
        (1, "jemalloc", "glibc", 1), (1, "jemalloc", "jemalloc", 0)]
    by_index = {r["run_index"]: r for r in runs}
    for r in runs:
        partner = by_index[r["concurrent_with"]]
        assert partner["concurrent_with"] == r["run_index"] and partner["started_at"] == r["started_at"]
        assert r["placement"] == HALVES[r["slot"]].to_dict() and r["verified"]
    result = _report(tmp_path)
    assert result.exit_code == 0, result.output
    assert "Paired design" in (tmp_path / SUMMARY_FILE).read_text()
    assert {name: row["n"] for name, row in _csv(tmp_path).items()} == {"glibc": "6", "jemalloc": "2",
                                                                         "tcmalloc": "2", "mimalloc": "2"}


# --- failing runs -----------------------------------------------------------------------------------
def test_a_failed_or_unverified_run_is_recorded_and_never_counted(tmp_path: Path) -> None:
    runner = ReplayRunner(SINGLE, faults={("jemalloc", 2): FAIL, ("jemalloc", 3): WRONG_LIBRARY})
    alloc.execute(_config(runner, TWO, runs=3), runner, ResultsDir(tmp_path))
    runs = _runs(tmp_path)
    assert len(runs) == 8, "the experiment goes on past a failed run"
    failed = [r for r in runs if r["status"] != "ok"]
    assert [(r["round"], r["allocator"]) for r in failed] == [(1, "jemalloc"), (2, "jemalloc")]
    crashed, unverified = failed
    assert crashed["failure"] == "probe exited with code 1" and crashed["exit_code"] == 1
    assert "CUDA out of memory" in crashed["log_tail"][-1] and crashed["gen_latency_s"] is None
    library = runner.runs["jemalloc"][0]["requested_library"]
    libc = runner.runs["glibc"][0]["probe"]["allocator"]["malloc_library"]
    assert unverified["failure"].startswith(f"jemalloc library {library} was not loaded: malloc resolved to {libc}")
    assert not unverified["verified"] and unverified["gen_latency_s"] is not None  # measured, but not counted

    result = _report(tmp_path)
    assert result.exit_code == 0, result.output
    rows = _csv(tmp_path)
    assert (rows["jemalloc"]["n"], rows["jemalloc"]["n_failed"]) == ("1", "2")
    counted = [r for r in runs if r["allocator"] == "jemalloc" and not r["warmup"] and r["status"] == "ok"]
    assert float(rows["jemalloc"]["gen_latency_s"]) == pytest.approx(counted[0]["gen_latency_s"], rel=1e-5)
    assert _line(tmp_path, "- 2 run(s) failed and were not counted: ") == (
        f"- 2 run(s) failed and were not counted: {unverified['failure']}; probe exited with code 1")
    assert "nan" not in result.stdout


def test_every_run_of_the_first_round_failing_ends_the_experiment(tmp_path: Path) -> None:
    runner = ReplayRunner(SINGLE, faults={("glibc", 0): FAIL, ("jemalloc", 0): FAIL})
    records = alloc.execute(_config(runner, TWO, runs=3), runner, ResultsDir(tmp_path))
    assert len(runner.requests) == 2 and [r.status for r in records] == ["failed", "failed"]
    result = _report(tmp_path)
    assert result.exit_code == 1 and not (tmp_path / SUMMARY_FILE).exists()
    assert result.stderr.strip() == (f"error: {tmp_path} holds no measured runs: 2 warm-up runs failed "
                                     "(probe exited with code 1)")


# --- Ctrl-C, a sibling abort, --resume ------------------------------------------------------------------
def test_ctrl_c_mid_run_keeps_every_run_and_resume_runs_only_what_is_left(tmp_path: Path) -> None:
    runner = ReplayRunner(SINGLE, faults={("jemalloc", 1): INTERRUPT})
    config = _config(runner, TWO, runs=2)
    with pytest.raises(KeyboardInterrupt):
        alloc.execute(config, runner, ResultsDir(tmp_path), environment=_environment("first"))
    kept = (tmp_path / alloc.RUNS_FILE).read_text().splitlines()
    assert [(r["round"], r["allocator"]) for r in map(json.loads, kept)] == [
        (-1, "jemalloc"), (-1, "glibc"), (0, "glibc")]

    other = dataclasses.replace(config, warm_gens=3)
    with pytest.raises(ResultsError, match="warm_gens: 8 in the experiment, 3 now"):
        alloc.execute(other, ReplayRunner(SINGLE), ResultsDir(tmp_path), resume=True)

    resumed = ReplayRunner(SINGLE)
    alloc.execute(config, resumed, ResultsDir(tmp_path), resume=True, environment=_environment("second"))
    lines = (tmp_path / alloc.RUNS_FILE).read_text().splitlines()
    assert lines[:3] == kept, "nothing already written changes"
    runs = [json.loads(line) for line in lines]
    assert [(r["round"], r["allocator"]) for r in runs[3:]] == [(0, "jemalloc"), (1, "jemalloc"), (1, "glibc")]
    assert [r.allocator.name for r in resumed.requests] == ["jemalloc", "jemalloc", "glibc"]
    assert [r["run_index"] for r in runs] == list(range(6))
    assert json.loads((tmp_path / "environment.json").read_text())["host"]["hostname"] == "first"
    assert json.loads((tmp_path / "environment.resume-1.json").read_text())["host"]["hostname"] == "second"


def _interrupt_once(runner: ReplayRunner, requests: int) -> threading.Thread:
    """Ctrl-C to this process once the runner has `requests` requests in flight or done."""
    def watch() -> None:
        deadline = time.monotonic() + 30
        while len(runner.requests) < requests and time.monotonic() < deadline:
            time.sleep(0.005)
        if len(runner.requests) >= requests:  # else the blocked probes time out and the test fails on its own
            os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_ctrl_c_during_a_pair_kills_both_probes_and_keeps_the_pairs_before(tmp_path: Path) -> None:
    runner = ReplayRunner(PAIRED, faults={("glibc", 1): BLOCK, ("tcmalloc", 0): BLOCK})
    config = _config(runner, FOUR, runs=1, warmup_runs=0, paired=True, placements=HALVES)
    watcher = _interrupt_once(runner, 4)
    with pytest.raises(KeyboardInterrupt):
        alloc.execute(config, runner, ResultsDir(tmp_path))
    watcher.join()
    assert runner.released == [True, True], "both probes of the pair were killed, neither ran to its end"
    assert [(r["pair"], r["allocator"]) for r in _runs(tmp_path)] == [("jemalloc", "glibc"), ("jemalloc", "jemalloc")]


def test_a_failing_probe_kills_its_sibling_at_once(tmp_path: Path) -> None:
    """--paired: when one probe of a pair fails, the other is killed then and there, not waited for."""
    runner = ReplayRunner(PAIRED, faults={("glibc", 3): BLOCK, ("tcmalloc", 1): RUNNER_ERROR})
    config = _config(runner, FOUR, runs=2, warmup_runs=0, paired=True, placements=HALVES)
    with pytest.raises(RunnerError, match="the runner failed during tcmalloc run 1"):
        alloc.execute(config, runner, ResultsDir(tmp_path))
    assert runner.released == [True]
    runs = _runs(tmp_path)
    assert len(runs) == 6 and {r["round"] for r in runs} == {0}, "the pairs before are kept, the broken one is not"


def test_resume_after_a_cut_last_line_loses_nothing(tmp_path: Path) -> None:
    """A crash cut the last line of runs.jsonl: --resume runs that run again on a line of its own, keeps
    the cut line, and `harness report` says which line it skipped."""
    runner = ReplayRunner(SINGLE)
    config = _config(runner, TWO, runs=2)
    alloc.execute(config, runner, ResultsDir(tmp_path))
    runs_file = tmp_path / alloc.RUNS_FILE
    lines = runs_file.read_text().splitlines()
    cut = lines[-1][: len(lines[-1]) // 2]
    runs_file.write_text("\n".join([*lines[:-1], cut]))  # killed mid-write: no newline either
    results = ResultsDir(tmp_path)
    again = ReplayRunner(SINGLE)
    alloc.execute(config, again, results, resume=True)
    assert results.skipped_lines(alloc.RUNS_FILE) == [len(lines)]
    after = runs_file.read_text().splitlines()
    assert after[: len(lines)] == [*lines[:-1], cut], "nothing already written is lost"
    redone = [json.loads(line) for line in after[len(lines):]]
    last = json.loads(lines[-1])
    assert [(r["round"], r["allocator"]) for r in redone] == [(last["round"], last["allocator"])]
    assert [r.allocator.name for r in again.requests] == [last["allocator"]]

    result = _report(tmp_path)
    assert result.exit_code == 0, result.output
    assert f"{runs_file} line {len(lines)}: not a whole JSON record" in result.stderr
    assert {name: row["n"] for name, row in _csv(tmp_path).items()} == {"glibc": "2", "jemalloc": "2"}
    assert "nan" not in result.stdout


# --- stopping on precision or on time ---------------------------------------------------------------
def _half_width(runs: list[dict[str, Any]], upto: int) -> float:
    """jemalloc's ratio-CI half-width against glibc on ITL p25, from the measured runs of rounds <= upto."""
    mine = [r for r in runs if r["round"] <= upto]
    return stats.compare(_measured(mine, "jemalloc"), _measured(mine, "glibc")).half_width


def _stopper(tmp_path: Path, rule: StopRule, clock: FakeClock) -> AllocStopper:
    return AllocStopper(rule, ResultsDir(tmp_path), TWO, warmup_rounds=1, clock=clock)


def test_target_reached_stops_after_the_round_that_reached_it(tmp_path: Path) -> None:
    clock = FakeClock()
    runner = ReplayRunner(SINGLE, clock=clock)
    rule = StopRule(target=0.10, metric="itl_p25", min_rounds=3, max_rounds=20)
    config = _config(runner, TWO, runs=3, target_ci=0.10)
    alloc.execute(config, runner, ResultsDir(tmp_path), stopper=_stopper(tmp_path, rule, clock))
    runs = _runs(tmp_path)
    events = ResultsDir(tmp_path).read_jsonl(STOP_FILE)
    checks, stop = events[:-1], events[-1]
    last = max(r["round"] for r in runs)
    assert stop["event"] == "stop" and stop["reason"] == "target" and stop["round"] == last < 19
    assert [c["round"] for c in checks] == list(range(2, last + 1)), "one check a round from round 3 on"
    for check in checks:  # each check is recomputable from the runs up to its round
        assert check["widest"] == pytest.approx(_half_width(runs, check["round"]))
        assert check["reached"] == (check["round"] == last)
    assert stop["widest"] == pytest.approx(_half_width(runs, last)) and stop["widest"] <= 0.10
    assert len(runs) == 2 * (last + 2), "no run after the round that reached the target"

    result = _report(tmp_path)
    assert result.exit_code == 0, result.output
    assert _line(tmp_path, "- Stopping — ").startswith(
        f"- Stopping — stopped because the precision target was reached, after {last + 1} measured round(s)")
    assert f"widest ratio CI ±{stop['widest'] * 100:.1f} % against a target of ±10 %" in _line(tmp_path, "- Stopping")


def test_time_up_starts_no_run_that_would_likely_end_after_it(tmp_path: Path) -> None:
    """--max-time alone: rounds until the next run would likely end after the deadline (each run's wall
    time, as replayed, moves the clock); a run in flight is never cut."""
    clock = FakeClock()
    runner = ReplayRunner(SINGLE, clock=clock)
    rule = StopRule(target=None, metric="itl_p25", max_time_s=200.0, min_rounds=2)
    stopper = _stopper(tmp_path, rule, clock)
    alloc.execute(_config(runner, TWO, runs=2), runner, ResultsDir(tmp_path), stopper=stopper)
    runs = _runs(tmp_path)
    walls = [r["wall_real_s"] for r in runs]
    assert runner.started == [sum(walls[:i]) for i in range(len(runs))]
    for i in range(1, len(runs)):  # each run started when the runs before said it would end in time
        assert runner.started[i] + statistics.median(walls[:i]) <= 200.0
    stop = ResultsDir(tmp_path).read_jsonl(STOP_FILE)[-1]
    assert stop["reason"] == "time" and stop["elapsed_s"] == pytest.approx(sum(walls))
    left_in_round = 2 if len(runs) % 2 == 0 else 1
    assert sum(walls) + left_in_round * statistics.median(walls) > 200.0, "it stopped while a run still fitted"

    result = _report(tmp_path)
    assert result.exit_code == 0, result.output
    assert _line(tmp_path, "- Stopping — ").startswith("- Stopping — stopped because the time was up")
    assert "--max-time 3m20s" in _line(tmp_path, "- Stopping")


def test_ctrl_c_in_an_open_ended_experiment_records_why_it_stopped(tmp_path: Path) -> None:
    clock = FakeClock()
    runner = ReplayRunner(SINGLE, clock=clock, faults={("glibc", 3): INTERRUPT})
    rule = StopRule(target=0.01, metric="itl_p25", min_rounds=2, max_rounds=20)
    with pytest.raises(KeyboardInterrupt):
        alloc.execute(_config(runner, TWO, runs=2, target_ci=0.01), runner, ResultsDir(tmp_path),
                      stopper=_stopper(tmp_path, rule, clock))
    stop = ResultsDir(tmp_path).read_jsonl(STOP_FILE)[-1]
    assert stop["event"] == "stop" and stop["reason"] == "interrupted" and stop["rounds"] == 2
    result = _report(tmp_path)
    assert result.exit_code == 0, result.output
    assert "stopped because it was interrupted (continue with --resume)" in _line(tmp_path, "- Stopping")


# --- the answer: a clear win, no difference, or inconclusive ----------------------------------------
def _answer(tmp_path: Path, runner: ReplayRunner, runs: int, **kw: Any) -> tuple[str, list[dict[str, Any]]]:
    alloc.execute(_config(runner, TWO, runs=runs, **kw), runner, ResultsDir(tmp_path))
    result = _report(tmp_path)
    assert result.exit_code == 0, result.output
    return _line(tmp_path, "- Answer — ").removeprefix("- Answer — "), _runs(tmp_path)


def test_verdict_a_clear_win(tmp_path: Path) -> None:
    """jemalloc's replayed decode steps 30 % shorter than recorded, on real run-to-run noise."""
    line, runs = _answer(tmp_path, ReplayRunner(SINGLE, slower={"jemalloc": 0.7}), runs=8)
    ratio = np.median(_measured(runs, "jemalloc")) / np.median(_measured(runs, "glibc"))
    assert line.startswith(f"jemalloc helped decode step (ITL p25) by {(1 - ratio) * 100:.1f} % vs glibc (CI "), line
    assert line.endswith(", n = 8/8)"), line
    head = (tmp_path / SUMMARY_FILE).read_text().splitlines()[2]
    assert head.startswith("- jemalloc helped generation latency by "), head


def test_verdict_no_difference(tmp_path: Path) -> None:
    """22 rounds recorded on an H100: the CI is narrower than the ±10 % asked, and lies across 1."""
    line, runs = _answer(tmp_path, ReplayRunner(SINGLE), runs=22, target_ci=0.10)
    comp = stats.compare(_measured(runs, "jemalloc"), _measured(runs, "glibc"))
    assert not comp.significant and comp.half_width <= 0.10
    bound = max(abs(comp.ratio_ci_low - 1), abs(comp.ratio_ci_high - 1)) * 100
    assert line == (f"jemalloc vs glibc, decode step (ITL p25): no change beyond ±{bound:.1f} % (ratio "
                    f"{comp.ratio:.3f}, 95 % CI {(comp.ratio_ci_low - 1) * 100:+.1f} % to "
                    f"{(comp.ratio_ci_high - 1) * 100:+.1f} %, n = 22/22).")


def test_verdict_inconclusive_names_the_runs_an_answer_needs(tmp_path: Path) -> None:
    """4 rounds on that H100's noise: no verdict, but the spread and what a ±3 % answer would cost."""
    line, runs = _answer(tmp_path, ReplayRunner(SINGLE), runs=4)
    ok = [r for r in runs if not r["warmup"]]
    medians = {name: np.median(_measured(ok, name)) for name in TWO}
    spread = float(np.std([math.log(r["itl_p25_s"] / medians[r["allocator"]]) for r in ok], ddof=1))
    need = runs_for(spread, 0.03)
    minutes = math.ceil(need * 2 * statistics.median(r["wall_real_s"] for r in ok) / 60)
    assert line == (f"jemalloc vs glibc, decode step (ITL p25): inconclusive on this host: run-to-run spread "
                    f"{spread * 100:.1f} %, a ±3 % answer needs about {need} runs per allocator ({minutes} minutes).")
