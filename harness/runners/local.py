"""Local runner: each probe in a fresh child process, allocator switched by LD_PRELOAD.

The wall time and the peak RSS of the child are taken by the parent, as `/usr/bin/time` does
(wait4's rusage), so they include interpreter start-up and imports.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from harness.allocators import Allocator, resolve
from harness.runners.base import ProbeOutcome, ProbeRequest, parse_probe_output

REPO_ROOT = Path(__file__).resolve().parents[2]


def probe_environment(request: ProbeRequest, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.pop("LD_PRELOAD", None)  # glibc means nothing preloaded, whatever the caller's shell had
    if request.allocator.library:
        env["LD_PRELOAD"] = request.allocator.library
    env.update(request.allocator.env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    return env


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _tail(path: Path, n: int = 20) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


class LocalRunner:
    name = "local"

    def __init__(self, python: str | None = None) -> None:
        self.python = python or sys.executable

    def describe(self) -> dict[str, Any]:
        return {"runner": "local", "python": self.python}

    def resolve_allocators(self, names: list[str], libs: dict[str, str],
                           envs: dict[str, dict[str, str]]) -> list[Allocator]:
        return resolve(names, libs, envs, check_files=True)

    def run_probe(self, request: ProbeRequest) -> ProbeOutcome:
        cmd = [self.python, "-m", "harness.probe", *request.probe_args()]
        with tempfile.TemporaryDirectory(prefix="harness-probe-") as tmp:
            out_path, err_path = Path(tmp, "stdout"), Path(tmp, "stderr")
            with open(out_path, "w") as out, open(err_path, "w") as err:
                t0 = time.perf_counter()
                proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=probe_environment(request),
                                        cwd=str(REPO_ROOT), start_new_session=True)
                timed_out = threading.Event()

                def on_timeout() -> None:
                    timed_out.set()
                    _kill_group(proc.pid)

                timer = threading.Timer(request.timeout_s, on_timeout)
                timer.start()
                try:
                    _, status, usage = os.wait4(proc.pid, 0)
                except BaseException:  # Ctrl-C or anything else: never leave the child behind
                    _kill_group(proc.pid)
                    proc.wait()
                    raise
                finally:
                    timer.cancel()
                wall = time.perf_counter() - t0
                proc.returncode = os.waitstatus_to_exitcode(status)
                _kill_group(proc.pid)  # anything the probe itself forked
            stdout_lines = out_path.read_text(errors="replace").splitlines()
            probe, error = parse_probe_output(stdout_lines)
            code = proc.returncode
            if timed_out.is_set():
                error = f"timed out after {request.timeout_s:.0f} s"
            elif probe is None and error is None:
                error = (f"probe killed by signal {-code}" if code < 0 else f"probe exited with code {code}")
            return ProbeOutcome(
                exit_code=code, wall_real_s=wall, probe=probe, error=error,
                log_tail=_tail(err_path) if probe is None else [],
                parent_maxrss_mb=usage.ru_maxrss / 1024.0,
            )

    def close(self) -> None:
        pass
