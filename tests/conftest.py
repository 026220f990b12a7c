"""Shared fixtures: real processes, real allocator libraries, no mocks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from harness.containers.engine import TEST_RUN_ENV, TEST_RUN_LABEL
from harness.measure.allocators import find_library

REPO = Path(__file__).resolve().parents[1]
# Every container this test run starts, in this process or in a harness it runs, carries this run's mark
# (harness.test_run=<pytest PID>): fixtures remove only those, never another harness user's containers.
os.environ[TEST_RUN_ENV] = str(os.getpid())
TEST_RUN = f"{TEST_RUN_LABEL}={os.environ[TEST_RUN_ENV]}"
HARNESS = [sys.executable, "-m", "harness.cli"]
SEQUENTIAL = ("alloc", "--design", "sequential")  # `harness alloc` in the design of one fresh process per run


def run_harness(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs the real `harness` command line in a fresh process."""
    return subprocess.run([*HARNESS, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> object:
    """Polls `cond` until it returns something truthy; fails the test after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(autouse=True)
def _signal_handlers_restored() -> Iterator[None]:
    """A command run in this process (CliRunner) ignores SIGINT and SIGTERM once it is over, until the exit
    that follows it in a real process (harness.measure.signals.exit_code_of). Here no exit follows: without
    this, Ctrl-C would no longer reach a later test, and every process a later test starts would inherit the
    ignored SIGTERM (a server that cannot be stopped but by SIGKILL)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="session")
def jemalloc_path() -> str:
    path = find_library("jemalloc")
    assert path, "libjemalloc2 is not installed: run scripts/setup-system.sh (make test does)"
    return path


@pytest.fixture(scope="session")
def tcmalloc_path() -> str:
    path = find_library("tcmalloc")
    assert path, "libtcmalloc-minimal4 is not installed: run scripts/setup-system.sh (make test does)"
    return path


def _recomputed_half_width(runs: list[dict], metric_key: str = "itl_p25_s") -> float:
    """The ratio CI half-width of jemalloc vs glibc, computed again from runs.jsonl's verified measured runs."""
    from harness.measure import stats

    ok = [r for r in runs if not r["warmup"] and r["status"] == "ok"]
    return stats.compare([r[metric_key] for r in ok if r["allocator"] == "jemalloc"],
                         [r[metric_key] for r in ok if r["allocator"] == "glibc"]).half_width


def check_stopped_experiment(out: Path, target: float, max_time_s: float, started: float, ended: float) -> dict:
    """What every --target-ci experiment must show, whichever rule stopped it: the stop and each check recorded
    and recomputable from runs.jsonl, no run started after the deadline, the summary naming the reason."""
    runs = [json.loads(line) for line in (out / "alloc/runs.jsonl").read_text().splitlines()]
    events = [json.loads(line) for line in (out / "alloc/stopping.jsonl").read_text().splitlines()]
    stop = [e for e in events if e["event"] == "stop"][-1]
    assert stop["reason"] in ("target", "time"), stop
    assert stop["rule"]["target"] == target and stop["rule"]["metric"] == "itl_p25"
    widest = _recomputed_half_width(runs)
    assert (stop["widest"] is None and widest != widest) or stop["widest"] == pytest.approx(widest)
    for check in (e for e in events if e["event"] == "check"):
        upto = [r for r in runs if r["round"] <= check["round"]]
        assert check["widest"] == pytest.approx(_recomputed_half_width(upto))
        assert check["reached"] == (check["widest"] <= target) and check["round"] + 1 >= stop["rule"]["min_rounds"]
    measured_rounds = {r["round"] for r in runs if not r["warmup"]}
    if stop["reason"] == "target":
        assert stop["widest"] <= target and len(measured_rounds) >= stop["rule"]["min_rounds"]
        assert events[-2]["event"] == "check" and events[-2]["reached"]
    else:  # time: no run started after the deadline, and the experiment ended within about one run of it
        clock_started = datetime.fromisoformat(stop["at"]).timestamp() - stop["elapsed_s"]
        assert started <= clock_started and stop["elapsed_s"] < max_time_s + max(r["wall_real_s"] for r in runs)
        assert all(datetime.fromisoformat(r["started_at"]).timestamp() < clock_started + max_time_s for r in runs)
    assert ended - started < max_time_s + max(r["wall_real_s"] for r in runs) + 60
    assert all(0 < r["measured_share"] < 1 and r["measured_s"] >= r["probe"]["measure_s"] > 0 for r in runs)
    summary = (out / "alloc/summary.md").read_text()
    reason = "the precision target was reached" if stop["reason"] == "target" else "the time was up"
    assert f"- Stopping — stopped because {reason}" in summary and f"against a target of ±{target * 100:g} %" in summary
    assert "- Run cost — measured generation took" in summary
    return stop


def kill_left_behind(group_leaders: list[int], proc: subprocess.Popen) -> None:
    """Test clean-up: SIGKILL each process group a test started through the harness, then the harness."""
    for pid in group_leaders:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()


def docker_probe_runner():
    """The docker runner on the real engine with glibc and jemalloc probe images (built if missing or stale):
    the test skips where no Docker daemon answers, and fails instead with HARNESS_REQUIRE_DOCKER=1 (CI)."""
    from harness.alloc.runners.docker import make_docker_runner
    from harness.containers.engine import docker_available

    ok, why = docker_available()
    if not ok and "no Docker daemon" in why:
        if os.environ.get("HARNESS_REQUIRE_DOCKER") == "1":
            pytest.fail(f"HARNESS_REQUIRE_DOCKER=1 but {why}")
        pytest.skip(why)
    return make_docker_runner("cpu", ["glibc", "jemalloc"])


def this_runs_containers(client, label_filter: str) -> list:
    """The containers of `label_filter` (harness=probe, harness=server) that this test run started."""
    return client.containers.list(all=True, filters={"label": [label_filter, TEST_RUN]})
