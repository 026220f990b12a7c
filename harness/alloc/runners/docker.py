"""Docker runner: each probe in a fresh container of its allocator's image, driven by the SDK.

One container per run (network "none", GPUs through device_requests for cuda), its memory streamed
from the engine while it runs, removed afterwards whatever happens (exit, error, timeout, Ctrl-C).
The duet design's persistent probes (`start_session`) are one long-lived container per arm, created with
stdin open (StdinOnce: the container's stdin ends when the attached client goes away, so a harness killed
hard leaves only stopped containers, which `remove_leftovers` removes); requests go in on an attached
socket, the protocol lines come back as its demultiplexed stdout frames.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import requests
from docker.errors import DockerException, NotFound
from docker.types import DeviceRequest, Mount
from docker.utils.socket import STDOUT, frames_iter

from harness.alloc.runners.base import (
    MarkedLines,
    ProbeOutcome,
    ProbeRequest,
    RunnerError,
    SessionDied,
    SessionEnd,
    format_cpu_list,
    parse_probe_output,
)
from harness.containers import engine
from harness.containers import images as img
from harness.containers.stats import StatsMonitor
from harness.measure.allocators import Allocator, AllocatorError
from harness.measure.signals import Shielded

LABEL_KEY = "harness"
LABEL_VALUE = "probe"
LABEL_FILTER = f"{LABEL_KEY}={LABEL_VALUE}"
STOP_GRACE_S = 15.0  # a persistent probe whose stdin has ended and is still up after this is killed


def remove_leftovers(client: docker.DockerClient) -> int:
    """Remove every probe container whose harness command is gone (killed hard); those in use stay."""
    n = 0
    for c in client.containers.list(all=True, filters={"label": LABEL_FILTER}):
        if engine.owner_pid(c) is not None:
            continue
        try:
            c.remove(force=True)
            n += 1
        except NotFound:
            pass
    return n


class DockerRunner:
    name = "docker"

    def __init__(self, client: docker.DockerClient, device: str, probe_images: dict[str, img.ProbeImage],
                 mem_limit: str | None = None, log: Callable[[str], None] = print) -> None:
        self.client = client
        self.device = device
        self.images = probe_images
        self.mem_limit = mem_limit
        self.log = log
        self._running: set[str] = set()  # names of the probe containers running now
        self._sessions: dict[str, DockerSession] = {}  # persistent probes not yet closed, by container name
        self._lock = threading.Lock()

    def resolve_allocators(self, names: list[str], libs: dict[str, str],
                           envs: dict[str, dict[str, str]]) -> list[Allocator]:
        """Allocators with the library path inside each image (what the probe must report)."""
        missing = [n for n in names if n not in self.images]
        if missing:
            raise AllocatorError(f"no probe image for {', '.join(missing)} (images: {', '.join(self.images)})")
        for name, path in libs.items():
            if name not in self.images or path != self.images[name].library:
                if name not in self.images:
                    raise AllocatorError(f"--allocator-lib {name}=...: no probe image for {name}")
                raise AllocatorError(f"--allocator-lib {name}={path} cannot apply to --runner docker: the image "
                                     f"{self.images[name].tag} preloads {self.images[name].library}")
        return [Allocator(n, self.images[n].library, envs.get(n, {})) for n in names]

    def describe(self) -> dict[str, Any]:
        try:
            version = self.client.version()
            info = self.client.info()
        except (DockerException, requests.exceptions.RequestException) as exc:
            raise RunnerError(f"Docker daemon stopped answering: {exc}") from exc
        any_image = next(iter(self.images.values()))
        return {"runner": "docker", "docker": {
            "engine": version.get("Version"), "api": version.get("ApiVersion"),
            "cgroup": info.get("CgroupVersion"), "cgroup_driver": info.get("CgroupDriver"),
            "storage_driver": info.get("Driver"), "runtimes": sorted(info.get("Runtimes") or {}),
            "images": {name: pi.describe() for name, pi in self.images.items()},
            "wheels": engine.wheel_set(any_image.labels.get(img.LABEL + "wheels", "[]")),
            "mem_limit": self.mem_limit,
        }}

    def _model_and_mounts(self, model: str) -> tuple[str, list[Mount], dict[str, str]]:
        """Local model directories bind-mounted read-only; the HF cache for hub ids."""
        if os.path.isdir(model):
            target = f"/models/{Path(model).resolve().name}"
            return target, [Mount(target, str(Path(model).resolve()), type="bind", read_only=True)], {}
        if model.startswith("synthetic:"):
            return model, [], {}
        hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
        if hf_home.is_dir():
            mount = Mount("/hf", str(hf_home.resolve()), type="bind", read_only=True)
            return model, [mount], {"HF_HOME": "/hf"}
        return model, [], {}

    def _create(self, request: ProbeRequest, name: str, session: bool = False) -> tuple[Any, img.ProbeImage]:
        """The (created, not started) probe container for `request`; `session`: a persistent probe, stdin open."""
        probe_image = self.images.get(request.allocator.name)
        if probe_image is None:
            raise RunnerError(f"no image for allocator {request.allocator.name!r}")
        model, mounts, env = self._model_and_mounts(request.model)
        args = request.probe_args()
        args[args.index("--model") + 1] = model
        env.update(request.allocator.env)
        kwargs: dict[str, Any] = {}
        if request.device.startswith("cuda"):
            kwargs["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
        if self.mem_limit:
            kwargs.update(mem_limit=self.mem_limit, memswap_limit=self.mem_limit)
        if request.placement and request.placement.cpus:
            kwargs["cpuset_cpus"] = format_cpu_list(request.placement.cpus)
        if session:  # stdin open, no tty; not detached, so StdinOnce: stdin ends with the attached client
            args = ["--session", *args]
            kwargs.update(stdin_open=True, tty=False)
        container = self.client.containers.create(
            probe_image.id, args, name=name, environment=env, mounts=mounts, network_mode="none",
            labels={LABEL_KEY: LABEL_VALUE, "harness.allocator": request.allocator.name,
                    **engine.owner_labels()}, **kwargs)
        return container, probe_image

    def _docker_error(self, exc: Exception, what: str, name: str | None = None) -> RunnerError:
        if name is not None and engine.removed_under_us(exc):
            return RunnerError(f"the probe container {name} was removed from outside while {what} (docker rm -f?); "
                               "continue with --resume")
        if not engine.daemon_alive(self.client):
            return RunnerError(f"the Docker daemon stopped answering during a run ({exc}); runs recorded "
                               f"so far are kept; restart it ({engine.FIX_DAEMON}) and continue with --resume")
        return RunnerError(f"Docker error {what}: {exc}")

    def run_probe(self, request: ProbeRequest) -> ProbeOutcome:
        name = f"harness-probe-{request.allocator.name}-{uuid.uuid4().hex[:8]}"
        container = None
        self._running.add(name)
        try:
            container, probe_image = self._create(request, name)
            return self._run(container, probe_image, request)
        except (DockerException, requests.exceptions.RequestException) as exc:
            raise self._docker_error(exc, f"running the {request.allocator.name} probe", name) from exc
        finally:
            self._running.discard(name)
            if container is not None:
                with Shielded(self.log, f"removing probe container {name} first"):  # a second signal waits
                    self._remove(container)

    def start_session(self, request: ProbeRequest) -> DockerSession:
        """A persistent probe in a fresh container of its allocator's image, attached and started now."""
        name = f"harness-session-{request.allocator.name}-{uuid.uuid4().hex[:8]}"
        container = None
        with self._lock:
            self._running.add(name)
        try:
            container, probe_image = self._create(request, name, session=True)
            session = DockerSession(self, container, probe_image, request)
        except BaseException as exc:
            with self._lock:
                self._running.discard(name)
            if container is not None:
                with Shielded(self.log, f"removing probe container {name} first"):
                    self._remove(container)
            if isinstance(exc, DockerException | requests.exceptions.RequestException):
                raise self._docker_error(exc, f"starting the {request.allocator.name} probe") from exc
            raise
        with self._lock:
            self._sessions[name] = session
        return session

    def _session_ended(self, name: str) -> None:
        with self._lock:
            self._running.discard(name)
            self._sessions.pop(name, None)

    def _remove(self, container: Any) -> None:
        try:
            container.remove(force=True)  # kills it first if it still runs (timeout, Ctrl-C, SIGTERM)
        except NotFound:
            pass
        except (DockerException, requests.exceptions.RequestException) as exc:
            self.log(f"docker: could not remove container {container.name}: {exc}")

    def _run(self, container: Any, probe_image: img.ProbeImage, request: ProbeRequest) -> ProbeOutcome:
        monitor = StatsMonitor(container)
        t0 = time.perf_counter()
        container.start()
        monitor.start()
        timed_out = False
        try:
            container.wait(timeout=request.timeout_s)
        except requests.exceptions.RequestException:
            if not engine.daemon_alive(self.client):
                raise
            timed_out = True
            container.kill()
            container.wait(timeout=60)
        client_wall = time.perf_counter() - t0
        monitor.join(timeout=3.0)
        container.reload()
        state = container.attrs.get("State", {})
        started, finished = engine.parse_time(state.get("StartedAt")), engine.parse_time(state.get("FinishedAt"))
        wall = (finished - started).total_seconds() if started and finished else client_wall
        stdout = container.logs(stdout=True, stderr=False).decode(errors="replace").splitlines()
        stderr = container.logs(stdout=False, stderr=True).decode(errors="replace").splitlines()
        code = state.get("ExitCode")
        oom = bool(state.get("OOMKilled"))
        probe, error = parse_probe_output(stdout)
        if timed_out:
            probe, error = None, f"timed out after {request.timeout_s:.0f} s (container killed)"
        elif oom:
            probe, error = None, f"container OOM-killed (exit code {code}, memory limit {self.mem_limit})"
        elif probe is None and error is None:
            error = f"probe exited with code {code}" + (" (killed by SIGKILL)" if code == 137 else "")
        info = {"id": container.id, "name": container.name, "image": probe_image.tag,
                "image_id": probe_image.id, "oom_killed": oom, "exit_code": code,
                "started_at": state.get("StartedAt"), "finished_at": state.get("FinishedAt"),
                "client_wall_s": client_wall, "stats_error": monitor.error, **monitor.peaks.to_dict()}
        return ProbeOutcome(exit_code=code, wall_real_s=wall, probe=probe, error=error,
                            log_tail=(stderr + stdout)[-20:] if probe is None else [], container=info)

    def abort(self) -> None:
        """Kills this runner's probe containers, persistent ones included; the thread running each one (the
        set's, for a persistent probe, or `close()`) removes it."""
        with self._lock:
            names = list(self._running)
        for name in names:
            try:
                self.client.containers.get(name).kill()
            except (DockerException, requests.exceptions.RequestException) as exc:
                self.log(f"docker: could not kill probe container {name}: {exc}")

    def close(self) -> None:
        """Kills and removes any persistent probe still open (normally each set has closed its own)."""
        with self._lock:
            left = list(self._sessions.values())
        for session in left:
            session.kill()
            session.close()
        self.client.close()


def _stdout_lines(sock: Any) -> Iterator[str]:
    """The container's stdout as lines, from the attach socket's multiplexed frames (8-byte headers); ends
    when the container's output ends (it exited, was killed or removed) or the socket is closed."""
    pending = b""
    try:
        for stream, data in frames_iter(sock, tty=False):
            if stream != STDOUT:
                continue
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.decode(errors="replace")
    except OSError:  # the socket was closed under the reader
        pass
    if pending:
        yield pending.decode(errors="replace")


class DockerSession:
    """A persistent probe container (`python -m harness.probe --session` as its entrypoint): requests written
    on the attached socket (the container's stdin), protocol lines read from its stdout frames, its memory
    streamed from the engine, its stderr read from the engine's log once it has ended."""

    def __init__(self, runner: DockerRunner, container: Any, probe_image: img.ProbeImage,
                 request: ProbeRequest) -> None:
        self.runner, self.container, self.image, self.request = runner, container, probe_image, request
        self.name = container.name
        # Attached before it starts, so that no line it prints is missed.
        self._sock = runner.client.api.attach_socket(container.id, params={"stdin": 1, "stdout": 1, "stream": 1})
        self._raw = getattr(self._sock, "_sock", self._sock)  # the socket under the SDK's SocketIO wrapper
        self._raw.settimeout(None)  # the reader blocks until the container's output ends; waits time out above
        self.monitor = StatsMonitor(container)
        self.t0 = time.perf_counter()
        try:
            container.start()
        except BaseException:
            self._close_socket()
            raise
        self.monitor.start()
        self.lines = MarkedLines(_stdout_lines(self._raw),
                                 f"{request.allocator.name} probe (container {container.short_id})")
        self._end: SessionEnd | None = None

    def ready(self, timeout_s: float):
        return self.lines.expect_ready(timeout_s)

    def window(self, request, timeout_s: float):
        try:
            self._raw.sendall((request.line() + "\n").encode())
        except OSError as exc:
            raise SessionDied(f"{self.lines.describe}: cannot send it a request ({exc})") from None
        return self.lines.expect_window(request.window, timeout_s)

    def kill(self) -> None:
        with contextlib.suppress(DockerException, requests.exceptions.RequestException):
            self.container.kill()  # not running any more (409) or gone (404): nothing to kill

    def _close_socket(self) -> None:
        with contextlib.suppress(OSError):
            self._raw.close()
        with contextlib.suppress(OSError):
            self._sock.close()

    def _wait(self) -> str | None:
        """Waits for the container to exit after its stdin ended; kills it after STOP_GRACE_S. The engine's
        error, if it could not be waited for."""
        try:
            self.container.wait(timeout=STOP_GRACE_S)
            return None
        except requests.exceptions.RequestException:
            if not engine.daemon_alive(self.runner.client):
                return "the Docker daemon stopped answering"
        except DockerException as exc:
            return f"{type(exc).__name__}: {exc}"
        self.kill()
        try:
            self.container.wait(timeout=60)
        except (DockerException, requests.exceptions.RequestException) as exc:
            return f"{type(exc).__name__}: {exc}"
        return f"still running {STOP_GRACE_S:.0f} s after its stdin ended: killed"

    def close(self) -> SessionEnd:
        """Ends its stdin, waits for it to exit (kills it when it does not), records how it ended, removes it."""
        if self._end is not None:
            return self._end
        with contextlib.suppress(OSError):
            self._raw.shutdown(socket.SHUT_WR)  # end of stdin: the probe leaves its request loop and exits
        with Shielded(self.runner.log, f"removing probe container {self.name} first"):  # a second signal waits
            try:
                self._end = self._ended(self._wait())
            finally:
                self._close_socket()
                self.runner._remove(self.container)
                self.runner._session_ended(self.name)
        return self._end

    def _ended(self, error: str | None) -> SessionEnd:
        client_wall = time.perf_counter() - self.t0
        self.monitor.join(timeout=1.0)  # its peaks are kept as it samples; the stream goes on until removal
        state: dict[str, Any] = {}
        stderr: list[str] = []
        try:
            self.container.reload()
            state = self.container.attrs.get("State", {})
            stderr = self.container.logs(stdout=False, stderr=True).decode(errors="replace").splitlines()
        except (DockerException, requests.exceptions.RequestException) as exc:
            error = error or f"{type(exc).__name__}: {exc}"
        started, finished = engine.parse_time(state.get("StartedAt")), engine.parse_time(state.get("FinishedAt"))
        code = state.get("ExitCode") if finished else None
        oom = bool(state.get("OOMKilled"))
        info = {"id": self.container.id, "name": self.name, "image": self.image.tag, "image_id": self.image.id,
                "oom_killed": oom, "exit_code": code, "started_at": state.get("StartedAt"),
                "finished_at": state.get("FinishedAt"), "client_wall_s": client_wall, "error": error,
                "stats_error": self.monitor.error, **self.monitor.peaks.to_dict()}
        tail = stderr[-20:] if code != 0 else []
        if oom:
            tail.append(f"container OOM-killed (exit code {code}, memory limit {self.runner.mem_limit})")
        return SessionEnd(exit_code=code, wall_real_s=(finished - started).total_seconds()
                          if started and finished else client_wall, log_tail=tail, container=info)


def make_docker_runner(device: str, allocators: list[str], rebuild: bool = False,
                       mem_limit: str | None = None, log: Callable[[str], None] = print) -> DockerRunner:
    """Connect, check (or build) the allocator images, return the runner. RunnerError otherwise."""
    unknown = [a for a in allocators if a not in img.KNOWN]
    if unknown:
        raise AllocatorError(f"the docker runner has images for {', '.join(img.KNOWN)} only, not "
                             f"{', '.join(unknown)}")
    client = engine.connect(timeout=600)
    try:
        probe_images = img.ensure_images(client, allocators, img.variant_for(device), rebuild, log)
    except (img.ImageError, img.wheelhouse.WheelhouseError) as exc:
        client.close()
        raise RunnerError(f"probe images unavailable: {exc}\n"
                          "build them with scripts/build-images.sh") from exc
    return DockerRunner(client, device, probe_images, mem_limit=mem_limit, log=log)
