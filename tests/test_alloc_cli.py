"""`harness alloc` end to end with the local runner: artifacts, interruption, resume, bad input."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest
from conftest import HARNESS, REPO, SEQUENTIAL, check_stopped_experiment, kill_left_behind, run_harness, wait_for

from harness.alloc import run as alloc
from harness.measure import stats

DONE_WHEN = [*SEQUENTIAL, "--runner", "local", "--model", "synthetic:tiny", "--allocators", "glibc,jemalloc",
             "--runs", "3", "--warm-gens", "2", "--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def alloc_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("alloc")
    proc = run_harness(*DONE_WHEN, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_writes_the_four_artifacts(alloc_dir):
    for rel in ("alloc/runs.jsonl", "alloc/allocator_latency_comparison.csv", "alloc/summary.md",
                "environment.json"):
        assert (alloc_dir / rel).stat().st_size > 0, rel


def test_every_run_verified_and_interleaved(alloc_dir):
    runs = [json.loads(line) for line in (alloc_dir / "alloc/runs.jsonl").read_text().splitlines()]
    measured = [r for r in runs if not r["warmup"]]
    assert len(measured) == 6 and len(runs) == 8  # one warm-up round by default
    assert all(r["status"] == "ok" and r["verified"] for r in runs)
    for r in runs:
        assert r["loaded_allocator"]["name"] == r["allocator"]
    assert [(r["round"], r["position"], r["allocator"]) for r in runs] == [  # the order rotates every round
        (-1, 0, "jemalloc"), (-1, 1, "glibc"), (0, 0, "glibc"), (0, 1, "jemalloc"),
        (1, 0, "jemalloc"), (1, 1, "glibc"), (2, 0, "glibc"), (2, 1, "jemalloc")]
    assert all(r["wall_real_s"] > r["gen_latency_s"] > 0 for r in measured)
    # what took CPU from each run while it measured, read inside the probe's own process
    assert all(0.0 <= r["steal_pct"] <= 100.0 and r["involuntary_switches"] >= 0 for r in measured)
    assert all(r["probe"]["cpu_affinity"] == sorted(os.sched_getaffinity(0)) for r in runs)


def test_csv_schema_and_values_come_from_the_runs(alloc_dir):
    with open(alloc_dir / "alloc/allocator_latency_comparison.csv") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames[:4] == ["allocator", "gen_latency_s", "wall_real_s", "rss_mb"]
        rows = {r["allocator"]: r for r in reader}
    assert set(rows) == {"glibc", "jemalloc"}
    runs = [json.loads(line) for line in (alloc_dir / "alloc/runs.jsonl").read_text().splitlines()]
    jem = sorted(r["gen_latency_s"] for r in runs if r["allocator"] == "jemalloc" and not r["warmup"])
    assert float(rows["jemalloc"]["gen_latency_s"]) == pytest.approx(jem[1], rel=1e-5)
    assert int(rows["jemalloc"]["n"]) == 3 and int(rows["jemalloc"]["n_failed"]) == 0
    assert "libjemalloc" in rows["jemalloc"]["library"]
    for col in ("ratio_vs_baseline", "ratio_ci_low", "ratio_ci_high", "p_value", "ttft_s", "tpot_s", "load_s"):
        assert rows["jemalloc"][col] != "", col


def test_summary_states_a_verdict_and_environment_is_complete(alloc_dir):
    summary = (alloc_dir / "alloc/summary.md").read_text()
    headline = summary.split("\n## ")[0]  # the 3-5 bullets the seed asks for, before the detail sections
    bullets = [line for line in headline.splitlines() if line.startswith("- ")]
    assert 3 <= len(bullets) <= 5
    assert "## How far to trust these figures" in summary and "- Noise — " in summary
    assert "while the runs measured" in summary and "hypervisor steal" in summary and "minor page faults" in summary
    runs = [json.loads(line) for line in (alloc_dir / "alloc/runs.jsonl").read_text().splitlines()]
    gen = {name: [r["gen_latency_s"] for r in runs if r["allocator"] == name and not r["warmup"]]
           for name in ("glibc", "jemalloc")}
    assert bullets[0] == "- " + stats.verdict("jemalloc", "glibc", stats.compare(gen["jemalloc"], gen["glibc"]),
                                              "generation latency")  # the verdict its own runs give
    answer = next(line for line in summary.splitlines() if line.startswith("- Answer — "))
    assert "inconclusive on this host: run-to-run spread" in answer or "no change beyond" in answer \
        or "helped" in answer or "hurt" in answer
    env = json.loads((alloc_dir / "environment.json").read_text())
    assert env["host"]["logical_cores"] >= 1 and env["host"]["kernel"]
    assert env["software"]["torch"] and env["software"]["transformers"]
    assert env["allocator_libraries"]["jemalloc"]["path"]
    assert "transparent_hugepages" in env["host"]


def test_rerun_into_the_same_directory_needs_resume(alloc_dir):
    before = {p.name: p.read_bytes() for p in (alloc_dir / "environment.json", alloc_dir / "alloc/config.json")}
    proc = run_harness(*DONE_WHEN, "--out", str(alloc_dir))
    assert proc.returncode == 2 and "--resume" in proc.stderr
    after = {p.name: p.read_bytes() for p in (alloc_dir / "environment.json", alloc_dir / "alloc/config.json")}
    assert after == before, "a refused invocation leaves the experiment's files as they were"


def test_interrupt_keeps_runs_and_resume_finishes(tmp_path):
    out = tmp_path / "interrupted"
    args = [*SEQUENTIAL, "--runner", "local", "--allocators", "glibc,jemalloc", "--runs", "2", "--warmup-runs", "0",
            "--warm-gens", "1", "--max-new-tokens", "4", "--out", str(out)]
    proc = subprocess.Popen([*HARNESS, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs_file = out / "alloc/runs.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (runs_file.exists() and runs_file.read_text().strip()):
        time.sleep(0.2)
    assert runs_file.exists(), "no run finished in time"
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, "a probe process was left behind"
    kept = runs_file.read_text().splitlines()
    assert 1 <= len(kept) < 4
    done = run_harness(*args, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    runs = [json.loads(line) for line in runs_file.read_text().splitlines()]
    assert len(runs) == 4 and kept == runs_file.read_text().splitlines()[: len(kept)]
    assert sorted((r["round"], r["allocator"]) for r in runs) == [
        (0, "glibc"), (0, "jemalloc"), (1, "glibc"), (1, "jemalloc")]
    first, resumed = (json.loads((out / name).read_text()) for name in ("environment.json",
                                                                         "environment.resume-1.json"))
    when = datetime.fromisoformat
    assert when(first["collected_at"]) <= when(runs[0]["started_at"])
    assert when(first["collected_at"]) < when(resumed["collected_at"]) <= when(runs[-1]["started_at"])


def test_failed_verification_is_recorded_and_exits_nonzero(tmp_path, tcmalloc_path):
    out = tmp_path / "wrong"
    proc = run_harness(*SEQUENTIAL, "--runner", "local", "--allocators", "glibc,jemalloc",
                       "--allocator-lib", f"jemalloc={tcmalloc_path}", "--runs", "1", "--warmup-runs", "0",
                       "--warm-gens", "1", "--max-new-tokens", "2", "--out", str(out))
    assert proc.returncode == 1
    assert tcmalloc_path in proc.stderr
    jemalloc_row = next(line for line in proc.stdout.splitlines() if line.startswith("jemalloc"))
    assert "nan" not in jemalloc_row and "–" in jemalloc_row, proc.stdout  # no figures for runs not counted
    runs = [json.loads(line) for line in (out / "alloc/runs.jsonl").read_text().splitlines()]
    bad = [r for r in runs if r["allocator"] == "jemalloc"]
    assert bad and all(r["status"] == "failed" and not r["verified"] for r in bad)
    with open(out / "alloc/allocator_latency_comparison.csv") as fh:
        rows = {r["allocator"]: r for r in csv.DictReader(fh)}
    assert rows["jemalloc"]["n"] == "0" and rows["jemalloc"]["n_failed"] == "1"
    assert rows["jemalloc"]["gen_latency_s"] == ""  # never a number for runs that did not count


@pytest.mark.parametrize("args, message", [
    (["--allocators", "glibc,hoard"], "unknown allocator 'hoard'"),
    (["--allocators", "glibc,jemalloc", "--allocator-lib", "jemalloc=/nonexistent/libjemalloc.so.2"],
     "does not exist"),
    (["--allocator-lib", "jemalloc"], "NAME=PATH"),
    (["--model", "synthetic:huge"], "unknown synthetic model"),
    (["--model", "./no/such/dir"], "unknown model"),
    (["--device", "cuda"], "no NVIDIA GPU is visible"),
    (["--device", "tpu"], "unknown --device"),
    (["--out", "/etc/hostname/results"], "cannot be written"),
    (["--affinity", "two"], "not a CPU list"),
    (["--affinity", "4096"], "CPU(s) 4096 not available here"),
    (["--paired", "--affinity", "0"], "--paired splits the host's CPUs itself"),
])
def test_bad_input_gives_one_clear_line(args, message, tmp_path):
    if "--device" in args and args[-1] == "cuda" and _has_gpu():
        pytest.skip("this host has a GPU")
    full = [*SEQUENTIAL, "--runner", "local", "--runs", "1", *args]
    if "--out" not in args:
        full += ["--out", str(tmp_path / "out")]
    proc = run_harness(*full, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "out" / "alloc" / "runs.jsonl").exists()


def _has_gpu() -> bool:
    from harness.measure.environment import gpus

    return bool(gpus().get("available"))


@pytest.mark.fast
def test_runs_jsonl_survives_a_truncated_last_line(tmp_path):
    from harness.measure.results import ResultsDir

    results = ResultsDir(tmp_path)
    results.append("alloc/runs.jsonl", {"a": 1})
    with open(tmp_path / "alloc/runs.jsonl", "a") as fh:
        fh.write('{"a": 2, "b"')  # killed mid-write
    assert results.read_jsonl("alloc/runs.jsonl") == [{"a": 1}]
    assert results.skipped_lines("alloc/runs.jsonl") == [2]
    results.append("alloc/runs.jsonl", {"a": 3})  # the next record starts on a line of its own
    assert results.read_jsonl("alloc/runs.jsonl") == [{"a": 1}, {"a": 3}]
    assert results.skipped_lines("alloc/runs.jsonl") == [2]
    assert '{"a": 2, "b"' in (tmp_path / "alloc/runs.jsonl").read_text()  # the cut line is kept, not erased


def test_local_runner_needs_no_docker_sdk(tmp_path):
    """GPU hosts often have torch but not the Docker SDK: `auto` falls back to local, `docker` says why."""
    blocked = ("import sys; sys.modules['docker'] = None; sys.argv[0] = 'harness'; "
               "from harness.cli import main; main()")
    cmd = [sys.executable, "-c", blocked]
    proc = subprocess.run([*cmd, *SEQUENTIAL, "--runner", "auto", "--model", "synthetic:tiny", "--allocators", "glibc",
                           "--runs", "1", "--warmup-runs", "0", "--warm-gens", "1", "--max-new-tokens", "4",
                           "--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "runner auto: local" in proc.stdout + proc.stderr
    run = json.loads((tmp_path / "a/alloc/runs.jsonl").read_text().splitlines()[0])
    assert run["runner"] == "local" and run["verified"]
    proc = subprocess.run([*cmd, "serve", "--runner", "docker", "--out", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "Docker SDK" in proc.stderr, proc.stderr[-2000:]


def test_paired_design_runs_pairs_side_by_side(tmp_path):
    """--paired: each jemalloc run starts with a glibc run, each pinned to its own half of the CPUs."""
    proc = run_harness(*SEQUENTIAL, "--runner", "local", "--paired", "--model", "synthetic:tiny",
                       "--allocators", "glibc,jemalloc", "--runs", "2", "--warmup-runs", "0", "--warm-gens", "2",
                       "--max-new-tokens", "8", "--threads", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(line) for line in (tmp_path / "alloc/runs.jsonl").read_text().splitlines()]
    assert len(runs) == 4 and all(r["verified"] for r in runs)
    by_index = {r["run_index"]: r for r in runs}
    for r in runs:
        partner = by_index[r["concurrent_with"]]
        assert partner["concurrent_with"] == r["run_index"] and {r["allocator"], partner["allocator"]} == {
            "glibc", "jemalloc"}
        assert r["started_at"] == partner["started_at"] and r["slot"] != partner["slot"]
        assert not set(r["placement"]["cpus"]) & set(partner["placement"]["cpus"])
    assert {r["slot"] for r in runs if r["allocator"] == "glibc"} == {0, 1}  # the sides swap between rounds
    summary = (tmp_path / "alloc/summary.md").read_text()
    assert "Paired design" in summary and "2 pairs" in summary
    proc = run_harness(*SEQUENTIAL, "--runner", "docker", "--paired", "--out", str(tmp_path / "x"))
    assert proc.returncode != 0 and "--runner local" in proc.stderr


def test_affinity_pins_every_run_and_is_part_of_the_experiment(tmp_path):
    """--affinity: every probe process runs only on the CPUs named, checked inside the process itself."""
    cpu = max(os.sched_getaffinity(0))
    args = [*SEQUENTIAL, "--runner", "local", "--model", "synthetic:tiny", "--allocators", "glibc,jemalloc",
            "--runs", "1", "--warmup-runs", "0", "--warm-gens", "1", "--max-new-tokens", "4", "--out", str(tmp_path)]
    proc = run_harness(*args, "--affinity", str(cpu))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(line) for line in (tmp_path / "alloc/runs.jsonl").read_text().splitlines()]
    assert len(runs) == 2 and all(r["verified"] for r in runs)
    assert all(r["placement"]["cpus"] == [cpu] and r["probe"]["cpu_affinity"] == [cpu] for r in runs)
    assert f"pinned to CPU {cpu}" in (tmp_path / "alloc/summary.md").read_text()
    # a resumed experiment keeps its pinning: continuing it unpinned would mix two set-ups
    proc = run_harness(*args, "--resume", timeout=120)
    assert proc.returncode == 2 and "different settings" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.fast
def test_a_run_that_escaped_its_cpus_fails_verification():
    from harness.alloc.runners.base import Placement
    from harness.measure.allocators import Allocator

    probe = {"allocator": {"name": "glibc", "malloc_library": "/usr/lib/x86_64-linux-gnu/libc.so.6"},
             "cpu_affinity": [0, 1]}
    glibc = Allocator(name="glibc", library=None)
    assert alloc.verify(glibc, probe) is None
    assert alloc.verify(glibc, probe, Placement(cpus=(0, 1))) is None
    assert "pinned to CPUs 2-3, but the probe process was allowed 0-1" in alloc.verify(
        glibc, probe, Placement(cpus=(2, 3)))


@pytest.mark.parametrize("text, cpus, canonical", [
    ("3", (3,), "3"), ("2-5,8", (2, 3, 4, 5, 8), "2-5,8"), ("8, 2-3,3", (2, 3, 8), "2-3,8"), ("0-0", (0,), "0")])
@pytest.mark.fast
def test_cpu_lists_read_and_write_like_taskset(text, cpus, canonical):
    from harness.alloc.runners.base import format_cpu_list, parse_cpu_list

    assert parse_cpu_list(text) == cpus and format_cpu_list(cpus) == canonical


@pytest.mark.parametrize("text", ["", ",", "a", "1-", "-1", "5-2", "1.5"])
@pytest.mark.fast
def test_cpu_lists_refuse_what_is_not_one(text):
    from harness.alloc.runners.base import parse_cpu_list

    with pytest.raises(ValueError, match="not a CPU list"):
        parse_cpu_list(text)


def test_report_recomputes_the_artifacts_from_the_runs(alloc_dir, tmp_path):
    """`harness report DIR` rebuilds CSV, summary and plots from runs.jsonl alone, and gives the same figures."""
    copy = tmp_path / "copy"
    (copy / "alloc").mkdir(parents=True)
    for name in ("runs.jsonl", "config.json"):
        (copy / "alloc" / name).write_bytes((alloc_dir / "alloc" / name).read_bytes())
    proc = run_harness("report", str(copy))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("allocator_latency_comparison.csv", "summary.md"):
        assert (copy / "alloc" / name).read_text() == (alloc_dir / "alloc" / name).read_text()
    assert (copy / "alloc/gen_latency.png").stat().st_size > 0 and (copy / "alloc/itl_trace.png").stat().st_size > 0
    summary = (copy / "alloc/summary.md").read_text()
    assert "Noise — run-to-run spread of gen_latency" in summary and "Precision — generation latency" in summary
    proc = run_harness("report", str(tmp_path / "empty"))
    assert proc.returncode != 0 and "holds no experiment" in proc.stderr


def _hosts_line(directory) -> str:
    proc = run_harness("report", str(directory))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return next(x for x in (directory / "alloc/summary.md").read_text().splitlines() if x.startswith("- Hosts"))


def test_report_tells_the_hosts_of_a_resumed_experiment_apart(alloc_dir, tmp_path):
    """Runs continued on another host (another environment file, another hostname): the summary gives each
    host's level of the steady decode step, from the runs that ran there. Each run names the environment
    file of its invocation, so a host whose clock is off is still told apart; older runs (alloc-run/1, no
    such name) are placed by the time each environment was collected."""
    runs = [json.loads(line) for line in (alloc_dir / "alloc/runs.jsonl").read_text().splitlines()]
    assert {r["schema"] for r in runs} == {"alloc-run/2"} and {r["environment"] for r in runs} == {"environment.json"}
    first = json.loads((alloc_dir / "environment.json").read_text())
    second = json.loads(json.dumps(first))
    second["host"]["hostname"] = first["host"]["hostname"] + "-other"
    resumed = {**runs[4], "environment": "environment.resume-1.json"}  # runs 4.. ran in the second invocation
    for name, shape, collected_at in (
            ("named", lambda i, r: {**r, "environment": "environment.resume-1.json"} if i >= 4 else r,
             "2000-01-01T00:00:00+00:00"),  # the second host's clock is far behind: the file name decides
            ("older", lambda i, r: {k: v for k, v in r.items() if k != "environment"} | {"schema": "alloc-run/1"},
             resumed["started_at"])):  # no file name: the runs after its collection belong to it
        copy = tmp_path / name
        (copy / "alloc").mkdir(parents=True)
        for rel in ("alloc/config.json", "environment.json"):
            (copy / rel).write_bytes((alloc_dir / rel).read_bytes())
        (copy / "alloc/runs.jsonl").write_text("".join(json.dumps(shape(i, r)) + "\n" for i, r in enumerate(runs)))
        (copy / "environment.resume-1.json").write_text(json.dumps({**second, "collected_at": collected_at}))
        line = _hosts_line(copy)
        assert "runs came from 2 hosts" in line, name
        for host, mine in ((first["host"]["hostname"], [r for r in runs[:4] if not r["warmup"]]),
                           (second["host"]["hostname"], runs[4:])):
            itl = sorted(r["itl_p25_s"] for r in mine)
            median = (itl[(len(itl) - 1) // 2] + itl[len(itl) // 2]) / 2
            assert f"{median * 1e3:.2f} ms on {host} ({len(mine)} runs)" in line, name
    summary = (alloc_dir / "alloc/summary.md").read_text()
    assert "- Hosts" not in summary, "one host: no host line"


def test_target_ci_stops_on_precision_or_time_and_resume_goes_on_towards_it(tmp_path):
    """--target-ci 50 --max-time: can stop either way on this host; the stop is recorded with the CI reached.
    --resume without --target-ci continues towards the saved target, with the saved measured window."""
    out = tmp_path / "target"
    args = [*SEQUENTIAL, "--runner", "local", "--model", "synthetic:tiny", "--allocators", "glibc,jemalloc",
            "--warmup-runs", "0", "--max-new-tokens", "8", "--out", str(out)]
    t0 = time.time()
    proc = run_harness(*args, "--target-ci", "50", "--max-time", "30s", "--measure-s", "0.5", "--runs", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = check_stopped_experiment(out, 0.5, 30, t0, time.time())
    last_line = proc.stdout.strip().splitlines()[-1]
    assert last_line.startswith("jemalloc") and ("inconclusive on this host" in last_line
                                                 or "no change beyond" in last_line or "by " in last_line)
    n_before = len((out / "alloc/runs.jsonl").read_text().splitlines())
    t0 = time.time()
    proc = run_harness(*args, "--resume", "--max-time", "60s", "--runs", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "alloc/config.json").read_text())
    assert config["config"]["target_ci"] == 0.5 and config["identity"]["measure_s"] == 0.5
    second = check_stopped_experiment(out, 0.5, 60, t0, time.time())
    runs = [json.loads(line) for line in (out / "alloc/runs.jsonl").read_text().splitlines()]
    if first["reason"] == "target":  # already there: the resumed invocation checks once and adds nothing
        assert second["reason"] == "target" and len(runs) == n_before
    # a different window is another experiment
    proc = run_harness(*args, "--resume", "--measure-s", "1", timeout=120)
    assert proc.returncode == 2 and "different settings" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--max-time", "soon"], "--max-time: not a duration: 'soon'"),
    (["--warm-gens", "2", "--measure-s", "1"], "give one of them"),
])
def test_bad_stopping_input_gives_one_clear_line(args, message, tmp_path):
    proc = run_harness(*SEQUENTIAL, "--runner", "local", "--runs", "1", *args, "--out", str(tmp_path / "o"),
                       timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


# --- faults: nothing lost, nothing left behind, nothing claimed that did not happen -------------------
def _probe_pids(harness: subprocess.Popen) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(harness.pid).children(recursive=True)
                if "harness.probe" in " ".join(c.cmdline())]
    except psutil.Error:
        return []


def _copy_experiment(src: Path, dst: Path) -> Path:
    (dst / "alloc").mkdir(parents=True)
    for name in ("alloc/runs.jsonl", "alloc/config.json", "environment.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_resume_after_a_cut_last_line_loses_nothing(alloc_dir, tmp_path):
    """A crash cut the last line of runs.jsonl: --resume runs that run again on a line of its own (not glued
    onto the cut one), keeps the cut line, and says which line it skipped."""
    out = _copy_experiment(alloc_dir, tmp_path / "cut")
    runs_file = out / "alloc/runs.jsonl"
    lines = runs_file.read_text().splitlines()
    runs_file.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    proc = run_harness(*DONE_WHEN, "--out", str(out), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{runs_file} line {len(lines)}" in proc.stderr and "skipped" in proc.stderr, proc.stderr[-2000:]
    kept = runs_file.read_text().splitlines()
    assert kept[: len(lines)] == [*lines[:-1], lines[-1][: len(lines[-1]) // 2]], "nothing already written is lost"
    runs = [json.loads(line) for line in kept[len(lines):]]
    assert len(runs) == 1 and runs[0]["status"] == "ok"
    assert (runs[0]["round"], runs[0]["allocator"]) == (json.loads(lines[-1])["round"],
                                                          json.loads(lines[-1])["allocator"])
    with open(out / "alloc/allocator_latency_comparison.csv") as fh:
        assert {r["allocator"]: r["n"] for r in csv.DictReader(fh)} == {"glibc": "3", "jemalloc": "3"}
    assert "nan" not in proc.stdout
    report = run_harness("report", str(out))
    assert report.returncode == 0 and "skipped" in report.stderr, report.stderr[-2000:]


def test_sigterm_to_alloc_kills_the_probe(tmp_path):
    """SIGTERM is handled like Ctrl-C: the probe process (its own session) is killed, runs kept, exit 130."""
    out = tmp_path / "term"
    proc = subprocess.Popen([*HARNESS, *SEQUENTIAL, "--runner", "local", "--allocators", "glibc", "--runs", "1",
                             "--warmup-runs", "0", "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    probes: list[int] = []
    try:
        probes = wait_for(lambda: _probe_pids(proc), 120, "the probe process")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        _, alive = psutil.wait_procs([psutil.Process(p) for p in probes if psutil.pid_exists(p)], timeout=10)
    finally:
        kill_left_behind(probes, proc)
    assert not alive, "the probe process was left behind"
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err


def test_a_directory_in_use_is_refused_with_one_line(tmp_path):
    """Two commands writing one results directory would count the same runs twice: the second is refused."""
    out = tmp_path / "busy"
    args = [*SEQUENTIAL, "--runner", "local", "--allocators", "glibc", "--runs", "1", "--warmup-runs", "0",
            "--warm-gens", "1", "--max-new-tokens", "2", "--out", str(out)]
    first = subprocess.Popen([*HARNESS, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / "alloc/config.json").exists(), 120, "the first command to start")
        second = run_harness(*args, "--resume", timeout=120)
        report = run_harness("report", str(out), timeout=120)
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    for refused in (second, report):
        lines = [line for line in refused.stderr.splitlines() if line.strip()]
        assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-2000:]
        assert lines[0].startswith("error: ") and f"in use by another harness command (PID {first.pid})" in lines[0]


@pytest.mark.fast
def test_default_out_directories_never_collide():
    """Two commands started in the same second get two directories."""
    from harness.measure.options import default_out

    first, second = default_out(), default_out()
    try:
        assert first != second and Path(first).is_dir() and Path(second).is_dir()
    finally:
        for d in {first, second}:
            with contextlib.suppress(OSError):
                os.rmdir(d)


def test_custom_allocator_name_verifies_against_its_library(jemalloc_path, tmp_path):
    """--allocators glibc,jebg --allocator-lib jebg=.../libjemalloc.so.2, as the help advertises: verified
    by the library it was given; --runner auto picks the local runner (no image has it) and says why."""
    proc = run_harness(*SEQUENTIAL, "--runner", "auto", "--allocators", "glibc,jebg", "--allocator-lib",
                       f"jebg={jemalloc_path}", "--runs", "1", "--warmup-runs", "0", "--warm-gens", "1",
                       "--max-new-tokens", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "runner auto: local" in proc.stderr and "jebg" in proc.stderr and "Traceback" not in proc.stderr
    runs = [json.loads(line) for line in (tmp_path / "alloc/runs.jsonl").read_text().splitlines()]
    jebg = next(r for r in runs if r["allocator"] == "jebg")
    assert jebg["verified"] and os.path.realpath(jebg["loaded_allocator"]["malloc_library"]) == os.path.realpath(
        jemalloc_path)


@pytest.mark.fast
def test_a_custom_name_fails_verification_when_another_library_was_loaded():
    from harness.measure.allocators import Allocator

    jebg = Allocator(name="jebg", library="/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    probe = {"allocator": {"name": "tcmalloc", "malloc_library": "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"}}
    assert "jebg library /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 was not loaded" in alloc.verify(jebg, probe)


def test_warm_gens_0_is_refused(tmp_path):
    """gen_latency_s is the median of the warm calls: with none it would silently be the cold call."""
    proc = run_harness(*SEQUENTIAL, "--runner", "local", "--warm-gens", "0", "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2 and "--warm-gens" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "alloc").exists()


def test_every_warm_up_run_failed_claims_no_files(tmp_path):
    """When every warm-up run fails no summary is written, and nothing says it was; `report` says why."""
    proc = run_harness(*SEQUENTIAL, "--runner", "local", "--allocators", "glibc,jemalloc", "--runs", "2",
                       "--timeout", "1", "--out", str(tmp_path), timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert not (tmp_path / "alloc/summary.md").exists()
    assert "wrote" not in proc.stdout + proc.stderr.replace("written", "")
    assert "every warm-up run failed" in proc.stderr and "timed out after 1 s" in proc.stderr
    report = run_harness("report", str(tmp_path), timeout=120)
    lines = [line for line in report.stderr.splitlines() if line.strip()]
    assert report.returncode == 1 and len(lines) == 1, report.stderr[-2000:]
    assert "no measured runs" in lines[0] and "2 warm-up runs failed" in lines[0] and "timed out" in lines[0]
    assert not (tmp_path / "alloc/summary.md").exists()


def test_resume_mismatch_names_the_field(alloc_dir):
    proc = run_harness(*DONE_WHEN[:-2], "--warm-gens", "3", "--max-new-tokens", "8", "--out", str(alloc_dir),
                       "--resume", timeout=120)
    error = next(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    assert proc.returncode == 2 and "warm_gens: 2 in the experiment, 3 now" in error and "{" not in error, error
