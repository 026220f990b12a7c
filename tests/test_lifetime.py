"""Nothing the harness starts outlives it (harness.measure.lifetime): a harness SIGKILLed in the middle of a
serve run or of a local probe leaves no process behind, and what an older harness left is named by the next
`serve` and by `harness doctor`. Real processes: the fake server (tests/fake_openai_server.py), `sleep`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
from conftest import REPO, wait_for

from harness.measure.lifetime import OWNER_ENV, describe_pid
from harness.serve.config import ServeConfig
from harness.serve.run import EXIT_FAULT, run_serve
from harness.serve.server import free_port

pytestmark = pytest.mark.fast  # the fake server and sleep: no probe, no vLLM, no Docker

FAKE = Path(__file__).resolve().parent / "fake_openai_server.py"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _sigkill_and_check(harness: subprocess.Popen, started: list[psutil.Process]) -> None:
    """SIGKILL the harness; everything it started must be gone within seconds."""
    pids = [p.pid for p in started]
    try:
        harness.kill()
        harness.wait(10)
        wait_for(lambda: not any(_alive(pid) for pid in pids), 15, "the harness's children to die with it")
    finally:
        _kill_all(pids)


def test_sigkill_of_the_harness_during_serve_leaves_nothing_running(tmp_path: Path) -> None:
    """The server (it also starts a grandchild, as vLLM starts its engine core) and all of its group die when
    the harness is SIGKILLed in the middle of its requests; every one of them carried the owner mark."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "r"
    cmd = f"sh -c 'sleep 300 & exec {sys.executable} {FAKE} {{port}} --stream'"
    harness = subprocess.Popen([sys.executable, "-m", "harness.cli", "serve", "--server-cmd", cmd, "--model",
                                str(model), "--warm-requests", "100000", "--max-tokens", "2", "--no-sampler",
                                "--out", str(out)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started: list[psutil.Process] = []
    try:
        wait_for(lambda: (out / "serve/requests.jsonl").exists() and (out / "serve/requests.jsonl").read_text(),
                 60, "the first request")
        started = psutil.Process(harness.pid).children(recursive=True)
        commands = [" ".join(p.cmdline()) for p in started]
        assert any("fake_openai_server.py" in c for c in commands) and "sleep 300" in commands, commands
        assert all(p.environ().get(OWNER_ENV) == str(harness.pid) for p in started), commands
    finally:
        _sigkill_and_check(harness, started)


def test_sigkill_of_the_harness_during_a_local_probe_leaves_no_probe(tmp_path: Path) -> None:
    """The local runner's probe (here a stand-in that sleeps) dies with the harness, not left under PID 1."""
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\nexec sleep 300\n")
    fake_python.chmod(0o755)
    script = textwrap.dedent(f"""
        from harness.alloc.runners.base import ProbeRequest
        from harness.alloc.runners.local import LocalRunner
        from harness.measure.allocators import resolve
        glibc = resolve(["glibc"], {{}}, {{}}, check_files=False)[0]
        LocalRunner({str(fake_python)!r}).run_probe(ProbeRequest(glibc, "synthetic:tiny", "cpu", 1, 1))
    """)
    harness = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    started: list[psutil.Process] = []
    try:
        started = wait_for(lambda: psutil.Process(harness.pid).children(recursive=True), 30, "the probe")
        assert [p.cmdline()[:2] for p in started] == [["sleep", "300"]]
    finally:
        _sigkill_and_check(harness, started)


def test_the_next_serve_and_doctor_name_what_a_killed_harness_left(tmp_path: Path) -> None:
    """A server still holding the port, marked by a harness that has ended: serve names it (not only "port
    in use") and doctor offers to kill it."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    port = free_port()
    left = subprocess.Popen([sys.executable, str(FAKE), str(port)], env={**os.environ, OWNER_ENV: str(gone.pid)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(c.status == psutil.CONN_LISTEN for c in psutil.Process(left.pid).net_connections()),
                 30, "the leftover server")
        model = tmp_path / "model"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({}))
        logs: list[str] = []
        outcome = run_serve(ServeConfig(engine="custom", server_cmd=f"{sys.executable} {FAKE} {{port}}",
                                        model=str(model), port=port, out=str(tmp_path / "r")), log=logs.append)
        named = describe_pid(left.pid)  # the command, shortened, and its owner
        assert named.startswith(f"PID {left.pid} ({sys.executable}") and "fake_openai" in named
        assert named.endswith(f"; started by harness PID {gone.pid}, which has ended)")
        assert outcome.exit_code == EXIT_FAULT
        assert f"port {port} on 127.0.0.1 is already in use by {named}" in (outcome.error or ""), outcome.error
        assert f"warning: still running: {named}; stop it with `kill -9 {left.pid}`" in logs
        from harness.doctor import harness_processes_row

        check, ok, detail, fix = harness_processes_row()
        assert not ok and named in detail and fix.startswith("kill -9 ") and str(left.pid) in fix.split()
    finally:
        left.kill()
        left.wait()
