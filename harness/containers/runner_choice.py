"""`--runner auto`, decided once for both experiments: docker where the engine answers and the images can be
used, else local, always with the reason (said on the console and kept in the results)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from harness.errors import UsageError

RUNNERS = ("auto", "local", "docker")
DEFAULT_RUNNER = "auto"
NO_DOCKER_SDK = "the Docker SDK for Python (pip package 'docker') is not importable"


@dataclass(frozen=True)
class RunnerChoice:
    kind: str  # "local" | "docker"
    why: str

    def line(self) -> str:
        return f"runner auto: {self.kind} ({self.why})"


def choose_runner(requested: str, docker_usable: Callable[[], tuple[bool, str]],
                  local_only: str | None = None) -> RunnerChoice:
    """The runner for `--runner requested` (auto, local or docker). `local_only`: why only the local runner
    can do what was asked (None: both can). `docker_usable()`: whether the docker runner can be used here and
    why (not); it imports the Docker SDK itself, so a host without it gets the local runner. Raises
    UsageError, with the reason, where `--runner docker` cannot work."""
    if requested not in RUNNERS:
        raise UsageError(f"unknown --runner {requested!r} ({', '.join(RUNNERS)})")
    if requested == "local":
        return RunnerChoice("local", "--runner local")
    if local_only is not None:
        if requested == "docker":
            raise UsageError(f"--runner docker: {local_only}")
        return RunnerChoice("local", local_only)
    try:
        usable, why = docker_usable()
    except ImportError as exc:
        usable, why = False, f"{NO_DOCKER_SDK} ({exc})"
    if requested == "docker":
        if not usable:
            raise UsageError(f"--runner docker: {why}")
        return RunnerChoice("docker", f"--runner docker; {why}")
    return RunnerChoice("docker" if usable else "local", why)
