"""Choosing the runner for `harness serve` and preparing the docker one: engine, image, container spec."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
from docker.types import Mount

from harness.containers import images as img
from harness.containers import vllm_image, wheelhouse
from harness.containers.engine import can_build_cpu_base, connect, daemon_problem
from harness.errors import RunnerError
from harness.measure.allocators import Allocator, parse_allocator_envs, parse_allocator_libs
from harness.serve.config import ConfigError, ServeConfig
from harness.serve.docker_server import ContainerSpec, DockerErrors, DockerServer, remove_exited_leftovers
from harness.serve.engines import ServerSpec, container_model_path
from harness.serve.sampler import MemorySampler

SHARED_COMPILE_CACHE = Path.home() / ".cache" / "harness" / "vllm-docker"


def detect_variant(device: str) -> str:
    """'cuda' or 'cpu' for the server image: --device, else whether NVML sees a GPU."""
    if device.startswith("cuda"):
        return "cuda"
    if device == "cpu":
        return "cpu"
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return "cuda" if pynvml.nvmlDeviceGetCount() > 0 else "cpu"
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library or no driver: a CPU host
        return "cpu"


def docker_usable(config: ServeConfig) -> tuple[bool, str]:
    """For containers.runner_choice: can a vLLM server container run here, and why (not). With --runner
    docker an image that is missing or stale still counts: prepare() builds it, or names the fix."""
    try:
        client = connect(timeout=10)
    except RunnerError as exc:
        return False, str(exc)
    variant = detect_variant(config.device)
    try:
        state, detail = vllm_image.status(client, variant)
        version = client.version().get("Version", "?")
    except DockerErrors as exc:
        return False, daemon_problem(exc)
    finally:
        client.close()
    image = vllm_image.CUDA_IMAGE if variant == "cuda" else vllm_image.CPU_TAG
    if state == "ok":
        return True, f"Docker {version} answers and the vLLM image {image} is present"
    if config.runner == "docker":
        return True, f"the vLLM image {image} is {state} ({detail})"
    if variant == "cpu" and can_build_cpu_base():
        return True, f"Docker {version} answers; the vLLM image {image} is {state} and will be built " \
                     "(several minutes, once)"
    return False, f"Docker {version} answers but the vLLM image {image} is {state} ({detail})"


@dataclass
class DockerContext:
    """The engine client and the server image (and, with --allocators, one image per allocator), for the
    whole serve run: the docker ServerRunner (each server a fresh container)."""

    client: docker.DockerClient
    image: vllm_image.VllmImage
    variant: str
    config: ServeConfig
    arm_images: dict[str, vllm_image.VllmImage] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        try:
            version = self.client.version()
            info = self.client.info()
        except DockerErrors:
            version, info = {}, {}
        out = {"engine": version.get("Version"), "api": version.get("ApiVersion"),
               "cgroup": info.get("CgroupVersion"), "cgroup_driver": info.get("CgroupDriver"),
               "runtimes": sorted(info.get("Runtimes") or {}), "image": self.image.describe()}
        if self.arm_images:
            out["allocator_images"] = {name: image.describe() for name, image in self.arm_images.items()}
        return out

    def image_for(self, arm: Allocator | None) -> vllm_image.VllmImage:
        return self.image if arm is None else self.arm_images[arm.name]

    def arms(self, config: ServeConfig) -> list[Allocator]:
        """The --allocators arms with the library each image preloads; ConfigError where --allocator-lib
        names another (an image cannot preload a host path)."""
        libs = parse_allocator_libs(config.allocator_lib)
        envs = parse_allocator_envs(config.allocator_env)
        for name, path in libs.items():
            image = self.arm_images.get(name)
            if image is not None and path != image.library:
                raise ConfigError(f"--allocator-lib {name}={path} cannot apply to --runner docker: the image "
                                  f"{image.tag} preloads {image.library}")
        return [Allocator(name, self.arm_images[name].library, envs.get(name, {})) for name in config.allocators]

    # --- the docker ServerRunner (harness.serve.runners) ------------------------------------------
    name = "docker"
    host_pids_in_log = False  # a container's processes log the PIDs of its own namespace
    has_container = True

    def server(self, k: int, spec: ServerSpec, arm: Allocator | None, log_path: Path) -> DockerServer:
        """A new container: its compile caches are empty whatever --compile-cache says."""
        return DockerServer(self.client, container_spec(self.config, spec, self, self.image_for(arm)),
                            self.config.host, self.config.port, log_path)

    def where(self, arm: Allocator | None) -> str:
        return f" in a container of {self.image_for(arm).tag}"

    def started(self, server: DockerServer, record: dict[str, Any], sampler: MemorySampler) -> None:
        record["container_name"] = server.name
        sampler.set_container(server.monitor)  # container memory instead of the tree's RSS

    def finished(self, server: DockerServer, record: dict[str, Any], sampler: MemorySampler) -> bool:
        sampler.set_container(None)
        record["container"] = server.describe()
        return True

    def environment(self, log: Any) -> dict[str, Any]:
        return {"docker": self.describe()}

    def close(self) -> None:
        self.client.close()


def prepare(config: ServeConfig, log: Any) -> DockerContext:
    """Connects, clears stopped leftovers, builds or pulls the image. ConfigError with the fix."""
    try:
        client = connect(timeout=1800)
    except RunnerError as exc:
        raise ConfigError(str(exc)) from exc
    try:
        removed, running = remove_exited_leftovers(client)
        if removed:
            log(f"docker: removed {removed} stopped harness=server container(s) left by an earlier run")
        if running:
            log(f"docker: harness=server container(s) still running with no harness command behind them: "
                f"{', '.join(running)} (remove with: docker rm -f {' '.join(running)})")
        variant = detect_variant(config.device)
        image = vllm_image.ensure(client, variant, log=log)
        arm_images = {name: vllm_image.ensure_allocator(client, image, name, log=log) for name in config.allocators}
    except (img.ImageError, wheelhouse.WheelhouseError) as exc:
        client.close()
        raise ConfigError(f"vLLM server image unavailable: {exc}") from exc
    except DockerErrors as exc:
        client.close()
        raise ConfigError(daemon_problem(exc)) from exc
    return DockerContext(client, image, variant, config, arm_images)


def _hf_cache_mount() -> tuple[list[Mount], dict[str, str]]:
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    if not hf_home.is_dir():
        return [], {}
    return [Mount("/hf", str(hf_home.resolve()), type="bind", read_only=True)], {"HF_HOME": "/hf"}


def container_spec(config: ServeConfig, spec: ServerSpec, ctx: DockerContext,
                   image: vllm_image.VllmImage | None = None) -> ContainerSpec:
    """Image (the server image, or `image`: an allocator's), arguments, environment and mounts of one
    server container."""
    image = image or ctx.image
    env = dict(spec.env)
    mounts: list[Mount] = []
    if spec.model_dir and os.path.isdir(spec.model_dir):
        src = str(Path(spec.model_dir).resolve())
        mounts.append(Mount(container_model_path(src), src, type="bind", read_only=True))
    else:  # a hub id: the host's HF cache, read-only (offline)
        hf_mounts, hf_env = _hf_cache_mount()
        mounts += hf_mounts
        env.update(hf_env)
    if config.compile_cache == "shared":  # "fresh" is what a new container has anyway
        SHARED_COMPILE_CACHE.mkdir(parents=True, exist_ok=True)
        mounts.append(Mount("/root/.cache/vllm", str(SHARED_COMPILE_CACHE), type="bind"))
    return ContainerSpec(image.id, list(spec.argv), env, mounts, image.entrypoint,
                         gpus=ctx.variant == "cuda", seccomp_unconfined=ctx.variant == "cpu")

