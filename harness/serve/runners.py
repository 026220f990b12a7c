"""Where serve's fresh servers run, behind one interface: `LocalServers` (a process group here) and the docker
runner (`docker_setup.DockerContext`, a container each). The probe `Runner` of harness alloc is the peer."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from harness.measure.allocators import Allocator
from harness.serve import engines
from harness.serve.config import ServeConfig
from harness.serve.sampler import MemorySampler
from harness.serve.server import LocalServer, Readiness


class Server(Protocol):
    """One fresh server, local process group or container: what LocalServer and DockerServer share."""

    lines: list[tuple[float, str]]
    t_spawn: float
    exit_code: int | None
    stop_signalled: int | None

    @property
    def pid(self) -> int | None: ...

    @property
    def base_url(self) -> str: ...

    def start(self) -> None: ...

    def wait_ready(self, timeout_s: float, expected_model: str | None) -> Readiness: ...

    def check_serving(self, during: str) -> None: ...

    def pids(self) -> list[int]: ...

    def log_tail(self, n: int = 25) -> list[str]: ...

    def since_spawn(self) -> float: ...

    def stop(self, grace_s: float = 20.0, log: Callable[[str], None] | None = None) -> None: ...


class ServerRunner(Protocol):
    """Starts the fresh servers of one serve run, and says what its servers add to their records."""

    name: str  # "local" | "docker"
    host_pids_in_log: bool  # whether the PIDs in a server's log are host PIDs (not a container's)
    has_container: bool  # the sampler records a container's memory, not a process tree's RSS

    def arms(self, config: ServeConfig) -> list[Allocator]:
        """The --allocators arms, each with the library its servers preload."""

    def server(self, k: int, spec: engines.ServerSpec, arm: Allocator | None, log_path: Path) -> Server:
        """Server k, not started yet."""

    def where(self, arm: Allocator | None) -> str:
        """Where it runs, for the start line ("" or " in a container of IMAGE")."""

    def started(self, server: Server, record: dict[str, Any], sampler: MemorySampler) -> None:
        """Once it runs: what the memory sampler follows, and what its start-up record gains."""

    def finished(self, server: Server, record: dict[str, Any], sampler: MemorySampler) -> bool:
        """Once it is stopped: the sampler let go, its record completed, what it left cleaned up. Returns
        whether it started with empty compile caches."""

    def environment(self, log: Callable[[str], None]) -> dict[str, Any]:
        """What serve/environment.json records of this runner."""

    def close(self) -> None: ...


class LocalServers:
    """Each server a process group of this host; with --compile-cache fresh, vLLM's and Triton's caches in a
    new directory for each (a new node), removed once it stopped."""

    name = "local"
    host_pids_in_log = True
    has_container = False

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self._cache_dir: str | None = None

    def server(self, k: int, spec: engines.ServerSpec, arm: Allocator | None, log_path: Path) -> Server:
        cfg = self.config
        env = dict(spec.env)
        self._cache_dir = None
        if cfg.engine == "vllm" and cfg.compile_cache == "fresh":
            # A new node: neither vLLM's torch.compile cache nor Triton's kernel cache (kept apart) is warm.
            self._cache_dir = tempfile.mkdtemp(prefix=f"harness-vllm-cache-s{k}-")
            env["VLLM_CACHE_ROOT"] = self._cache_dir
            env["TRITON_CACHE_DIR"] = os.path.join(self._cache_dir, "triton")
        return LocalServer(spec.argv, env, cfg.host, cfg.port, log_path)

    def arms(self, config: ServeConfig) -> list[Allocator]:
        return config.arms(check_files=True)

    def where(self, arm: Allocator | None) -> str:
        return ""

    def started(self, server: Server, record: dict[str, Any], sampler: MemorySampler) -> None:
        sampler.set_root(server.pid)

    def finished(self, server: Server, record: dict[str, Any], sampler: MemorySampler) -> bool:
        sampler.set_root(None)
        fresh = self._cache_dir is not None
        if self._cache_dir:
            shutil.rmtree(self._cache_dir, ignore_errors=True)
            self._cache_dir = None
        return fresh

    def environment(self, log: Callable[[str], None]) -> dict[str, Any]:
        extra: dict[str, Any] = {"vllm_python": self.config.vllm_python}
        if self.config.engine == "vllm" and not self.config.attach:
            extra["server_vllm"] = engines.vllm_build(self.config.vllm_python)
            log(f"server: {engines.describe_build(extra['server_vllm'])}")
        return extra

    def close(self) -> None:
        pass
