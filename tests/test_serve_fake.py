"""Fast tier: `harness serve`'s orchestration on a fake streaming server (tests/fake_openai_server.py) started
the way any OpenAI-compatible server is (--server-cmd): a cold start, cold, warm and idle requests, the report
and its rebuild by `harness report DIR`, a server that dies in the middle of a request, an allocator arm that
cannot be verified, and bench's index.md. test_serve.py runs the same path on a real vLLM server.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fake_openai_server import DEATH_ERROR, MODEL
from fakes import ReplayRunner

from harness.alloc import run as alloc
from harness.cli import main, write_index
from harness.errors import HarnessError, UsageError
from harness.measure.results import ResultsDir
from harness.serve.config import ServeConfig
from harness.serve.run import EXIT_FAULT, EXIT_INTERRUPTED, EXIT_OK, run_serve
from harness.serve.server import free_port, group_members

pytestmark = pytest.mark.fast

FAKE = Path(__file__).resolve().parent / "fake_openai_server.py"
STREAMING = f"{sys.executable} {FAKE} {{port}} --stream"
ARTIFACTS = ("first_token_latency.md", "requests.jsonl", "startup.jsonl", "memory_timeline.csv",
             "memory_timeline.png", "config.json", "environment.json", "server-0.log", "end.json")
REPORT = "serve/first_token_latency.md"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local model directory: the fake server never reads it, so nothing needs building (no torch)."""
    path = tmp_path_factory.mktemp("model")
    (path / "config.json").write_text(json.dumps({"architectures": ["Phi3ForCausalLM"]}))
    return str(path)


def _config(out: Path, model: str, server_cmd: str = STREAMING, **kw: Any) -> ServeConfig:
    base: dict[str, Any] = dict(engine="custom", server_cmd=server_cmd, model=model, port=free_port(),
                                out=str(out), warm_requests=2, max_tokens=8, health_timeout_s=60)
    return ServeConfig(**{**base, **kw})


def _rebuilt(out: Path, tmp_path: Path, older: bool = False) -> str:
    """The report `harness report DIR` rebuilds from a copy of what the run left on disk (`older`: as a run
    from before serve/end.json left it)."""
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for name in ("first_token_latency.md", "memory_timeline.png", *(["end.json"] if older else [])):
        (copy / "serve" / name).unlink()
    result = CliRunner().invoke(main, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote {copy / REPORT}"
    assert (copy / "serve/memory_timeline.png").stat().st_size > 0
    return (copy / REPORT).read_text()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, model_dir: str):
    """One run: a fresh fake server, the cold request, 3 warm ones, then one after each idle gap."""
    out = tmp_path_factory.mktemp("served")
    logs: list[str] = []
    outcome = run_serve(_config(out, model_dir, warm_requests=3, idle_gaps=(0.0, 0.3)), log=logs.append)
    return outcome, logs, out


def test_a_cold_start_then_cold_warm_and_idle_requests(served) -> None:
    outcome, logs, out = served
    assert outcome.exit_code == EXIT_OK and outcome.error is None, logs
    requests = outcome.requests
    assert [(r.kind, r.index, r.idle_gap_s) for r in requests] == [
        ("cold", 0, None), ("warm", 1, None), ("warm", 2, None), ("warm", 3, None), ("idle", 4, 0.0), ("idle", 5, 0.3)]
    assert all(r.ok and r.completion_tokens == 8 and r.model == MODEL for r in requests)
    assert all(0 < r.ttft_s <= r.e2e_s <= r.wall_s for r in requests)
    starts = [r.since_ready_s for r in requests]
    assert starts == sorted(starts) and starts[0] >= 0
    assert requests[5].t_start_s - requests[4].t_end_s >= 0.3, "the idle gap was kept before the request"
    assert [json.loads(line) for line in (out / "serve/requests.jsonl").read_text().splitlines()] == [
        r.to_dict() for r in requests]

    (startup,) = outcome.startups
    assert startup.ok and startup.models == [MODEL]
    assert 0 < startup.spawn_to_health_s <= startup.spawn_to_models_s < startup.spawn_to_first_token_s
    assert startup.stopped_exit == "killed by SIGTERM (exit code -15)" and group_members(startup.pid) == []
    assert startup.memory_peaks["server_rss_mb"] > 5  # the sampler followed the server's own process
    assert any(line.startswith("server 0: /health 200 after") for line in logs)
    assert logs[-1] == f"wrote {out / REPORT}"
    for name in ARTIFACTS:
        assert (out / "serve" / name).stat().st_size > 0, name


def test_the_report_says_what_ran_and_harness_report_rebuilds_it(served, model_dir: str, tmp_path: Path) -> None:
    outcome, _, out = served
    report = (out / REPORT).read_text()
    assert report.startswith(f"# First-token latency and warm start: {model_dir} on custom\n")
    assert ("1 fresh server(s), runner local; 3 warm request(s) per server, max_tokens 8, mode stream, "
            "idle gaps [0.0, 0.3] s.") in report
    cold, warm = outcome.requests[0], outcome.requests[1]
    assert f"| 0 | {cold.wall_s:.4f} | {warm.wall_s:.4f} | {cold.wall_s / warm.wall_s:.2f}× |" in report
    for needle in ("First-to-second drop in TTFT", "| after 0.3 s idle TTFT |", "### Server 0 (ok)",
                   "## Memory timeline", "## What this means for SLOs"):
        assert needle in report, needle
    assert "Run stopped early" not in report and "Failed requests" not in report
    assert json.loads((out / "serve/end.json").read_text()) == {"schema": "serve-end/1", "stopped_early": None}
    assert _rebuilt(out, tmp_path) == report


@pytest.fixture(scope="module")
def died(tmp_path_factory: pytest.TempPathFactory, model_dir: str):
    """A server that kills itself in the middle of the third request."""
    out = tmp_path_factory.mktemp("died")
    outcome = run_serve(_config(out, model_dir, server_cmd=f"{STREAMING} --die-mid-request 2", warm_requests=4),
                        log=lambda m: None)
    return outcome, out


def test_a_server_that_dies_mid_request_ends_the_run_with_its_own_error(died, tmp_path: Path) -> None:
    outcome, out = died
    assert outcome.exit_code == EXIT_FAULT
    assert [(r.kind, r.status) for r in outcome.requests] == [("cold", "ok"), ("warm", "ok"), ("warm", "failed")]
    error = outcome.error or ""
    assert "killed by SIGKILL (exit code -9) during the measured requests" in error and DEATH_ERROR in error, error
    (startup,) = outcome.startups
    assert startup.status == "failed" and startup.exit_code == -9 and startup.fault == "ServerDiedError"
    assert any(DEATH_ERROR in line for line in startup.log_tail)
    assert group_members(startup.pid) == []
    report = (out / REPORT).read_text()
    assert f"**Run stopped early:** {error}" in report and "Server log tail" in report
    assert "### Server 0 (failed)" in report and "Failed requests: 1" in report
    # a run from before serve/end.json, rebuilt: the same report, its fault line taken from the server's
    # start-up record
    stopped = f"**Run stopped early:** {startup.failure}"
    assert _rebuilt(out, tmp_path, older=True).splitlines() == [
        stopped if line.startswith("**Run stopped early:** ") else line for line in report.splitlines()]


def test_a_failed_run_is_rebuilt_byte_for_byte(died, tmp_path: Path) -> None:
    outcome, out = died
    assert json.loads((out / "serve/end.json").read_text()) == {"schema": "serve-end/1",
                                                                "stopped_early": outcome.error}
    assert _rebuilt(out, tmp_path) == (out / REPORT).read_text()


def test_an_allocator_arm_that_cannot_be_verified_is_recorded_and_never_counted(
        tmp_path: Path, model_dir: str, jemalloc_path: str) -> None:
    """A launcher that drops LD_PRELOAD: the jemalloc server runs under glibc, so it is stopped before any
    request, recorded failed, left out of later rounds, and counted nowhere."""
    out = tmp_path / "arms"
    cfg = _config(out, model_dir, server_cmd=f"env -u LD_PRELOAD {STREAMING}", allocators=("glibc", "jemalloc"),
                  allocator_lib=(f"jemalloc={jemalloc_path}",), cold_starts=2, warm_requests=1)
    logs: list[str] = []
    outcome = run_serve(cfg, log=logs.append)
    assert outcome.exit_code == EXIT_FAULT and outcome.error is None  # the comparison went on, and says so
    assert [(s.allocator, s.round, s.status) for s in outcome.startups] == [
        ("glibc", 0, "ok"), ("jemalloc", 0, "failed"), ("glibc", 1, "ok")]
    failed = outcome.startups[1]
    assert failed.failure.startswith("not a jemalloc server: api_server (pid ")
    assert f"does not map {jemalloc_path}" in failed.failure
    assert not failed.allocator_check["verified"]
    assert [r.server for r in outcome.requests] == [0, 0, 2, 2], "no request to the unverified server"
    assert f"failed server, not counted: {failed.failure}" in logs
    report = (out / REPORT).read_text()
    assert "2 of 3 server(s) counted" in report and "No counted server for jemalloc." in report
    assert "Allocator jemalloc: NOT verified" in report


# --- bench's index.md -------------------------------------------------------------------------------
def test_index_links_both_reports_and_only_files_that_exist(served, tmp_path: Path) -> None:
    _, _, out = served
    bench = tmp_path / "bench"
    shutil.copytree(out, bench)
    runner = ReplayRunner("h100-phi3-mini")
    config = alloc.AllocConfig(model="synthetic:phi3-mini", device="cuda", runs=3, warm_gens=8, max_new_tokens=32,
                               allocators=runner.resolve_allocators(["glibc", "jemalloc"], {}, {}), runner="replay")
    alloc.execute(config, runner, ResultsDir(bench))
    assert CliRunner().invoke(main, ["report", str(bench)]).exit_code == 0
    index = write_index(ResultsDir(bench), "synthetic:phi3-mini", None, HarnessError("server died")).read_text()
    lines = index.splitlines()
    assert lines[:5] == [
        "# Benchmark: synthetic:phi3-mini", "",
        "- A. Allocator impact (completed): [summary](alloc/summary.md), "
        "[CSV](alloc/allocator_latency_comparison.csv), [plot](alloc/gen_latency.png), [runs](alloc/runs.jsonl)",
        "- B. First-token path (ended with exit code 1: server died): [report](serve/first_token_latency.md), "
        "[requests](serve/requests.jsonl), [start-up](serve/startup.jsonl), "
        "[memory timeline](serve/memory_timeline.png)",
        "- Environment: no files"]
    summary = (bench / "alloc/summary.md").read_text()
    answers = [line.removeprefix("- Answer — ") for line in summary.splitlines() if line.startswith("- Answer — ")]
    assert answers and all(f"**{answer}**" in lines for answer in answers)
    # both reports follow, each heading one level down
    assert "## Allocator impact on generation latency" in lines and "### How far to trust these figures" in lines
    assert any(line.startswith("## First-token latency and warm start: ") for line in lines)
    assert not any(line.startswith("# ") for line in lines[1:])

    alone = tmp_path / "alone"
    shutil.copytree(bench / "alloc", alone / "alloc")
    index = write_index(ResultsDir(alone), "synthetic:phi3-mini", None, UsageError("unknown engine")).read_text()
    assert "- B. First-token path (ended with exit code 2: unknown engine): no files" in index.splitlines()
    assert "First-token latency and warm start" not in index


# --- whose server answers ---------------------------------------------------------------------------
def test_a_port_another_process_took_is_refused_not_measured(tmp_path: Path, model_dir: str) -> None:
    """Two runs on one port: this run's server is still starting (it listens only after 30 s) when another
    server, not of this run, starts listening on the port. Its /health answers; the run must not measure it."""
    port = free_port()
    other: list[subprocess.Popen] = []

    def log(message: str) -> None:
        if message.startswith("server 0: starting"):  # before this run's port check: the other one listens later
            other.append(subprocess.Popen([sys.executable, str(FAKE), str(port), "--stream", "--startup-delay", "1"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    try:
        outcome = run_serve(_config(tmp_path / "r", model_dir, server_cmd=f"{STREAMING} --startup-delay 30",
                                    port=port), log=log)
        intruder = other[0].pid
    finally:
        for proc in other:
            proc.kill()
            proc.wait()
    assert outcome.exit_code == EXIT_FAULT and outcome.requests == []
    error = outcome.error or ""
    assert f"port {port} answers /health, but from PID {intruder} (" in error, error
    assert f"not from this run's server (PID {outcome.startups[0].pid})" in error
    assert outcome.startups[0].fault == "PortTakenError" and group_members(outcome.startups[0].pid) == []


def test_without_port_a_free_port_is_taken(tmp_path: Path, model_dir: str) -> None:
    """The old fixed default (8000) held by someone else: a run without --port takes a free port instead."""
    with socket.socket() as held:
        with contextlib.suppress(OSError):  # already held by another process: just as good
            held.bind(("127.0.0.1", 8000))
            held.listen()
        outcome = run_serve(_config(tmp_path / "r", model_dir, port=None, warm_requests=1), log=lambda m: None)
    assert outcome.exit_code == EXIT_OK, outcome.error
    port = json.loads((tmp_path / "r/serve/config.json").read_text())["port"]
    assert isinstance(port, int) and port != 8000
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert "[default: a free port" in " ".join(result.output.split())


def test_a_malformed_stream_is_a_failed_request_not_a_measurement(tmp_path: Path, model_dir: str) -> None:
    outcome = run_serve(_config(tmp_path / "r", model_dir, server_cmd=f"{STREAMING} --malformed-every 2"),
                        log=lambda m: None)
    assert outcome.exit_code == EXIT_FAULT and "stream events were not JSON" in (outcome.error or "")
    (cold,) = outcome.requests
    assert (cold.status, cold.failure_kind, cold.ttft_s) == ("failed", "malformed_stream", None)


# --- a value of the wrong type in a results file ----------------------------------------------------
def _corrupt(path: Path, line: int, key: str, value: Any) -> None:
    lines = path.read_text().splitlines()
    record = json.loads(lines[line - 1])
    assert key in record
    lines[line - 1] = json.dumps({**record, key: value})
    path.write_text("\n".join(lines) + "\n")


def test_report_names_the_file_line_and_field_of_a_value_of_the_wrong_type(served, tmp_path: Path) -> None:
    _, _, out = served
    serve_copy = tmp_path / "serve"
    shutil.copytree(out, serve_copy)
    _corrupt(serve_copy / "serve/requests.jsonl", 2, "ttft_s", "fast")
    alloc_dir = tmp_path / "alloc"
    runner = ReplayRunner("h100-phi3-mini")
    config = alloc.AllocConfig(model="synthetic:phi3-mini", device="cuda", runs=3, warm_gens=8, max_new_tokens=32,
                               allocators=runner.resolve_allocators(["glibc", "jemalloc"], {}, {}), runner="replay")
    alloc.execute(config, runner, ResultsDir(alloc_dir))
    _corrupt(alloc_dir / "alloc/runs.jsonl", 3, "wall_real_s", [1.5])
    for directory, expected in (
            (serve_copy, f"{serve_copy}/serve/requests.jsonl line 2: field ttft_s: 'fast' (str) where "
                         "float | None is expected"),
            (alloc_dir, f"{alloc_dir}/alloc/runs.jsonl line 3: field wall_real_s: [1.5] (list) where ")):
        result = CliRunner().invoke(main, ["report", str(directory)])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
        assert lines[0].startswith(f"error: {expected}"), lines[0]


# --- an interrupted run ----------------------------------------------------------------------------
def test_an_interrupted_run_reports_what_its_servers_measured(tmp_path: Path, model_dir: str) -> None:
    """Ctrl-C right after the second server's last request: that server is reported as interrupted, with its
    first token and its memory readings, not as "Server 1 (None)" with dashes."""
    out = tmp_path / "r"

    def log(message: str) -> None:
        if message.lstrip().startswith("s1 warm2"):
            raise KeyboardInterrupt  # as SIGINT arriving then does

    outcome = run_serve(_config(out, model_dir, cold_starts=2, sample_hz=50), log=log)
    assert outcome.exit_code == EXIT_INTERRUPTED
    assert [s.status for s in outcome.startups] == ["ok", "interrupted"]
    second = outcome.startups[1]
    assert second.spawn_to_health_s < second.spawn_to_first_token_s
    report = (out / REPORT).read_text()
    assert "### Server 1 (interrupted)" in report and "(None)" not in report
    assert f"→ first token: {second.spawn_to_first_token_s:.2f} s." in report
    readings = [line for line in report.splitlines() if line.startswith("| 1 | server_rss_mb |")]
    assert len(readings) == 1 and "–" not in readings[0], readings
    assert _rebuilt(out, tmp_path) == report


# --- an --out that holds an earlier serve run ---------------------------------------------------------
def test_an_out_holding_only_a_failed_start_is_continued_and_one_with_results_is_refused_with_the_fix(
        tmp_path: Path, model_dir: str) -> None:
    out = tmp_path / "r"
    with socket.socket() as held:  # the port is in use: the first run's only server fails to start
        held.bind(("127.0.0.1", 0))
        held.listen()
        failed = run_serve(_config(out, model_dir, port=held.getsockname()[1]), log=lambda m: None)
    assert failed.exit_code == EXIT_FAULT and [s.status for s in failed.startups] == ["failed"]
    logs: list[str] = []
    again = run_serve(_config(out, model_dir, warm_requests=1), log=logs.append)
    assert again.exit_code == EXIT_OK, again.error
    assert (f"{out / 'serve'} held no completed server (a failed start or a killed run): kept as "
            f"{out / 'serve.attempt-1'}; starting afresh") in logs
    assert [s.status for s in again.startups] == ["ok"]
    assert json.loads((out / "serve.attempt-1/startup.jsonl").read_text())["status"] == "failed"
    with pytest.raises(UsageError) as refused:
        run_serve(_config(out, model_dir), log=lambda m: None)
    assert str(refused.value) == (f"{out / 'serve'} already holds the serve results of 1 completed server: "
                                  "choose another --out (a serve run cannot be continued)")
