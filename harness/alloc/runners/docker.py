"""Docker runner: each probe in a fresh container of its allocator's image, driven by the SDK.

One container per run (network "none", GPUs through device_requests for cuda), its memory streamed
from the engine while it runs, removed afterwards whatever happens (exit, error, timeout, Ctrl-C).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import requests
from docker.errors import DockerException, NotFound
from docker.types import DeviceRequest, Mount

from harness.alloc.runners.base import ProbeOutcome, ProbeRequest, RunnerError, format_cpu_list, parse_probe_output
from harness.containers import engine
from harness.containers import images as img
from harness.containers.stats import StatsMonitor
from harness.measure.allocators import Allocator, AllocatorError
from harness.measure.signals import Shielded

LABEL_KEY = "harness"
LABEL_VALUE = "probe"
LABEL_FILTER = f"{LABEL_KEY}={LABEL_VALUE}"


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

    def run_probe(self, request: ProbeRequest) -> ProbeOutcome:
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
        name = f"harness-probe-{request.allocator.name}-{uuid.uuid4().hex[:8]}"
        container = None
        self._running.add(name)
        try:
            container = self.client.containers.create(
                probe_image.id, args, name=name, environment=env, mounts=mounts, network_mode="none",
                labels={LABEL_KEY: LABEL_VALUE, "harness.allocator": request.allocator.name,
                        engine.OWNER_LABEL: str(os.getpid())}, **kwargs)
            return self._run(container, probe_image, request)
        except (DockerException, requests.exceptions.RequestException) as exc:
            if not engine.daemon_alive(self.client):
                raise RunnerError(f"the Docker daemon stopped answering during a run ({exc}); runs recorded "
                                  f"so far are kept; restart it ({engine.FIX_DAEMON}) and continue with --resume"
                                  ) from exc
            raise RunnerError(f"Docker error running {probe_image.tag}: {exc}") from exc
        finally:
            self._running.discard(name)
            if container is not None:
                with Shielded(self.log, f"removing probe container {name} first"):  # a second signal waits
                    self._remove(container)

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
        """Kills this runner's probe containers; the thread running each one removes it."""
        for name in list(self._running):
            try:
                self.client.containers.get(name).kill()
            except (DockerException, requests.exceptions.RequestException) as exc:
                self.log(f"docker: could not kill probe container {name}: {exc}")

    def close(self) -> None:
        self.client.close()


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
