"""The Docker engine, as both experiments use it: the connection, whether the docker runner can be used
here, which harness process owns a container, and the labels and timestamps the engine keeps."""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import psutil
import requests
from docker.errors import DockerException

from harness.containers import images as img
from harness.errors import RunnerError

OWNER_LABEL = "harness.owner_pid"  # the harness process that runs a container (probe or server)
OWNER_STARTED_LABEL = "harness.owner_started"  # that process's start time: it, not a later one with its PID
TEST_RUN_ENV, TEST_RUN_LABEL = "HARNESS_TEST_RUN", "harness.test_run"  # a test run's mark on what it starts
FIX_DAEMON = "scripts/setup-docker.sh"
DEFAULT_SOCKET = "unix:///var/run/docker.sock"


def daemon_address() -> str:
    """Where the Docker SDK looks for the daemon: DOCKER_HOST, else the default socket (a path, for a socket)."""
    return (os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET).removeprefix("unix://")


def _linked(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception it wraps: causes, contexts, and those the SDK, requests and urllib3 keep in
    their arguments or their `reason`."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        inner = [*current.args, getattr(current, "reason", None), current.__cause__, current.__context__]
        stack.extend(e for e in inner if isinstance(e, BaseException))


def daemon_problem(exc: BaseException) -> str:
    """Why the daemon cannot be used, in words ("no Docker daemon at /var/run/docker.sock"), not the SDK's
    nested exception reprs."""
    where = daemon_address()
    linked = list(_linked(exc))
    if any(isinstance(e, requests.exceptions.Timeout | TimeoutError) for e in linked):
        return f"the Docker daemon at {where} did not answer in time"
    for e in linked:
        if isinstance(e, OSError) and e.errno == errno.ENOENT:
            return f"no Docker daemon at {where}"
        if isinstance(e, OSError) and e.errno == errno.ECONNREFUSED:
            return f"no Docker daemon answers at {where} (connection refused)"
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM):
            return f"no permission to use the Docker daemon at {where} (run as root or join the docker group)"
        if isinstance(e, OSError) and e.strerror:
            return f"the Docker daemon at {where} cannot be reached: {e.strerror}"
    if isinstance(exc, docker.errors.APIError):
        return f"the Docker daemon at {where} answered with an error: {exc.explanation or exc.status_code}"
    return f"the Docker daemon at {where} cannot be used: {' '.join(str(exc).split())[:120]}"


def connect(timeout: int = 120) -> docker.DockerClient:
    """A client whose daemon answers, or RunnerError saying how to start one."""
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
        return client
    except (DockerException, requests.exceptions.RequestException) as exc:
        raise RunnerError(f"{daemon_problem(exc)}; start one with {FIX_DAEMON}") from exc


def docker_available(device: str = "cpu", allocators: list[str] | None = None) -> tuple[bool, str]:
    """For `--runner auto`: can the docker runner be used here, and why (not)."""
    try:
        client = connect(timeout=10)
    except RunnerError as exc:
        return False, str(exc)
    try:
        version = client.version().get("Version", "?")
        status = img.images_status(client, allocators or ["glibc", "jemalloc"], img.variant_for(device))
    except (DockerException, requests.exceptions.RequestException) as exc:
        return False, daemon_problem(exc)
    finally:
        client.close()
    if all(s == "ok" for s in status.values()):
        return True, f"Docker {version} reachable, probe images present"
    todo = ", ".join(f"{a} {s}" for a, s in status.items() if s != "ok")
    if img.variant_for(device) == "cpu" and not can_build_cpu_base():
        return False, f"Docker {version} reachable but images not usable ({todo}) and cannot be built here " \
                      "(needs root and debootstrap: scripts/setup-docker.sh && scripts/build-images.sh)"
    return True, f"Docker {version} reachable; images will be built ({todo})"


def can_build_cpu_base() -> bool:
    try:
        client = docker.from_env(timeout=10)
        if img.find_image(client, img.CPU_BASE) is not None:
            return True
    except DockerException:
        return False
    return os.geteuid() == 0 and any(Path(d, "debootstrap").exists() for d in ("/usr/sbin", "/sbin"))


def owner_labels() -> dict[str, str]:
    """The labels that name this process as the owner of a container it creates (and the test run that
    started it, where HARNESS_TEST_RUN says so: a test suite removes only its own containers)."""
    labels = {OWNER_LABEL: str(os.getpid()), OWNER_STARTED_LABEL: repr(psutil.Process().create_time())}
    if os.environ.get(TEST_RUN_ENV):
        labels[TEST_RUN_LABEL] = os.environ[TEST_RUN_ENV]
    return labels


def owner_pid(container: Any) -> int | None:
    """The harness process that owns `container`, whatever the container's state (created, running,
    exited), while that process still runs; None once it has ended, when its PID now belongs to another
    process, or for containers of harness versions without the owner label."""
    labels = container.labels or {}
    label = labels.get(OWNER_LABEL, "")
    if not label.isdigit():
        return None
    try:
        process = psutil.Process(int(label))
        started = process.create_time()
        if OWNER_STARTED_LABEL in labels:  # the very process that created it
            return int(label) if abs(started - float(labels[OWNER_STARTED_LABEL])) < 0.05 else None
        created = parse_time(container.attrs.get("Created"))  # older labels: started before it, and a harness
        is_harness = any("harness" in part for part in process.cmdline())
    except (psutil.Error, ValueError):
        return None
    return int(label) if created is not None and started <= created.timestamp() + 1.0 and is_harness else None


def removed_under_us(exc: BaseException) -> bool:
    """Whether a Docker error says the container is gone or being removed (`docker rm -f` from outside)."""
    if isinstance(exc, docker.errors.NotFound):
        return True
    explanation = str(getattr(exc, "explanation", "") or "")
    return isinstance(exc, docker.errors.APIError) and exc.status_code == 409 and (
        "removal" in explanation or "marked for removal" in explanation or "is dead" in explanation)


def parse_time(value: str | None) -> dt.datetime | None:
    """Docker's RFC 3339 timestamps with nanoseconds; None for the zero time."""
    if not value or value.startswith("0001-"):
        return None
    head, _, frac = value.rstrip("Z").partition(".")
    frac = (frac.split("+")[0].split("-")[0] + "000000")[:6]
    return dt.datetime.fromisoformat(f"{head}.{frac}+00:00")


def wheel_set(label: str) -> list[dict[str, str]]:
    """The image label's "name==version sha256:HEX" entries as records."""
    out = []
    for item in json.loads(label):
        spec, _, digest = item.partition(" sha256:")
        name, _, version = spec.partition("==")
        out.append({"name": name, "version": version, "sha256": digest})
    return out


def daemon_alive(client: docker.DockerClient) -> bool:
    try:
        return bool(client.ping())
    except (DockerException, requests.exceptions.RequestException):
        return False
