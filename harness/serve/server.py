"""Local server lifecycle: port check, start in its own process group, readiness, death, stop.

Every log line is stamped with its arrival time (seconds since spawn) so start-up phases can be
timed more finely than the server's own one-second log timestamps.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from harness.errors import HarnessError
from harness.measure import lifetime
from harness.measure.lifetime import describe_pid
from harness.measure.signals import Shielded

ALLOCATOR_LIB = re.compile(r"/\S*lib(tcmalloc|jemalloc|mimalloc|iomp5|gomp)[^/\s]*\.so[.\d]*")
EXCEPTION_LINE = re.compile(r"\b[A-Z]\w*(?:Error|Exception)\b: \S")  # "RuntimeError: CUDA error: ..."
ERROR_LINE = re.compile(r"\bERROR\b|\bTraceback\b|\bFATAL\b")
LOWER_LEVEL = re.compile(r"\b(DEBUG|INFO|WARNING|WARN)\b")
KILL_NOW = "killing the server now (SIGKILL)"


class ServerError(HarnessError):
    """The server could not be started or stopped serving; `server_exit_code` (the server's own, not the
    command's) and `log_tail` go into the report."""

    def __init__(self, message: str, server_exit_code: int | None = None, log_tail: list[str] | None = None) -> None:
        super().__init__(message)
        self.server_exit_code = server_exit_code
        self.log_tail = log_tail or []


class PortInUseError(ServerError):
    pass


class ServerDiedError(ServerError):
    pass


class HealthTimeoutError(ServerError):
    pass


class PortTakenError(ServerError):
    """/health answered, but from a process that is not this run's server: its answers are another server's."""


class WrongModelError(ServerError):
    pass


def last_error_line(lines: list[str]) -> str | None:
    """The server's own account of its failure: the last exception line of its log (the root cause rather
    than vLLM's EngineDeadError that follows it, where the log has both), else its last ERROR line. Lines
    logged at a lower level (a WARNING that quotes an error) are not errors."""
    lines = [line for line in lines if not LOWER_LEVEL.search(line)]
    exceptions = [line for line in lines if EXCEPTION_LINE.search(line)]
    causes = [line for line in exceptions if "EngineDeadError" not in line]
    found = causes or exceptions or [line for line in lines if ERROR_LINE.search(line)]
    return found[-1].strip()[:300] if found else None


def models_listed(response: httpx.Response, url: str) -> list[str]:
    """The model ids of a 200 answer of /v1/models; ServerError when it is not the OpenAI list."""
    try:
        data = response.json().get("data", [])
        return [m.get("id") for m in data]
    except (ValueError, AttributeError, TypeError):
        head = " ".join(response.text.split())[:80]
        raise ServerError(f"{url} answered 200 but not JSON with a model list "
                          f"({response.headers.get('content-type') or 'no content type'}: {head!r}): "
                          "is this an OpenAI-compatible server?") from None


def check_port_free(host: str, port: int) -> None:
    """Raises PortInUseError when something already listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of the last server is fine
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                holders = sorted(pid for pid in listener_pids(port) if pid is not None)
                by = f" by {describe_pid(holders[0])}" if holders else ""
                raise PortInUseError(f"port {port} on {host} is already in use{by}: stop that server, "
                                     "pass another --port, or attach to it with --url") from exc
            raise ServerError(f"cannot bind {host}:{port}: {exc.strerror}") from exc


def listener_pids(port: int) -> set[int | None]:
    """PIDs of the processes listening on TCP `port` (None for a socket whose process this user may not see)."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return set()
    return {c.pid for c in conns if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"killed by signal {-code} (exit code {code})"
    if 128 < code < 160:  # a container's (or a shell's) way of saying "killed by signal N"
        try:
            return f"exited with code {code} (128 + {signal.Signals(code - 128).name})"
        except ValueError:
            pass
    return f"exited with code {code}"


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def mapped_allocators(pids: list[int]) -> dict[str, list[str]]:
    """Allocator / OpenMP libraries each process really maps (from /proc/<pid>/maps)."""
    found: dict[str, list[str]] = {}
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        found[str(pid)] = sorted({m.group(0) for m in ALLOCATOR_LIB.finditer(text)})
    return found


def process_facts(pids: list[int]) -> list[dict[str, Any]]:
    """Name, command and LD_PRELOAD of each process in the server tree."""
    facts = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            env = {}
            with contextlib.suppress(psutil.Error):
                env = p.environ()
            facts.append({"pid": pid, "name": p.name(), "cmdline": " ".join(p.cmdline())[:300],
                          "ld_preload": env.get("LD_PRELOAD"), "rss_mb": p.memory_info().rss / 2**20})
        except psutil.Error:
            continue
    return facts


@dataclass
class Readiness:
    health_s: float
    models_s: float
    models: list[str]


class ReadinessMixin:
    """What the local and the docker server share: the base URL, the spawn clock, log lines stamped
    with their arrival time, and /health then /v1/models polling. Needs the fields `host`, `port`,
    `t_spawn` and `lines`, the properties `pid`, and the methods `pids()`, `check_alive(during)` and `log_tail()`."""

    host: str
    port: int
    t_spawn: float
    lines: list[tuple[float, str]]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def since_spawn(self) -> float:
        return time.perf_counter() - self.t_spawn

    def record_line(self, log: Any, raw: bytes) -> None:
        """One line of server output, stamped with its arrival (s since spawn), kept and logged."""
        t = self.since_spawn()
        line = raw.decode(errors="replace").rstrip("\r\n")
        self.lines.append((t, line))
        log.write(f"[{t:9.3f}] {line}\n")
        log.flush()

    def check_alive(self, during: str, grace_s: float = 0.0) -> None:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        raise NotImplementedError

    def check_listener(self) -> None:
        """After /health: raises PortTakenError when the process listening on the port is not one of this
        run's server (its process tree or its container): another server took the port, and every answer
        would be its. A listener this user may not see (another user's) cannot be told apart: let pass."""
        found = listener_pids(self.port)
        own = set(self.pids())
        strangers = sorted(pid for pid in found if pid is not None and pid not in own)
        if strangers and not found & own:
            raise PortTakenError(f"port {self.port} answers /health, but from {describe_pid(strangers[0])}, "
                                 f"not from this run's server (PID {self.pid}): another process "
                                 "took the port; leave out --port for a free one, or pass another",
                                 None, self.log_tail())

    def log_tail(self, n: int = 25) -> list[str]:
        raise NotImplementedError

    def died(self, what: str, exit_code: int | None) -> ServerDiedError:
        """ServerDiedError saying `what`, with the server's own last error line and its log tail."""
        tail = self.log_tail()
        cause = last_error_line([line for _, line in self.lines])
        return ServerDiedError(what + (f"; its last error: {cause}" if cause else ""), exit_code, tail)

    def check_serving(self, during: str) -> None:
        """After a failed request: raises ServerDiedError when the server exited or no longer answers
        /health with 200 (an engine that died under a live API server), naming its own last error."""
        self.check_alive(during)
        try:
            with httpx.Client(timeout=5.0) as client:
                status = client.get(self.base_url + "/health").status_code
        except httpx.HTTPError:
            self.check_alive(during, grace_s=3.0)  # a refused connection comes before the exit is seen
            raise self.died(f"server stopped serving during {during}: /health does not answer", None) from None
        if status != 200:
            raise self.died(f"server stopped serving during {during}: /health answered {status}", None)

    def wait_ready(self, timeout_s: float, expected_model: str | None) -> Readiness:
        """Polls /health then /v1/models; raises on death, timeout or a model the server lacks."""
        deadline = time.perf_counter() + timeout_s
        health_s = None
        with httpx.Client(timeout=5.0) as client:
            while True:
                self.check_alive("start-up")
                if time.perf_counter() > deadline:
                    raise HealthTimeoutError(f"server not healthy after {timeout_s:.0f} s (--health-timeout)",
                                             None, self.log_tail())
                try:
                    if health_s is None:
                        if client.get(self.base_url + "/health").status_code == 200:
                            health_s = self.since_spawn()
                            self.check_listener()
                    else:
                        r = client.get(self.base_url + "/v1/models")
                        if r.status_code == 200:
                            models_s = self.since_spawn()
                            models = models_listed(r, self.base_url + "/v1/models")
                            check_model(expected_model, models)
                            return Readiness(health_s, models_s, models)
                except httpx.TransportError:
                    pass
                time.sleep(0.025)


@dataclass
class LocalServer(ReadinessMixin):
    """One server process group. Use as a context manager: it is always stopped."""

    argv: list[str]
    env: dict[str, str]
    host: str
    port: int
    log_path: Path
    lines: list[tuple[float, str]] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    t_spawn: float = 0.0
    exit_code: int | None = None
    stop_signalled: int | None = None  # a SIGINT/SIGTERM that arrived while stopping (it killed at once)
    watchdog: lifetime.GroupWatchdog | None = None  # kills the group if this process dies before stop()
    cpus: tuple[int, ...] | None = None  # the CPUs the server tree may run on (None: this process's)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        """Starts the server in its own process group, which dies with this process (harness.measure.lifetime):
        the server by its parent-death signal, the rest of its group by the watchdog."""
        check_port_free(self.host, self.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.t_spawn = time.perf_counter()
        try:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=lifetime.owned_env(self.env),
                                         start_new_session=True, preexec_fn=self._preexec())
        except OSError as exc:
            raise ServerError(f"cannot start server {self.argv[0]!r}: {exc.strerror}") from exc
        self.watchdog = lifetime.GroupWatchdog(self.proc.pid)
        threading.Thread(target=self._pump, name="server-log", daemon=True).start()

    def _preexec(self) -> Callable[[], None]:
        """The child dies with this thread; with `cpus`, it runs on those CPUs only (its children inherit them)."""
        dies, cpus = lifetime.dies_with_me(), self.cpus

        def preexec() -> None:
            dies()
            if cpus:
                os.sched_setaffinity(0, cpus)

        return preexec

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "w") as log:
            for raw in self.proc.stdout:
                self.record_line(log, raw)

    def poll(self) -> int | None:
        if self.proc is None:
            return None
        code = self.proc.poll()
        if code is not None:
            self.exit_code = code
        return code

    def log_tail(self, n: int = 25) -> list[str]:
        time.sleep(0.2)  # let the pump drain the last lines of a dying server
        return [line for _, line in self.lines[-n:]]

    def check_alive(self, during: str, grace_s: float = 0.0) -> None:
        """Raises ServerDiedError if the server exited. `grace_s`: after a refused connection the
        socket closes before the process can be reaped, so wait that long for the exit first."""
        if grace_s and self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace_s)
        code = self.poll()
        if code is not None:
            raise self.died(f"server {describe_exit(code)} during {during}", code)

    def pids(self) -> list[int]:
        return [p.pid for p in process_tree(self.pid)] if self.pid else []

    def stop(self, grace_s: float = 20.0, log: Callable[[str], None] | None = None) -> None:
        """SIGTERM to the whole group, SIGKILL after `grace_s`, or at once when SIGINT/SIGTERM comes
        while it waits (that signal cannot cut the stop short: `stop_signalled` keeps it). Says what it
        does and what happened through `log`. Safe to call twice."""
        if self.proc is None:
            return
        try:
            self._stop(grace_s, log or (lambda message: None))
        finally:
            if self.watchdog is not None and not _group_alive(self.proc.pid):
                self.watchdog.release()

    def _stop(self, grace_s: float, say: Callable[[str], None]) -> None:
        assert self.proc is not None
        pgid = self.proc.pid
        if not _group_alive(pgid):
            self.poll()
            return
        with Shielded(say, KILL_NOW) as shield:
            t0 = time.perf_counter()
            say(f"stopping the server (SIGTERM to its process group, up to {grace_s:.0f} s; "
                "Ctrl-C again kills it at once)...")
            _signal_group(pgid, signal.SIGTERM)
            if self._wait_group(pgid, grace_s, shield.hurry):
                self._reap()
                say(f"server stopped: {describe_exit(self.exit_code)}, {time.perf_counter() - t0:.1f} s after "
                    "SIGTERM")
            else:
                self._kill(pgid, self._kill_reason(shield.hurry.is_set(), grace_s), say)
            self.stop_signalled = shield.signalled

    def _reap(self) -> None:
        """The group is gone, but its main process may still be a zombie until waited for: reap it so that
        its exit code is known (else the stop line would read "still running")."""
        assert self.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5.0)
        self.poll()

    def _kill_reason(self, hurried: bool, grace_s: float) -> str:
        if hurried:
            return "at a second Ctrl-C / SIGTERM"
        if self.poll() is None:
            return f"{grace_s:.0f} s after SIGTERM, which it did not obey"
        return f"(its main process {describe_exit(self.exit_code)}, other processes of its group did not)"

    def _kill(self, pgid: int, why: str, say: Callable[[str], None]) -> None:
        _kill_group(pgid)
        if self._wait_group(pgid, 10.0, None):
            say(f"server killed (SIGKILL) {why}")
        else:
            say(f"server processes still running after SIGKILL: PIDs {', '.join(map(str, group_members(pgid)))}")

    def _wait_group(self, pgid: int, timeout_s: float, hurry: threading.Event | None,
                    orphans_s: float = 2.0) -> bool:
        """True once no process of the group is left; False after `timeout_s`, when `hurry` is set, or when
        processes outlive the main one by `orphans_s`."""
        deadline = time.perf_counter() + timeout_s
        leader_gone_at = None
        while True:
            if self.poll() is not None and leader_gone_at is None:  # polling reaps the main process
                leader_gone_at = time.perf_counter()
            if not _group_alive(pgid):
                return True
            now = time.perf_counter()
            if now > deadline or (hurry is not None and hurry.is_set()) or (
                    leader_gone_at is not None and now - leader_gone_at > orphans_s):
                return False
            time.sleep(0.1)

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def check_model(expected: str | None, models: list[str]) -> None:
    """A server that lists models must list ours. `transformers serve` lists only models in the hub
    cache, so a local directory it serves never appears: an empty list cannot be checked."""
    if expected is not None and models and expected not in models:
        raise WrongModelError(f"server does not serve model {expected!r}; it lists {models}")
    if expected is None and not models:
        raise WrongModelError("server lists no models at /v1/models")


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group: what `stop` must leave empty."""
    alive = []
    for p in psutil.process_iter(["status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == pgid:
                alive.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return alive


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return bool(group_members(pgid))


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _kill_group(pgid: int) -> None:
    _signal_group(pgid, signal.SIGKILL)
