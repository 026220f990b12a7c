"""Allocator libraries: where they are on this host, and what a run must preload."""

from __future__ import annotations

import glob
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from harness.errors import UsageError

KNOWN = ("glibc", "jemalloc", "tcmalloc", "mimalloc")

# File names in preference order; Debian/Ubuntu ship jemalloc as .so.2, tcmalloc-minimal as .so.4.
_CANDIDATE_NAMES = {
    "jemalloc": ["libjemalloc.so.2", "libjemalloc.so"],
    "tcmalloc": ["libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"],
    "mimalloc": ["libmimalloc.so.2", "libmimalloc.so"],
}


class AllocatorError(UsageError):
    """An allocator name or library that cannot be used."""


@dataclass(frozen=True)
class Allocator:
    """One arm of the experiment: a name, the library to preload (none for glibc) and its environment."""

    name: str
    library: str | None
    env: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _search_dirs() -> list[str]:
    arch = platform.machine()
    dirs = [f"/usr/lib/{arch}-linux-gnu", f"/lib/{arch}-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"]
    for prefix in {sys.prefix, os.environ.get("CONDA_PREFIX", "")}:
        if prefix:
            dirs.append(os.path.join(prefix, "lib"))
    return dirs


def find_library(name: str, search_dirs: list[str] | None = None) -> str | None:
    """The first library file for allocator `name` found in the usual places, or None."""
    for directory in search_dirs or _search_dirs():
        for candidate in _CANDIDATE_NAMES.get(name, []):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                return path
        for path in sorted(glob.glob(os.path.join(directory, f"lib{name}*.so*"))):
            if "debug" not in path and os.path.isfile(path):
                return path
    return None


def parse_allocator_libs(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """`--allocator-lib NAME=PATH` options into a mapping."""
    libs: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise AllocatorError(f"--allocator-lib expects NAME=PATH, got {item!r}")
        libs[name.strip()] = path.strip()
    return libs


def parse_allocator_envs(items: tuple[str, ...] | list[str]) -> dict[str, dict[str, str]]:
    """`--allocator-env NAME:VAR=VALUE` options (e.g. jemalloc:MALLOC_CONF=background_thread:true)."""
    envs: dict[str, dict[str, str]] = {}
    for item in items:
        name, sep, assignment = item.partition(":")
        var, eq, value = assignment.partition("=")
        if not sep or not eq or not name or not var:
            raise AllocatorError(f"--allocator-env expects NAME:VAR=VALUE, got {item!r}")
        envs.setdefault(name.strip(), {})[var.strip()] = value
    return envs


def resolve(names: list[str], explicit: dict[str, str] | None = None,
            envs: dict[str, dict[str, str]] | None = None, check_files: bool = True) -> list[Allocator]:
    """Turn allocator names into preload plans; raise AllocatorError with one clear line otherwise.

    With check_files=False (the docker runner) the library path is the one inside the image.
    """
    explicit = explicit or {}
    envs = envs or {}
    out: list[Allocator] = []
    if not names:
        raise AllocatorError("no allocator given")
    if len(set(names)) != len(names):
        raise AllocatorError(f"allocator listed twice: {','.join(names)}")
    for name in names:
        if name not in KNOWN and name not in explicit:
            raise AllocatorError(f"unknown allocator {name!r} (known: {', '.join(KNOWN)}; "
                                 "others need --allocator-lib NAME=PATH)")
        env = envs.get(name, {})
        if name == "glibc":
            out.append(Allocator("glibc", None, env))
            continue
        path = explicit.get(name) or (find_library(name) if check_files else None)
        if check_files:
            if path is None:
                hint = {"jemalloc": "libjemalloc2", "tcmalloc": "libtcmalloc-minimal4",
                        "mimalloc": "libmimalloc2.0"}.get(name, name)
                raise AllocatorError(f"{name} library not found (install Debian's {hint} or pass "
                                     f"--allocator-lib {name}=PATH)")
            if not os.path.isfile(path):
                raise AllocatorError(f"{name} library {path!r} does not exist")
            path = os.path.abspath(path)
        out.append(Allocator(name, path, env))
    return out


def package_version(path: str) -> str | None:
    """The Debian package that owns `path` and its version, where dpkg knows it."""
    try:
        owner = subprocess.run(["dpkg-query", "-S", os.path.realpath(path)], capture_output=True,
                               text=True, timeout=10)
        if owner.returncode != 0:
            owner = subprocess.run(["dpkg-query", "-S", path], capture_output=True, text=True, timeout=10)
        if owner.returncode != 0:
            return None
        pkg = owner.stdout.split(":")[0].strip()
        ver = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True,
                             text=True, timeout=10)
        return f"{pkg} {ver.stdout.strip()}" if ver.returncode == 0 else pkg
    except (OSError, subprocess.TimeoutExpired):
        return None


def describe_host_libraries() -> dict[str, Any]:
    """Every known allocator library found on this host, with its real path and package."""
    found: dict[str, Any] = {}
    for name in KNOWN[1:]:
        path = find_library(name)
        found[name] = None if path is None else {
            "path": path, "realpath": os.path.realpath(path), "package": package_version(path),
        }
    found["glibc"] = {"version": platform.libc_ver()[1] or None}
    return found
