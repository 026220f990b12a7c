"""The duet design on real persistent probe processes (synthetic:tiny, real allocators): every arm verified in
its own process and on its own CPUs, a probe killed mid-set fails only its set, Ctrl-C leaves no probe behind,
and an A/A calibration is quoted by the A/B beside it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import HARNESS, REPO, run_harness, wait_for

DUET = ["alloc", "--runner", "local", "--design", "duet", "--model", "synthetic:tiny", "--max-new-tokens", "16"]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _session_probes(harness: subprocess.Popen) -> dict[int, str]:
    """PID → allocator (its LD_PRELOAD, or glibc) of each persistent probe this harness process started."""
    out = {}
    try:
        for child in psutil.Process(harness.pid).children(recursive=True):
            try:
                if "--session" in child.cmdline():
                    preload = child.environ().get("LD_PRELOAD", "")
                    out[child.pid] = "jemalloc" if "jemalloc" in preload else "glibc"
            except psutil.Error:
                continue
    except psutil.Error:
        pass
    return out


def test_duet_verifies_every_arm_in_its_own_process_and_cpus(tmp_path: Path) -> None:
    out = tmp_path / "duet"
    result = run_harness(*DUET, "--allocators", "glibc,jemalloc", "--sets", "2", "--windows-per-set", "3",
                         "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    sets = _jsonl(out / "alloc/sets.jsonl")
    assert [s["status"] for s in sets] == ["ok", "ok"]
    for record in sets:
        arms = {a["label"]: a for a in record["arms"]}
        assert arms["glibc"]["loaded_allocator"]["name"] == "glibc"
        assert arms["jemalloc"]["loaded_allocator"]["name"] == "jemalloc"
        assert "libjemalloc" in arms["jemalloc"]["loaded_allocator"]["malloc_library"]
        assert arms["glibc"]["pid"] != arms["jemalloc"]["pid"]
        assert all(a["verified"] and a["exit_code"] == 0 for a in arms.values())
        if len(os.sched_getaffinity(0)) >= 2:  # each on its own CPUs, checked inside its own process
            cpus = [set(a["cpu_affinity"]) for a in arms.values()]
            assert cpus[0] and cpus[1] and not cpus[0] & cpus[1]
            assert all(a["cpu_affinity"] == a["placement"]["cpus"] for a in arms.values())
    assert [a["label"] for a in sets[1]["arms"] if a["start_position"] == 0] == ["jemalloc"]  # order rotated
    windows = _jsonl(out / "alloc/windows.jsonl")
    assert len(windows) == 2 * (3 + 1) * 2
    assert all(w["gens"] == 1 and w["itl_p25_s"] > 0 for w in windows)
    summary = (out / "alloc/summary.md").read_text()
    assert "jemalloc vs glibc" in summary and "2 sets" in summary and "Design — duet" in summary
    assert "jemalloc" in result.stdout.splitlines()[-1]  # the answer is the last line
    for record in sets:
        assert not any(psutil.pid_exists(a["pid"]) and "--session" in _cmdline(a["pid"]) for a in record["arms"])


def _mid_set(args: list[str], out: Path, windows: int, act) -> tuple[subprocess.Popen, dict[int, str], str]:
    """Starts the harness, waits for `windows` windows on disk, calls act(harness, probes) and waits for the
    harness to end; it is killed if it is still running. Returns it, its probes and its stderr."""
    proc = subprocess.Popen([*HARNESS, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    probes: dict[int, str] = {}
    try:
        wait_for(lambda: len(_jsonl(out / "alloc/windows.jsonl")) >= windows, 180, f"{windows} windows")
        probes = _session_probes(proc)
        act(proc, probes)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc, probes, stderr


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def test_a_probe_killed_mid_set_fails_that_set_only(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    args = [*DUET, "--allocators", "glibc,jemalloc", "--sets", "2", "--windows-per-set", "6", "--out", str(out)]
    def kill_jemalloc(_: subprocess.Popen, probes: dict[int, str]) -> None:
        os.kill(next(pid for pid, name in probes.items() if name == "jemalloc"), signal.SIGKILL)

    proc, probes, stderr = _mid_set(args, out, 3, kill_jemalloc)
    assert proc.returncode == 1, stderr[-3000:]
    assert "1 of 2 sets failed" in stderr
    sets = _jsonl(out / "alloc/sets.jsonl")
    assert [s["status"] for s in sets] == ["failed", "ok"]
    assert sets[0]["ended_by"] == "died" and "jemalloc" in sets[0]["failure"]
    dead = next(a for a in sets[0]["arms"] if a["label"] == "jemalloc")
    assert dead["exit_code"] == -9
    summary = (out / "alloc/summary.md").read_text()
    assert "Failed — 1 of 2 sets failed and were not counted" in summary
    assert not [p for p in probes if psutil.pid_exists(p) and "--session" in _cmdline(p)]


def test_ctrl_c_mid_set_leaves_no_probe_and_resume_adds_a_set(tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    args = [*DUET, "--allocators", "glibc,jemalloc", "--sets", "2", "--windows-per-set", "40", "--out", str(out)]
    def interrupt(harness: subprocess.Popen, probes: dict[int, str]) -> None:
        assert len(probes) == 2
        harness.send_signal(signal.SIGINT)

    proc, probes, stderr = _mid_set(args, out, 4, interrupt)
    assert proc.returncode == 130, stderr[-3000:]
    assert "continue with --resume" in stderr
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in probes if psutil.pid_exists(p)], timeout=10)
    assert not alive
    sets = _jsonl(out / "alloc/sets.jsonl")
    assert [s["status"] for s in sets] == ["interrupted"]
    kept = len(_jsonl(out / "alloc/windows.jsonl"))
    assert kept >= 4
    resumed = run_harness(*[a if a != "40" else "2" for a in args], "--resume")
    assert resumed.returncode == 2, resumed.stderr[-2000:]  # the window count is part of the experiment
    assert "windows_per_set: 40 in the experiment, 2 now" in resumed.stderr
    resumed = run_harness(*args[:-2], "--out", str(out), "--resume", "--sets", "2", timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [s["set_index"] for s in _jsonl(out / "alloc/sets.jsonl")] == [0, 1]


def test_calibrate_runs_an_a_a_that_the_a_b_beside_it_quotes(tmp_path: Path) -> None:
    out = tmp_path / "calibrated"
    started = time.monotonic()
    result = run_harness(*DUET, "--allocators", "glibc,jemalloc", "--calibrate", "--sets", "2",
                         "--windows-per-set", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1].startswith("A/A calibration — A/A (glibc against itself as glibc#2")
    sets = _jsonl(out / "calibration/alloc/sets.jsonl")
    assert all(a["loaded_allocator"]["name"] == "glibc" for s in sets for a in s["arms"])
    assert not (out / "alloc").exists()
    result = run_harness(*DUET, "--allocators", "glibc,jemalloc", "--sets", "2", "--windows-per-set", "2",
                         "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Calibration — A/A (glibc against itself as glibc#2, 2 sets" in (out / "alloc/summary.md").read_text()
    assert time.monotonic() - started < 900


@pytest.mark.parametrize("args, message", [
    (["--allocators", "glibc"], "the duet design compares a baseline with at least one other allocator"),
    (["--allocators", "glibc,jemalloc", "--paired"], "--paired is a way of the sequential design"),
    (["--allocators", "glibc,mine", "--allocator-lib", "mine=/nonexistent/libmine.so", "--runner", "docker"],
     "--runner docker: no probe image has mine"),
    (["--allocators", "glibc,jemalloc", "--sets", "0"], "--sets"),
])
def test_bad_duet_input_gives_one_clear_line(args: list[str], message: str, tmp_path: Path) -> None:
    base = [a for a in DUET if a not in ("--runner", "local")]
    result = run_harness(*base, *args, "--out", str(tmp_path / "bad"))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_sigkill_of_the_harness_leaves_no_probe_running(tmp_path: Path) -> None:
    out = tmp_path / "killed-harness"
    args = [*DUET, "--allocators", "glibc,jemalloc", "--sets", "2", "--windows-per-set", "40", "--out", str(out)]
    proc = subprocess.Popen([*HARNESS, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(_jsonl(out / "alloc/windows.jsonl")) >= 2, 180, "windows of set 1")
        probes = _session_probes(proc)
        assert len(probes) == 2
    finally:
        proc.kill()  # as an OOM killer or a CI timeout would: no clean-up runs
        proc.communicate()
    _, alive = psutil.wait_procs([psutil.Process(p) for p in probes if psutil.pid_exists(p)], timeout=15)
    assert not alive, f"probes still running after the harness was killed: {[p.pid for p in alive]}"
    assert _jsonl(out / "alloc/windows.jsonl")  # the windows measured before are on disk
