"""Probe images: `harness-probe:<allocator>` (CPU) and `harness-probe:<allocator>-cuda`.

One common image (base + python + wheelhouse venv + probe code) and thin allocator images on top,
identical except for the allocator package and LD_PRELOAD (the real, versioned library file).
Every image carries a fingerprint of what it was built from, so a stale image is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
from docker.errors import BuildError, ImageNotFound

from harness import REPO_ROOT
from harness.containers import wheelhouse
from harness.errors import HarnessError
from harness.measure.allocators import KNOWN

DOCKER_DIR = REPO_ROOT / "docker"
BUILD_DIR = REPO_ROOT / "build" / "probe-context"
REPOSITORY = "harness-probe"
LABEL = "org.harness."
CPU_BASE = os.environ.get("HARNESS_CPU_BASE_IMAGE", "harness-base:bookworm")
CUDA_BASE = os.environ.get("HARNESS_CUDA_BASE_IMAGE", "pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime")

# allocator -> (Debian/Ubuntu package, library soname in /usr/lib/<arch>-linux-gnu)
PACKAGES: dict[str, tuple[str, str]] = {
    "jemalloc": ("libjemalloc2", "libjemalloc.so.2"),
    "tcmalloc": ("libtcmalloc-minimal4", "libtcmalloc_minimal.so.4"),
    "mimalloc": ("libmimalloc2.0", "libmimalloc.so.2"),
}

Log = Callable[[str], None]


class ImageError(HarnessError):
    """An image is missing and cannot be built, or its build failed."""


@dataclass(frozen=True)
class ProbeImage:
    """A built allocator image, as the runner uses it."""

    allocator: str
    tag: str
    id: str
    library: str | None  # LD_PRELOAD inside the image; None for glibc
    labels: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"tag": self.tag, "id": self.id, "ld_preload": self.library,
                "base_image": self.labels.get(LABEL + "base"), "base_id": self.labels.get(LABEL + "base_id"),
                "fingerprint": self.labels.get(LABEL + "fingerprint")}


def variant_for(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def tag_for(allocator: str, variant: str) -> str:
    return f"{REPOSITORY}:{allocator}" + ("-cuda" if variant == "cuda" else "")


def base_for(variant: str) -> str:
    return CUDA_BASE if variant == "cuda" else CPU_BASE


def source_files() -> list[Path]:
    probe = sorted((REPO_ROOT / "harness" / "probe").glob("*.py"))
    return [DOCKER_DIR / "probe.Dockerfile", DOCKER_DIR / "allocator.Dockerfile",
            wheelhouse.REQUIREMENTS, REPO_ROOT / "harness" / "__init__.py", *probe]


def fingerprint(base_id: str) -> str:
    """What the images are built from: Dockerfiles, pins, probe code, the base image id."""
    h = hashlib.sha256(base_id.encode())
    for path in source_files():
        h.update(path.relative_to(REPO_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    h.update(wheelhouse.TORCH_CPU.encode())
    return h.hexdigest()[:16]


def find_image(client: docker.DockerClient, ref: str) -> Any | None:
    try:
        return client.images.get(ref)
    except ImageNotFound:
        return None


def image_env(image: Any, key: str) -> str | None:
    for item in image.attrs.get("Config", {}).get("Env") or []:
        name, _, value = item.partition("=")
        if name == key:
            return value
    return None


def ensure_base(client: docker.DockerClient, variant: str, log: Log = print) -> Any:
    """The base image, built locally (CPU: debootstrap) or pulled (CUDA) when missing."""
    ref = base_for(variant)
    image = find_image(client, ref)
    if image is not None:
        return image
    if variant == "cpu":
        script = DOCKER_DIR / "base" / "build-base.sh"
        log(f"images: base {ref} missing, building it with {script.relative_to(REPO_ROOT)}")
        proc = subprocess.run([str(script), ref], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ImageError(f"{script.name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    else:
        log(f"images: pulling CUDA base {ref}")
        try:
            client.images.pull(ref)
        except docker.errors.APIError as exc:
            raise ImageError(f"cannot pull {ref} ({exc.explanation}); pull or load it by hand, or set "
                             "HARNESS_CUDA_BASE_IMAGE to a CUDA PyTorch image you have") from exc
    image = find_image(client, ref)
    if image is None:
        raise ImageError(f"base image {ref} still missing after building it")
    return image


def build_image(client: docker.DockerClient, context: Path, dockerfile: str, tag: str, target: str,
           buildargs: dict[str, str], labels: dict[str, str] | None, log: Log) -> Any:
    log(f"images: building {tag} (target {target})")
    try:
        image, _ = client.images.build(path=str(context), dockerfile=dockerfile, tag=tag, target=target or None,
                                       buildargs=buildargs, labels=labels or {}, rm=True, forcerm=True,
                                       network_mode="host")
    except BuildError as exc:
        tail = "".join(c.get("stream", "") or c.get("error", "") for c in exc.build_log)[-3000:]
        raise ImageError(f"building {tag} failed: {exc.msg}\n{tail}") from exc
    return image


def run_once(client: docker.DockerClient, image: str, command: list[str]) -> str:
    out = client.containers.run(image, command, entrypoint=[], network_mode="none", remove=True,
                                labels={"harness": "build"})
    return out.decode().strip()


def link_tree(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file():
            target = dst / path.name
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)


def stage_context(wheels: Path) -> Path:
    """A small build context: the Dockerfiles, the wheels (hard links) and the probe code."""
    if BUILD_DIR.exists():
        shutil.rmtree(BUILD_DIR)
    link_tree(wheels, BUILD_DIR / "wheels")
    (BUILD_DIR / "harness" / "probe").mkdir(parents=True)
    shutil.copy2(REPO_ROOT / "harness" / "__init__.py", BUILD_DIR / "harness" / "__init__.py")
    for path in (REPO_ROOT / "harness" / "probe").glob("*.py"):
        shutil.copy2(path, BUILD_DIR / "harness" / "probe" / path.name)
    for name in ("probe.Dockerfile", "allocator.Dockerfile"):
        shutil.copy2(DOCKER_DIR / name, BUILD_DIR / name)
    return BUILD_DIR


def ensure_common(client: docker.DockerClient, variant: str, rebuild: bool, log: Log) -> Any:
    """`harness-probe:common[-cuda]`: base + python + the wheelhouse venv + the probe code."""
    base = ensure_base(client, variant, log)
    fp = fingerprint(base.id)
    tag = tag_for("common", variant)
    image = find_image(client, tag)
    if image is not None and not rebuild and image.labels.get(LABEL + "fingerprint") == fp:
        return image
    runtime_ctx = BUILD_DIR.parent / "runtime-context"
    runtime_ctx.mkdir(parents=True, exist_ok=True)
    shutil.copy2(DOCKER_DIR / "probe.Dockerfile", runtime_ctx / "probe.Dockerfile")
    runtime_tag = tag_for("runtime", variant)
    build_image(client, runtime_ctx, "probe.Dockerfile", runtime_tag, "runtime", {"BASE_IMAGE": base_for(variant)},
           None, log)
    info = json.loads(run_once(client, runtime_tag, ["python3", "-c", (
        "import importlib.util, json, sys; print(json.dumps({'python': '%d.%d' % sys.version_info[:2], "
        "'torch': importlib.util.find_spec('torch') is not None}))")]))
    wheels = wheelhouse.ensure(info["python"], with_torch=not info["torch"], rebuild=rebuild, log=log)
    manifest = wheelhouse.read_manifest(wheels)
    compact = [f"{w['name']}=={w['version']} sha256:{w['sha256']}" for w in manifest["wheels"]]
    labels = {LABEL + "fingerprint": fp, LABEL + "base": base_for(variant), LABEL + "base_id": base.id,
              LABEL + "variant": variant, LABEL + "python": info["python"],
              LABEL + "wheels": json.dumps(compact, separators=(",", ":"))}
    context = stage_context(wheels)
    image = build_image(client, context, "probe.Dockerfile", tag, "probe", {"BASE_IMAGE": base_for(variant)},
                   labels, log)
    return image


def ensure_allocator(client: docker.DockerClient, allocator: str, variant: str, common: Any,
                     rebuild: bool, log: Log) -> ProbeImage:
    tag = tag_for(allocator, variant)
    image = find_image(client, tag)
    fresh = (image is not None and not rebuild and image.labels.get(LABEL + "probe_image_id") == common.id)
    if not fresh:
        stage = f"{REPOSITORY}-stage:{allocator}" + ("-cuda" if variant == "cuda" else "")
        image = build_allocator_layer(client, tag_for("common", variant), allocator, tag, stage,
                                      {LABEL + "probe_image_id": common.id}, log)
    library = image_env(image, "LD_PRELOAD") or None
    return ProbeImage(allocator, tag, image.id, library, dict(image.labels or {}))


def build_allocator_layer(client: docker.DockerClient, base: str, allocator: str, tag: str, stage: str,
                          labels: dict[str, str], log: Log) -> Any:
    """`tag` = image `base` + one allocator layer (allocator.Dockerfile): nothing for glibc; else the
    allocator's Debian package and LD_PRELOAD set to its real, versioned library file."""
    context = allocator_context()
    args = {"PROBE_IMAGE": base, "ALLOCATOR": allocator}
    if allocator == "glibc":
        return build_image(client, context, "allocator.Dockerfile", tag, "plain", args, labels, log)
    if allocator not in PACKAGES:
        raise ImageError(f"no image recipe for allocator {allocator!r} (known: {', '.join(KNOWN)})")
    package, soname = PACKAGES[allocator]
    args["ALLOCATOR_PACKAGE"] = package
    build_image(client, context, "allocator.Dockerfile", stage, "packaged", args, None, log)
    real = run_once(client, stage, ["sh", "-c", f'readlink -f "/usr/lib/$(uname -m)-linux-gnu/{soname}"'])
    args["ALLOCATOR_LIB"] = real
    image = build_image(client, context, "allocator.Dockerfile", tag, "preload", args, labels, log)
    client.images.remove(stage, noprune=True)
    return image


def allocator_context() -> Path:
    """Context for allocator images: the Dockerfile alone (no wheels to send again)."""
    ctx = BUILD_DIR.parent / "allocator-context"
    ctx.mkdir(parents=True, exist_ok=True)
    shutil.copy2(DOCKER_DIR / "allocator.Dockerfile", ctx / "allocator.Dockerfile")
    return ctx


def ensure_images(client: docker.DockerClient, allocators: Iterable[str], variant: str = "cpu",
                  rebuild: bool = False, log: Log = print) -> dict[str, ProbeImage]:
    """Every requested allocator image, built where missing or stale."""
    common = ensure_common(client, variant, rebuild, log)
    return {a: ensure_allocator(client, a, variant, common, rebuild, log) for a in allocators}


def images_status(client: docker.DockerClient, allocators: Iterable[str], variant: str) -> dict[str, str]:
    """For `doctor` and `--runner auto`: 'ok', 'missing' or 'stale' per allocator image."""
    base = find_image(client, base_for(variant))
    common = find_image(client, tag_for("common", variant))
    current = base is not None and common is not None and \
        common.labels.get(LABEL + "fingerprint") == fingerprint(base.id)
    out = {}
    for a in allocators:
        image = find_image(client, tag_for(a, variant))
        if image is None:
            out[a] = "missing"
        elif not current or image.labels.get(LABEL + "probe_image_id") != common.id:
            out[a] = "stale"
        else:
            out[a] = "ok"
    return out


DRIVER_TAG = "harness-driver:latest"
DRIVER_REQUIREMENTS = DOCKER_DIR / "driver-requirements.txt"


def driver_fingerprint(common_id: str) -> str:
    h = hashlib.sha256(common_id.encode())
    files = sorted((REPO_ROOT / "harness").rglob("*.py")) + [DOCKER_DIR / "driver.Dockerfile", DRIVER_REQUIREMENTS]
    for path in files:
        h.update(path.relative_to(REPO_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def ensure_driver(client: docker.DockerClient, rebuild: bool = False, log: Log = print) -> Any:
    """`harness-driver:latest`: the CPU common image + the harness CLI (compose's alloc services)."""
    common = ensure_common(client, "cpu", rebuild, log)
    fp = driver_fingerprint(common.id)
    image = find_image(client, DRIVER_TAG)
    if image is not None and not rebuild and image.labels.get(LABEL + "driver_fingerprint") == fp:
        return image
    python = common.labels.get(LABEL + "python", "3.11")
    wheels = wheelhouse.ensure(python, with_torch=False, rebuild=rebuild, log=log,
                               requirements=DRIVER_REQUIREMENTS, name="driver")
    ctx = BUILD_DIR.parent / "driver-context"
    if ctx.exists():
        shutil.rmtree(ctx)
    link_tree(wheels, ctx / "wheels")
    shutil.copytree(REPO_ROOT / "harness", ctx / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(DOCKER_DIR, ctx / "docker", ignore=shutil.ignore_patterns("base"))
    shutil.copy2(DOCKER_DIR / "driver.Dockerfile", ctx / "driver.Dockerfile")
    return build_image(client, ctx, "driver.Dockerfile", DRIVER_TAG, "", {"PROBE_IMAGE": tag_for("common", "cpu")},
                  {LABEL + "driver_fingerprint": fp}, log)
