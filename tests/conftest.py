"""Shared fixtures: real processes, real allocator libraries, no mocks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.allocators import find_library

REPO = Path(__file__).resolve().parents[1]
HARNESS = [sys.executable, "-m", "harness.cli"]


def run_harness(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs the real `harness` command line in a fresh process."""
    return subprocess.run([*HARNESS, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> object:
    """Polls `cond` until it returns something truthy; fails the test after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="session")
def jemalloc_path() -> str:
    path = find_library("jemalloc")
    assert path, "libjemalloc2 is not installed: run scripts/setup-system.sh (make test does)"
    return path


@pytest.fixture(scope="session")
def tcmalloc_path() -> str:
    path = find_library("tcmalloc")
    assert path, "libtcmalloc-minimal4 is not installed: run scripts/setup-system.sh (make test does)"
    return path
