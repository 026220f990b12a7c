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

from harness import REPO_ROOT
from harness.alloc.runners.base import (
    MarkedLines,
    Placement,
    ProbeOutcome,
    ProbeRequest,
    SessionDied,
    SessionEnd,
    parse_probe_output,
)
from harness.errors import UsageError
from harness.measure.allocators import Allocator, resolve
from harness.measure.lifetime import dies_with_me, owned_env


def probe_environment(request: ProbeRequest, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.pop("LD_PRELOAD", None)  # glibc means nothing preloaded, whatever the caller's shell had
    if request.allocator.library:
        env["LD_PRELOAD"] = request.allocator.library
    env.update(request.allocator.env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    if request.placement and request.placement.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = request.placement.cuda_visible_devices
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
        self._live: set[int] = set()  # process groups of the probes running now
        self._lock = threading.Lock()

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
                proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=owned_env(probe_environment(request)),
                                        cwd=str(REPO_ROOT), start_new_session=True, preexec_fn=dies_with_me())
                with self._lock:
                    self._live.add(proc.pid)
                if request.placement and request.placement.cpus:
                    # Set before the interpreter has started any thread; later threads inherit it.
                    with contextlib.suppress(ProcessLookupError):
                        os.sched_setaffinity(proc.pid, request.placement.cpus)
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
                    with self._lock:
                        self._live.discard(proc.pid)
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

    def start_session(self, request: ProbeRequest) -> LocalSession:
        session = LocalSession(self.python, request)
        with self._lock:
            self._live.add(session.pid)
        session.on_end = lambda: self._forget(session.pid)
        return session

    def _forget(self, pid: int) -> None:
        with self._lock:
            self._live.discard(pid)

    def abort(self) -> None:
        with self._lock:
            for pid in list(self._live):
                _kill_group(pid)

    def close(self) -> None:
        self.abort()


class PlacementError(UsageError):
    """The host cannot be split for the paired design."""


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip()]
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library or no driver
        return []


def split_host(device: str, parts: int = 2) -> list[Placement]:
    """`parts` disjoint halves of this host: CPUs split evenly, and on CUDA one GPU each."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < parts:
        raise PlacementError(f"--paired needs at least {parts} CPUs to split; this process may use {len(cpus)}")
    gpus: list[str | None] = [None] * parts
    if device.startswith("cuda"):
        visible = _visible_gpus()
        if len(visible) < parts:
            raise PlacementError(f"--paired on cuda needs {parts} GPUs, one per side; {len(visible)} visible")
        gpus = list(visible[:parts])
    size = len(cpus) // parts
    return [Placement(cuda_visible_devices=gpus[i], cpus=tuple(cpus[i * size:(i + 1) * size]))
            for i in range(parts)]


STOP_GRACE_S = 15.0  # a persistent probe asked to stop that is still up after this is killed


class LocalSession:
    """A persistent probe process (`python -m harness.probe --session`): requests on its stdin, protocol
    lines on its stdout, its stderr in a temporary file (the log tail of a probe that died)."""

    def __init__(self, python: str, request: ProbeRequest) -> None:
        self.request = request
        self.on_end: Any = None
        self._tmp = tempfile.TemporaryDirectory(prefix="harness-session-")
        self._err_path = Path(self._tmp.name, "stderr")
        cmd = [python, "-m", "harness.probe", "--session", *request.probe_args()]
        with open(self._err_path, "w") as err:
            self.t0 = time.perf_counter()
            # Started, waited for and closed by one thread (the set's): its death signal is tied to that thread.
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                         bufsize=1, env=owned_env(probe_environment(request)), cwd=str(REPO_ROOT),
                                         start_new_session=True, preexec_fn=dies_with_me())
        self.pid = self.proc.pid
        if request.placement and request.placement.cpus:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(self.pid, request.placement.cpus)
        self.lines = MarkedLines(self.proc.stdout, f"{request.allocator.name} probe (PID {self.pid})")
        self._end: SessionEnd | None = None

    def ready(self, timeout_s: float):
        return self.lines.expect_ready(timeout_s)

    def window(self, request, timeout_s: float):
        try:
            self.proc.stdin.write(request.line() + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise SessionDied(f"{self.lines.describe}: cannot send it a request ({exc})") from None
        return self.lines.expect_window(request.window, timeout_s)

    def kill(self) -> None:
        _kill_group(self.pid)

    def close(self) -> SessionEnd:
        if self._end is not None:
            return self._end
        with contextlib.suppress(BrokenPipeError, OSError, ValueError):
            self.proc.stdin.close()  # end of stdin: the probe leaves its request loop and exits
        timer = threading.Timer(STOP_GRACE_S, self.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(self.pid, 0)
        except ChildProcessError:  # reaped elsewhere
            status, usage = None, None
        finally:
            timer.cancel()
        _kill_group(self.pid)  # anything the probe itself forked
        self.proc.returncode = os.waitstatus_to_exitcode(status) if status is not None else None
        self._end = SessionEnd(exit_code=self.proc.returncode, wall_real_s=time.perf_counter() - self.t0,
                               parent_maxrss_mb=usage.ru_maxrss / 1024.0 if usage else None,
                               log_tail=_tail(self._err_path) if self.proc.returncode else [])
        if self.on_end:
            self.on_end()
        self._tmp.cleanup()
        return self._end
