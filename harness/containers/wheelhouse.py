"""The host wheelhouse: every Python package of the probe images, downloaded on the host.

`pip` cannot reach an index from inside `docker build` on air-gapped hosts (and in this project's
CI), so the images install from these wheels with `pip --no-index --require-hashes`. The wheel set
(name, version, sha256) is written to `manifest.json` and stamped on the images.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import REPO_ROOT
from harness.errors import HarnessError

WHEELHOUSE = REPO_ROOT / "wheelhouse"
REQUIREMENTS = REPO_ROOT / "docker" / "probe-requirements.txt"
TORCH_CPU = "torch==2.13.0+cpu"


class WheelhouseError(HarnessError):
    """The wheels could not be downloaded."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def requirement_specs(with_torch: bool, requirements: Path = REQUIREMENTS) -> list[str]:
    lines = [ln.split("#")[0].strip() for ln in requirements.read_text().splitlines()]
    return ([TORCH_CPU] if with_torch else []) + [ln for ln in lines if ln]


def _platform_args(python_version: str, max_glibc: int | None = None) -> list[str]:
    """pip download's target: this Python, manylinux wheels up to glibc 2.28 (or 2.<max_glibc>)."""
    arch = platform.machine()
    abi = "cp" + python_version.replace(".", "")
    args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
            "--abi", abi, "--abi", "abi3", "--abi", "none"]
    plats = ["manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014", "linux"]
    if max_glibc:
        plats = [f"manylinux_2_{m}" for m in range(max_glibc, 16, -1)] + ["manylinux2014", "linux"]
    for plat in plats:
        args += ["--platform", f"{plat}_{arch}"]
    return args + ["--platform", "any"]


def wheel_name_version(filename: str) -> tuple[str, str]:
    name, version = filename.split("-")[:2]
    return name.replace("_", "-").lower(), version


def ensure(python_version: str, with_torch: bool, root: Path = WHEELHOUSE, rebuild: bool = False,
           log: Callable[[str], None] = print, requirements: Path = REQUIREMENTS, name: str | None = None,
           exclude: tuple[str, ...] = (), max_glibc: int | None = None) -> Path:
    """The wheelhouse directory for this Python and torch choice, downloaded if not yet there.
    `exclude`: distributions dropped after the download (installed with --no-deps then);
    `max_glibc`: accept manylinux wheels up to glibc 2.<max_glibc> (the image's glibc)."""
    specs = requirement_specs(with_torch, requirements)
    key: list[Any] = [python_version, platform.machine(), specs]
    if exclude or max_glibc:
        key += [sorted(exclude), max_glibc]
    spec_hash = hashlib.sha256(json.dumps(key).encode()).hexdigest()
    name = name or ("torch-cpu" if with_torch else "no-torch")
    dest = root / f"cp{python_version.replace('.', '')}-{name}"
    manifest_path = dest / "manifest.json"
    if (not rebuild and manifest_path.is_file()
            and json.loads(manifest_path.read_text()).get("spec_hash") == spec_hash):
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(dest),
           *_platform_args(python_version, max_glibc)]
    if os.environ.get("HARNESS_TORCH_INDEX_URL"):  # e.g. https://download.pytorch.org/whl/cpu
        cmd += ["--extra-index-url", os.environ["HARNESS_TORCH_INDEX_URL"]]
    log(f"wheelhouse: pip download {' '.join(specs)} -> {dest}")
    proc = subprocess.run([*cmd, *specs], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise WheelhouseError(f"pip download failed (exit {proc.returncode}):\n{tail}\n"
                              "Where torch's CPU wheel is not on your index, set "
                              "HARNESS_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu")
    wheels = []
    dropped = {e.replace("_", "-").lower() for e in exclude}
    for path in sorted(dest.glob("*.whl")):
        name, version = wheel_name_version(path.name)
        if name in dropped:
            path.unlink()
            continue
        wheels.append({"name": name, "version": version, "file": path.name, "sha256": sha256_file(path)})
    (dest / "requirements.txt").write_text("".join(
        f"{w['name']}=={w['version']} --hash=sha256:{w['sha256']}\n" for w in wheels))
    manifest: dict[str, Any] = {"python": python_version, "machine": platform.machine(), "specs": specs,
                                "spec_hash": spec_hash, "excluded": sorted(dropped), "wheels": wheels}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return dest


def read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "manifest.json").read_text())
