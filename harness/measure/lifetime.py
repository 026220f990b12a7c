"""Nothing the harness starts outlives it, and what a harness killed hard left behind can be named.

A harness process can die without any clean-up (SIGKILL from an OOM killer or a CI timeout): its `finally`
blocks never run. So every process it starts
- dies with it: `dies_with_me()` is a `preexec_fn` that sets PR_SET_PDEATHSIG (SIGKILL) in the child. The
  kernel sends it when the *thread* that started the child ends, so a child must be waited for by the thread
  that started it (run_probe and cold_start do). The signal is not inherited by the child's own children:
- so a process group gets a `GroupWatchdog` too: a `sh` in its own session that reads a pipe only this
  process writes. Every death closes the pipe; unless `release()` said first that the group was stopped,
  the watchdog then SIGKILLs the whole group (a vLLM server's engine core and workers with it).
- carries HARNESS_OWNER_PID (`owned_env`): `started_processes()` finds, by that mark, the processes some
  harness started, and whether that harness still runs. `harness doctor` and `harness serve` name them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import psutil

OWNER_ENV = "HARNESS_OWNER_PID"
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def owned_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with this process named as the owner of the child that gets it."""
    return {**env, OWNER_ENV: str(os.getpid())}


def dies_with_me() -> Callable[[], None]:
    """A `preexec_fn`: the child is SIGKILLed when the thread of this process that starts it ends (and at
    once, when this process died before the signal was set)."""
    parent = os.getpid()

    def set_death_signal() -> None:
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return set_death_signal


class GroupWatchdog:
    """SIGKILLs process group `pgid` when this process ends before `release()`, however it ends."""

    def __init__(self, pgid: int) -> None:
        read_end, self._write_end = os.pipe()  # not inheritable: no other child holds the write end
        try:
            self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                ["sh", "-c", f"read _ || kill -KILL -{int(pgid)}"], stdin=read_end, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True, env=owned_env(dict(os.environ)))
        except OSError:
            os.close(self._write_end)
            raise
        finally:
            os.close(read_end)

    def release(self) -> None:
        """The group was stopped: the watchdog exits without killing anything. Safe to call twice."""
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._write_end, b"stopped\n")
        with contextlib.suppress(OSError):
            os.close(self._write_end)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5.0)
        self.proc = None


@dataclass(frozen=True)
class Started:
    """A live process that a harness process started (directly or not), by its HARNESS_OWNER_PID mark."""

    pid: int
    owner: int
    owner_running: bool
    command: str

    def describe(self) -> str:
        owner = (f"started by harness PID {self.owner}, still running" if self.owner_running else
                 f"started by harness PID {self.owner}, which has ended")
        return f"PID {self.pid} ({self.command[:70]}; {owner})"


def _owner_running(owner: int, child_created: float) -> bool:
    """Whether the harness that started a process created at `child_created` still runs (not a later process
    that was given its PID)."""
    try:
        return psutil.Process(owner).create_time() <= child_created + 1.0
    except psutil.Error:
        return False


def started_by_harness(process: psutil.Process) -> Started | None:
    """The process as a `Started`, when it carries another harness process's mark; else None."""
    try:
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        owner = process.environ().get(OWNER_ENV, "")
        if not owner.isdigit() or int(owner) == os.getpid():
            return None
        command = " ".join(process.cmdline()) or process.name()
        return Started(process.pid, int(owner), _owner_running(int(owner), process.create_time()), command)
    except psutil.Error:
        return None


def started_processes() -> list[Started]:
    """Every live process another harness process started (the ones this process started are its own)."""
    found = (started_by_harness(p) for p in psutil.process_iter())
    return [s for s in found if s is not None]


def leftovers() -> list[Started]:
    """The processes whose harness has ended: left behind by a harness killed hard."""
    return [s for s in started_processes() if not s.owner_running]


def describe_pid(pid: int) -> str:
    """"PID 123 (command; started by harness PID 99, which has ended)" or "PID 123 (command)"."""
    try:
        process = psutil.Process(pid)
        started = started_by_harness(process)
        return started.describe() if started else f"PID {pid} ({(' '.join(process.cmdline()) or process.name())[:70]})"
    except psutil.Error:
        return f"PID {pid}"
