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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ALLOCATOR_LIB = re.compile(r"/\S*lib(tcmalloc|jemalloc|mimalloc|iomp5|gomp)[^/\s]*\.so[.\d]*")


class ServerError(RuntimeError):
    """The server could not be started or stopped serving; `detail` goes into the report."""

    def __init__(self, message: str, exit_code: int | None = None, log_tail: list[str] | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.log_tail = log_tail or []


class PortInUseError(ServerError):
    pass


class ServerDiedError(ServerError):
    pass


class HealthTimeoutError(ServerError):
    pass


class WrongModelError(ServerError):
    pass


def check_port_free(host: str, port: int) -> None:
    """Raises PortInUseError when something already listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of the last server is fine
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(f"port {port} on {host} is already in use: stop that server, "
                                     "pass --port, or attach to it with --url") from exc
            raise ServerError(f"cannot bind {host}:{port}: {exc.strerror}") from exc


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
    `t_spawn` and `lines`, and the methods `check_alive(during)` and `log_tail()`."""

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

    def log_tail(self, n: int = 25) -> list[str]:
        raise NotImplementedError

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
                    else:
                        r = client.get(self.base_url + "/v1/models")
                        if r.status_code == 200:
                            models_s = self.since_spawn()
                            models = [m.get("id") for m in r.json().get("data", [])]
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

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        check_port_free(self.host, self.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.t_spawn = time.perf_counter()
        try:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        except OSError as exc:
            raise ServerError(f"cannot start server {self.argv[0]!r}: {exc.strerror}") from exc
        threading.Thread(target=self._pump, name="server-log", daemon=True).start()

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
            raise ServerDiedError(f"server {describe_exit(code)} during {during}", code, self.log_tail())

    def pids(self) -> list[int]:
        return [p.pid for p in process_tree(self.pid)] if self.pid else []

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the whole group, SIGKILL after `grace_s`. Safe to call twice."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            if not _group_alive(pgid):
                break
            time.sleep(0.5)
        _kill_group(pgid)  # engine children that outlived their parent
        self.poll()

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


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
