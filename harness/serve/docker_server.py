"""The server as a container, driven through the Docker SDK: the same lifecycle as LocalServer.

Host networking with the server bound to 127.0.0.1 (nothing leaves loopback), model directories
bind-mounted read-only, GPUs through device_requests, label `harness=server`. The container is
removed by `stop()`, which run_serve calls in a `finally` (success, fault, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import requests
from docker.errors import DockerException, NotFound
from docker.types import DeviceRequest, Mount

from harness.containers.engine import owner_labels, owner_pid
from harness.containers.stats import StatsMonitor
from harness.measure.signals import Shielded
from harness.serve.server import ReadinessMixin, ServerError, check_port_free, describe_exit

LABEL_KEY = "harness"
LABEL_VALUE = "server"
LABEL_FILTER = f"{LABEL_KEY}={LABEL_VALUE}"
POLL_S = 0.2  # container state is asked at most this often while waiting for readiness
DockerErrors = (DockerException, requests.exceptions.RequestException)


@dataclass
class ContainerSpec:
    """What the container runs: image, arguments for its entrypoint, environment, mounts."""

    image: str
    args: list[str]
    env: dict[str, str]
    mounts: list[Mount] = field(default_factory=list)
    entrypoint: list[str] | None = None
    gpus: bool = False
    shm_size: str = "1g"
    # vLLM's CPU recipe (docs, installation/cpu): --security-opt seccomp=unconfined --cap-add SYS_NICE.
    # Docker's default profile refuses migrate_pages even with SYS_NICE ("numa_migrate_pages failed").
    seccomp_unconfined: bool = False

    def create_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "command": self.args, "environment": self.env, "mounts": self.mounts, "network_mode": "host",
            "labels": {LABEL_KEY: LABEL_VALUE, **owner_labels()}, "shm_size": self.shm_size,
            "stdin_open": False,
            # docker-init as PID 1: it forwards SIGTERM (a bare PID 1 ignores it until the server installs
            # a handler, so `stop` during start-up would wait out the grace period) and reaps children.
            "init": True,
            # vLLM CPU pins its threads and sets NUMA memory policy: Docker's default seccomp profile
            # allows mbind/set_mempolicy only with CAP_SYS_NICE.
            "cap_add": ["SYS_NICE"],
        }
        if self.entrypoint is not None:
            kw["entrypoint"] = self.entrypoint
        if self.seccomp_unconfined:
            kw["security_opt"] = ["seccomp=unconfined"]
        if self.gpus:
            kw["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
        return kw


def remove_exited_leftovers(client: docker.DockerClient) -> tuple[int, list[str]]:
    """Removes stopped `harness=server` containers no running harness owns (a harness killed hard); names the
    running ones that no running harness owns. One with a live owner, in any state, is another command's
    server, in use."""
    removed, running = 0, []
    for c in client.containers.list(all=True, filters={"label": LABEL_FILTER}):
        if owner_pid(c) is not None:
            continue
        if c.status == "running":
            running.append(c.name)
            continue
        with contextlib.suppress(NotFound):
            c.remove(force=True)
            removed += 1
    return removed, running


@dataclass
class DockerServer(ReadinessMixin):
    """One server container. `stop()` always removes it; safe to call twice."""

    client: docker.DockerClient
    spec: ContainerSpec
    host: str
    port: int
    log_path: Path
    lines: list[tuple[float, str]] = field(default_factory=list)
    container: Any = None
    monitor: StatsMonitor | None = None
    t_spawn: float = 0.0
    exit_code: int | None = None
    oom_killed: bool = False
    removed: bool = False  # removed from outside (docker rm -f) while we ran
    create_s: float | None = None  # docker create, before the spawn clock starts
    start_api_s: float | None = None  # the start call itself (inside spawn -> health)
    stop_signalled: int | None = None  # a SIGINT/SIGTERM that arrived while stopping (it killed at once)
    _pid: int | None = None
    _polled_at: float = 0.0

    @property
    def pid(self) -> int | None:
        """Host PID of the container's main process (the server), once started."""
        return self._pid

    @property
    def name(self) -> str | None:
        return self.container.name if self.container is not None else None

    def start(self) -> None:
        check_port_free(self.host, self.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        name = f"harness-server-{uuid.uuid4().hex[:8]}"
        t0 = time.perf_counter()
        try:
            self.container = self.client.containers.create(self.spec.image, name=name,
                                                           **self.spec.create_kwargs())
            self.create_s = time.perf_counter() - t0
            self.t_spawn = time.perf_counter()
            self.container.start()
            self.start_api_s = self.since_spawn()
            self.container.reload()
        except DockerErrors as exc:
            raise ServerError(f"cannot start the server container from {self.spec.image}: {exc}") from exc
        self._pid = self.container.attrs.get("State", {}).get("Pid") or None
        self.monitor = StatsMonitor(self.container)
        self.monitor.start()
        threading.Thread(target=self._pump, name="server-log", daemon=True).start()

    def _pump(self) -> None:
        """Container output, line by line, stamped with its arrival time (s since spawn)."""
        buf = b""
        with open(self.log_path, "w") as log:
            try:
                for chunk in self.container.logs(stream=True, follow=True, stdout=True, stderr=True):
                    buf += chunk
                    *done, buf = buf.split(b"\n")
                    for raw in done:
                        self.record_line(log, raw)
            except DockerErrors:
                pass  # removed while streaming
            if buf:
                self.record_line(log, buf)

    def poll(self, force: bool = False) -> int | None:
        """The exit code once the container has stopped (state asked at most every POLL_S)."""
        if self.container is None or self.exit_code is not None:
            return self.exit_code
        now = time.perf_counter()
        if not force and now - self._polled_at < POLL_S:
            return None
        self._polled_at = now
        try:
            self.container.reload()
        except NotFound:
            self.removed = True
            return self.exit_code
        except DockerErrors as exc:
            raise ServerError(f"the Docker daemon stopped answering ({exc}); measured requests are kept") from exc
        state = self.container.attrs.get("State", {})
        if state.get("Status") in ("exited", "dead"):
            self.exit_code = state.get("ExitCode")
            self.oom_killed = bool(state.get("OOMKilled"))
        return self.exit_code

    def log_tail(self, n: int = 25) -> list[str]:
        time.sleep(0.3)  # let the log stream deliver the last lines of a dying container
        return [line for _, line in self.lines[-n:]]

    def check_alive(self, during: str, grace_s: float = 0.0) -> None:
        """Raises ServerDiedError if the container stopped; `grace_s` waits that long for the exit
        after a refused connection (the socket closes before the engine reports the container)."""
        deadline = time.perf_counter() + grace_s
        code = self.poll(force=True) if grace_s else self.poll()
        while code is None and time.perf_counter() < deadline:
            time.sleep(POLL_S)
            code = self.poll(force=True)
        if code is None and self.removed:
            raise self.died(f"server container {self.name} was removed from outside during {during}", None)
        if code is not None:
            oom = " (OOM-killed)" if self.oom_killed else ""
            raise self.died(f"server container {describe_exit(code)}{oom} during {during}", code)

    def pids(self) -> list[int]:
        """Host PIDs of the container's processes (for /proc/<pid>/maps and the process facts)."""
        if self.container is None:
            return []
        try:
            top = self.container.top(ps_args="-eo pid")
        except DockerErrors:
            return [self._pid] if self._pid else []
        return [int(p[0]) for p in top.get("Processes") or [] if p and str(p[0]).isdigit()]

    def describe(self) -> dict[str, Any]:
        """For startup.jsonl: the container, its image and its memory peaks."""
        peaks = self.monitor.peaks.to_dict() if self.monitor else {}
        return {"name": self.name, "id": self.container.id if self.container is not None else None,
                "image": self.spec.image, "create_s": self.create_s, "start_api_s": self.start_api_s,
                "oom_killed": self.oom_killed, "stats_error": self.monitor.error if self.monitor else None,
                **peaks}

    def stop(self, grace_s: float = 20.0, log: Callable[[str], None] | None = None) -> None:
        """SIGTERM, SIGKILL after `grace_s` or at once when SIGINT/SIGTERM comes while it waits (that signal
        cannot cut the stop short), then remove the container, whatever happened. Says what it does through
        `log`; safe to call twice."""
        if self.container is None:
            return
        say = log or (lambda message: None)
        with Shielded(say, "removing the server container now (SIGKILL)") as shield:
            try:
                if self._running():
                    self._terminate(grace_s, shield.hurry, say)
            finally:
                self._remove(say)
            self.stop_signalled = shield.signalled

    def _running(self) -> bool:
        try:
            return self.poll(force=True) is None and not self.removed
        except ServerError:
            return True  # the daemon did not answer: remove() tries once more and says what happened

    def _terminate(self, grace_s: float, hurry: threading.Event, say: Callable[[str], None]) -> None:
        say(f"stopping the server container {self.name} (SIGTERM, up to {grace_s:.0f} s; "
            "Ctrl-C again kills it at once)...")
        t0 = time.perf_counter()
        with contextlib.suppress(*DockerErrors):
            self.container.kill(signal="SIGTERM")
        while time.perf_counter() - t0 < grace_s and not hurry.is_set():
            if not self._running():
                say(f"server container stopped: {describe_exit(self.exit_code)}, "
                    f"{time.perf_counter() - t0:.1f} s after SIGTERM")
                return
            time.sleep(POLL_S)
        say("server container killed (SIGKILL) " + ("at a second Ctrl-C / SIGTERM" if hurry.is_set() else
                                                    f"{grace_s:.0f} s after SIGTERM, which it did not obey"))

    def _remove(self, say: Callable[[str], None]) -> None:
        try:
            self.container.remove(force=True)  # kills it first if it still runs
        except NotFound:
            pass
        except DockerErrors as exc:
            raise ServerError(f"could not remove container {self.name}: {exc}; remove it with "
                              f"`docker rm -f {self.name}`") from exc
        finally:
            if self.monitor is not None:
                self.monitor.join(timeout=2.0)

    def __enter__(self) -> DockerServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
