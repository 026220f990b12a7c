"""Fast tier: the duet design's orchestration, statistics and reports on persistent probes that answer from a
drifting host model (tests/fakes.py SessionRunner), so that a known effect and a known A/A can be checked.
The real tier (test_duet.py) runs the same code on real probe processes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from fakes import DIE, HANG, INTERRUPT, WRONG_LIBRARY, FakeClock, SessionRunner

from harness.alloc import duet, duet_command, duet_report
from harness.alloc import run as alloc
from harness.alloc.stopping import DuetStopper
from harness.cli import main
from harness.errors import HarnessError
from harness.measure import stats
from harness.measure.records import AllocSet, AllocWindow, Environment
from harness.measure.results import ResultsDir
from harness.measure.stopping import StopRule
from harness.probe import protocol

pytestmark = pytest.mark.fast

CPUS = tuple(range(8))


def _config(runner: SessionRunner, names: list[str], sets: int = 3, steps: int = 6, **kw: Any) -> alloc.AllocConfig:
    return alloc.AllocConfig(model="synthetic:phi3-mini", device="cuda", allocators=runner.resolve_allocators(
        names, {}, {}), runs=1, warm_gens=1, max_new_tokens=32, runner=runner.name, design="duet", sets=sets,
        windows_per_set=steps, window_gens=1, affinity=CPUS, **kw)


def _run(config: alloc.AllocConfig, runner: SessionRunner, out: Path, resume: bool = False,
         stopper: Any = None) -> list[AllocSet]:
    results = ResultsDir(out)
    existing = alloc.prepare_dir(results, config, resume, duet.SETS_FILE, AllocSet)
    hooks = duet.DuetHooks(environment=alloc.environment_file(results, resume))
    return duet.execute(config, runner, results, existing, Environment(host={"hostname": "fake"}), hooks, stopper)


def _windows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / duet.WINDOWS_FILE).read_text().splitlines()]


def _loaded(out: Path) -> duet_report.Duet:
    loaded = duet_report.Duet.load(ResultsDir(out))
    assert loaded is not None
    return loaded


# --- schedule -----------------------------------------------------------------------------------------
def test_steps_alternate_who_goes_first_and_roles_rotate_across_sets(tmp_path: Path) -> None:
    runner = SessionRunner()
    config = _config(runner, ["glibc", "jemalloc"], sets=4, steps=4)
    sets = _run(config, runner, tmp_path)
    assert [s.status for s in sets] == ["ok"] * 4
    windows = _windows(tmp_path)
    for set_index in range(4):
        mine = [w for w in windows if w["set_index"] == set_index]
        firsts = [w["arm"] for w in mine if w["position"] == 0]
        # ABBA...: the first of each step alternates, and set by set the first step's order rotates
        expected = [["glibc", "jemalloc"][(set_index + step) % 2] for step in range(-1, 4)]
        assert firsts == expected
        assert [w["step"] for w in mine if w["arm"] == "glibc"] == [-1, 0, 1, 2, 3]
        assert all(w["warmup"] == (w["step"] < 0) for w in mine)
    starts = [[runner.requests[2 * s + i].allocator.name for i in range(2)] for s in range(4)]
    assert starts == [["glibc", "jemalloc"], ["jemalloc", "glibc"]] * 2  # start order rotates every set
    cpus = [{r.allocator.name: r.placement.cpus for r in runner.requests[2 * s:2 * s + 2]} for s in range(4)]
    for placement in cpus:
        assert not set(placement["glibc"]) & set(placement["jemalloc"])  # disjoint CPU sets in a set
    assert [c["glibc"] for c in cpus] == [CPUS[:4], CPUS[:4], CPUS[4:], CPUS[4:]]  # and rotated every 2 sets
    for record in sets:
        assert all(arm["verified"] and arm["pid"] for arm in record.arms)
    assert all(s.closed for s in runner.sessions)


def test_three_arms_rotate_so_each_goes_first_equally(tmp_path: Path) -> None:
    runner = SessionRunner()
    config = _config(runner, ["glibc", "jemalloc", "tcmalloc"], sets=3, steps=6)
    _run(config, runner, tmp_path)
    firsts = [w["arm"] for w in _windows(tmp_path) if w["position"] == 0 and not w["warmup"]]
    assert {name: firsts.count(name) for name in set(firsts)} == {"glibc": 6, "jemalloc": 6, "tcmalloc": 6}


def test_shared_placement_puts_every_probe_on_every_cpu(tmp_path: Path) -> None:
    runner = SessionRunner()
    config = _config(runner, ["glibc", "jemalloc"], sets=1, steps=2, cpu_placement="shared")
    _run(config, runner, tmp_path)
    assert {r.placement.cpus for r in runner.requests} == {CPUS}


# --- statistics ---------------------------------------------------------------------------------------
def test_a_known_effect_is_recovered_on_a_drifting_host(tmp_path: Path) -> None:
    runner = SessionRunner(effects={"jemalloc": 0.97}, slow=1.3)
    config = _config(runner, ["glibc", "jemalloc"], sets=4, steps=30)
    _run(config, runner, tmp_path)
    comp = _loaded(tmp_path).comparison("jemalloc", "itl_p25_s")
    assert comp.n_sets == 4 and comp.n_candidate == 120
    assert comp.ratio_ci_low < 0.97 < comp.ratio_ci_high
    assert comp.half_width < 0.01  # slow stretches of +30 % cancel out of adjacent windows
    assert comp.significant


def test_an_a_a_on_a_drifting_host_finds_no_bias(tmp_path: Path) -> None:
    runner = SessionRunner(slow=1.3, seed=3)
    config = _config(runner, ["glibc"], sets=4, steps=20, calibration=True)
    _run(config, runner, tmp_path)
    loaded = _loaded(tmp_path)
    assert loaded.labels == ["glibc", "glibc#2"]
    cal = duet_report.calibration_result(loaded)
    assert cal["passes"] and cal["sets"] == 4
    assert "its CI includes no bias" in duet_report.calibration_line(loaded)


def test_compare_sets_is_a_t_interval_over_the_sets_estimates() -> None:
    rng = np.random.default_rng(7)
    sets = [rng.normal(mu, 0.02, 25) for mu in (-0.03, -0.01, -0.05)]
    comp = stats.compare_sets(sets)
    estimates = [float(np.median(s)) for s in sets]
    se = np.std(estimates, ddof=1) / math.sqrt(3)
    t = 4.302652729911275  # t(0.975, 2)
    assert comp.ratio == pytest.approx(math.exp(np.mean(estimates)))
    assert comp.ratio_ci_low == pytest.approx(math.exp(np.mean(estimates) - t * se))
    assert comp.ratio_ci_high == pytest.approx(math.exp(np.mean(estimates) + t * se))
    assert comp.set_ratios == pytest.approx(tuple(math.exp(e) for e in estimates))
    assert comp.limiting == "between sets"  # the sets differ by far more than their own noise explains
    one = stats.compare_sets(sets[:1])
    assert one.n_sets == 1 and math.isnan(one.between_sd) and one.limiting is None


# --- faults -------------------------------------------------------------------------------------------
def test_a_probe_that_dies_ends_its_set_which_is_recorded_and_never_counted(tmp_path: Path) -> None:
    runner = SessionRunner(faults={(1, 3): DIE})  # set 1's jemalloc probe, at its fourth window
    config = _config(runner, ["glibc", "jemalloc"], sets=3, steps=4)
    sets = _run(config, runner, tmp_path)
    assert [s.status for s in sets] == ["failed", "ok", "ok"]
    assert sets[0].ended_by == "died" and "ended its output" in sets[0].failure
    assert all(s.killed.is_set() for s in runner.sessions[:2])  # its sibling is killed, not asked to stop
    kept = [w for w in _windows(tmp_path) if w["set_index"] == 0]
    assert kept  # the windows it measured are on disk
    assert {w.set_index for w in _loaded(tmp_path).counted} == {1, 2}


def test_a_probe_that_hangs_fails_its_set(tmp_path: Path) -> None:
    runner = SessionRunner(faults={(0, 0): HANG})
    sets = _run(_config(runner, ["glibc", "jemalloc"], sets=2, steps=2), runner, tmp_path)
    assert [s.status for s in sets] == ["failed", "ok"]
    assert "no answer within" in sets[0].failure


def test_an_unverified_allocator_fails_its_set_before_any_window(tmp_path: Path) -> None:
    runner = SessionRunner(faults={(2, "ready"): WRONG_LIBRARY})  # set 1 starts jemalloc first
    sets = _run(_config(runner, ["glibc", "jemalloc"], sets=3, steps=2), runner, tmp_path)
    assert [s.status for s in sets] == ["ok", "failed", "ok"]
    assert sets[1].ended_by == "verification"
    assert "jemalloc" in sets[1].failure and "was not loaded" in sets[1].failure
    assert not [w for w in _windows(tmp_path) if w["set_index"] == 1]
    assert [a["verified"] for a in sets[1].arms] == [True, False]


def test_a_first_set_that_is_not_verified_ends_the_experiment(tmp_path: Path) -> None:
    runner = SessionRunner(faults={(1, "ready"): WRONG_LIBRARY})
    sets = _run(_config(runner, ["glibc", "jemalloc"], sets=3, steps=2), runner, tmp_path)
    assert len(sets) == 1 and sets[0].status == "failed" and sets[0].ended_by == "verification"
    assert len(runner.sessions) == 2


def test_run_duet_exits_1_naming_the_failed_sets(tmp_path: Path) -> None:
    runner = SessionRunner(faults={(1, 3): DIE})
    config = _config(runner, ["glibc", "jemalloc"], sets=3, steps=3)
    with pytest.raises(HarnessError) as err:
        duet_command.run_duet(config, runner, ResultsDir(tmp_path), False, Environment(), None)
    assert err.value.exit_code == 1 and "1 of 3 sets failed" in str(err.value)
    summary = (tmp_path / duet_report.SUMMARY_FILE).read_text()
    assert "Failed — 1 of 3 sets failed and were not counted" in summary


def test_ctrl_c_keeps_every_window_and_resume_goes_on_with_a_new_set(tmp_path: Path) -> None:
    runner = SessionRunner(faults={(2, 4): INTERRUPT})  # set 1, mid-way
    config = _config(runner, ["glibc", "jemalloc"], sets=3, steps=4)
    with pytest.raises(KeyboardInterrupt):
        _run(config, runner, tmp_path)
    recorded = ResultsDir(tmp_path).read_records(duet.SETS_FILE, AllocSet)
    assert [(s.set_index, s.status) for s in recorded] == [(0, "ok"), (1, "interrupted")]
    before = len(_windows(tmp_path))
    assert all(s.killed.is_set() for s in runner.sessions[2:4])
    resumed = SessionRunner()
    sets = _run(config, resumed, tmp_path, resume=True)
    assert [s.set_index for s in sets] == [0, 1, 2]
    assert len(_windows(tmp_path)) == before + 2 * 5
    assert (tmp_path / "environment.resume-1.json").exists()


def test_resume_starts_after_a_set_whose_record_never_came(tmp_path: Path) -> None:
    """SIGKILL of the harness mid-set: windows without their set record are kept and not counted."""
    runner = SessionRunner()
    config = _config(runner, ["glibc", "jemalloc"], sets=2, steps=2)
    _run(config, runner, tmp_path)
    results = ResultsDir(tmp_path)
    orphan = AllocWindow(set_index=2, step=0, position=0, arm="glibc", allocator="glibc", gens=1, itl_p25_s=0.02)
    results.append_record(duet.WINDOWS_FILE, orphan)
    sets = _run(alloc.AllocConfig(**{**config.__dict__, "sets": 4}), SessionRunner(), tmp_path, resume=True)
    assert [s.set_index for s in sets] == [0, 1, 3]
    assert 2 not in {w.set_index for w in _loaded(tmp_path).counted}


# --- stopping -----------------------------------------------------------------------------------------
def test_target_stops_after_the_set_that_reached_it(tmp_path: Path) -> None:
    clock = FakeClock()
    runner = SessionRunner(effects={"jemalloc": 0.95}, clock=clock)
    config = _config(runner, ["glibc", "jemalloc"], sets=2, steps=20, target_ci=0.02)
    rule = StopRule(target=0.02, metric="itl_p25", max_time_s=None, min_rounds=2, max_rounds=8)
    stopper = DuetStopper(rule, ResultsDir(tmp_path), ["glibc", "jemalloc"], warmup_rounds=0,
                          arms=["glibc", "jemalloc"], baseline="glibc", clock=clock)
    sets = _run(config, runner, tmp_path, stopper=stopper)
    events = [json.loads(line) for line in (tmp_path / duet_report.STOP_FILE).read_text().splitlines()]
    assert events[-1]["event"] == "stop" and events[-1]["reason"] == "target"
    checks = [e for e in events if e["event"] == "check"]
    assert checks[0]["round"] == 1  # first checked once two sets are in
    assert len(sets) == events[-1]["round"] + 1 and checks[-1]["reached"]
    assert not any(c["reached"] for c in checks[:-1])
    comp = _loaded(tmp_path).comparison("jemalloc", "itl_p25_s")
    assert comp.half_width == pytest.approx(checks[-1]["widest"])  # recomputable from windows.jsonl


def test_time_up_ends_the_set_in_flight_between_steps(tmp_path: Path) -> None:
    clock = FakeClock()
    runner = SessionRunner(clock=clock, step_s=0.05)  # a window: 1.6 s of the fake clock
    config = _config(runner, ["glibc", "jemalloc"], sets=2, steps=40)
    rule = StopRule(target=None, metric="itl_p25", max_time_s=60.0, min_rounds=2)
    stopper = DuetStopper(rule, ResultsDir(tmp_path), ["glibc", "jemalloc"], warmup_rounds=0,
                          arms=["glibc", "jemalloc"], baseline="glibc", clock=clock)
    sets = _run(config, runner, tmp_path, stopper=stopper)
    assert len(sets) == 1 and sets[0].ended_by == "time" and 0 < sets[0].steps < 40
    assert clock() <= 60.0 + 2 * 1.6 * 1.4
    stop = [json.loads(line) for line in (tmp_path / duet_report.STOP_FILE).read_text().splitlines()][-1]
    assert stop["reason"] == "time"


# --- records, protocol, reports -----------------------------------------------------------------------
def test_set_and_window_records_round_trip(tmp_path: Path) -> None:
    runner = SessionRunner()
    _run(_config(runner, ["glibc", "jemalloc"], sets=1, steps=2), runner, tmp_path)
    for name, cls in ((duet.SETS_FILE, AllocSet), (duet.WINDOWS_FILE, AllocWindow)):
        lines = (tmp_path / name).read_text().splitlines()
        for line in lines:
            assert cls.load(json.loads(line)).to_dict() == json.loads(line)


def test_protocol_refuses_what_it_cannot_measure() -> None:
    for bad in ({"window": 0}, {"window": 0, "gens": 1, "seconds": 1.0}, {"window": 0, "seconds": float("nan")},
                {"window": 0, "seconds": float("inf")}, {"window": 0, "gens": 0}, {"window": 0, "gens": "2"}):
        with pytest.raises(protocol.ProtocolError):
            protocol.WindowRequest(**bad)
    assert protocol.WindowRequest.parse('{"window": 3, "gens": 2}') == protocol.WindowRequest(3, gens=2)
    assert protocol.parse_marked("a warning from a library") is None
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_marked(protocol.WINDOW_MARKER + '{"window": 1')  # cut short: an error, never dropped
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_marked(protocol.WINDOW_MARKER + '{"window": 1}')  # fields missing
    assert protocol.parse_marked(protocol.ERROR_MARKER + '{"error": "boom"}') == ("error", "boom")


def test_report_rebuilds_the_summary_unchanged(tmp_path: Path) -> None:
    runner = SessionRunner(effects={"jemalloc": 0.97})
    config = _config(runner, ["glibc", "jemalloc"], sets=3, steps=5)
    duet_command.run_duet(config, runner, ResultsDir(tmp_path), False, Environment(), None)
    summary = (tmp_path / duet_report.SUMMARY_FILE).read_text()
    assert "Precision — " in summary and "Variance — " in summary and "Design — duet" in summary
    assert (tmp_path / duet_report.RATIO_PLOT_FILE).stat().st_size > 10_000
    (tmp_path / duet_report.SUMMARY_FILE).unlink()
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / duet_report.SUMMARY_FILE).read_text() == summary


def test_the_summary_quotes_the_calibration_beside_it(tmp_path: Path) -> None:
    runner = SessionRunner(seed=5)
    calibration = _config(runner, ["glibc"], sets=2, steps=6, calibration=True)
    duet_command.run_duet(calibration, runner, ResultsDir(tmp_path / duet_report.CALIBRATION_DIR), False,
                          Environment(), None)
    runner = SessionRunner(effects={"jemalloc": 0.9})
    duet_command.run_duet(_config(runner, ["glibc", "jemalloc"], sets=2, steps=6), runner, ResultsDir(tmp_path),
                          False, Environment(), None)
    summary = (tmp_path / duet_report.SUMMARY_FILE).read_text()
    assert "Calibration — A/A (glibc against itself as glibc#2, 2 sets" in summary


def test_precision_line_never_contradicts_itself(tmp_path: Path) -> None:
    runner = SessionRunner(slow=2.0, seed=11)
    _run(_config(runner, ["glibc", "jemalloc"], sets=2, steps=3), runner, tmp_path)
    loaded = _loaded(tmp_path)
    line = duet_report.precision_line(loaded, 0.03)
    half = loaded.comparison("jemalloc", "itl_p25_s").half_width
    assert (f"±{half * 100:.1f} %" in line) and (("within the ±3 % target" in line) == (half <= 0.03))


def test_fewer_cpus_than_arms_share_the_cpus_asked_for(tmp_path: Path) -> None:
    runner = SessionRunner()
    config = alloc.AllocConfig(**{**_config(runner, ["glibc", "jemalloc", "tcmalloc"], sets=1, steps=1).__dict__,
                                  "affinity": (3, 5)})
    _run(config, runner, tmp_path)
    assert {r.placement.cpus for r in runner.requests} == {(3, 5)}  # --affinity is kept, never dropped
    assert "fewer CPUs than arms" in duet_report.design_line(_loaded(tmp_path))


def test_a_cut_last_window_line_is_skipped_and_resume_goes_on(tmp_path: Path) -> None:
    """A crash mid-append leaves half a line: the windows before it still load, the report says so, and
    --resume appends after it without losing or miscounting anything."""
    runner = SessionRunner()
    config = _config(runner, ["glibc", "jemalloc"], sets=1, steps=3)
    _run(config, runner, tmp_path)
    before = len(_windows(tmp_path))
    with open(tmp_path / duet.WINDOWS_FILE, "a") as fh:
        fh.write('{"schema": "alloc-window/1", "set_index": 1, "st')  # cut short
    results = ResultsDir(tmp_path)
    assert len(results.read_records(duet.WINDOWS_FILE, AllocWindow)) == before
    assert results.skipped_note(duet.WINDOWS_FILE)
    sets = _run(alloc.AllocConfig(**{**config.__dict__, "sets": 2}), SessionRunner(), tmp_path, resume=True)
    assert [s.set_index for s in sets] == [0, 1] and all(s.counted for s in sets)
    assert len(results.read_records(duet.WINDOWS_FILE, AllocWindow)) == before + 2 * 4
    assert {w.set_index for w in _loaded(tmp_path).counted} == {0, 1}
