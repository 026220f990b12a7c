"""The duet design with the docker runner, on a real engine and the real probe images: one persistent container
per arm, each verified inside its own container, pinned to its placement's CPUs, its memory peak recorded; a
container killed mid-set fails only its set; no container of a run is left behind.

Skipped only where no Docker daemon answers; with HARNESS_REQUIRE_DOCKER=1 (CI) that is a failure. Every
container looked at or removed here is found by the owner label of the harness process the test started.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import HARNESS, REPO, docker_probe_runner, wait_for
from docker.errors import NotFound

from harness.alloc.runners.docker import LABEL_FILTER, DockerRunner
from harness.containers.engine import OWNER_LABEL

pytestmark = pytest.mark.docker
DUET = ["alloc", "--design", "duet", "--model", "synthetic:tiny", "--allocators", "glibc,jemalloc",
        "--max-new-tokens", "16"]


@pytest.fixture(scope="module")
def runner() -> DockerRunner:
    r = docker_probe_runner()
    yield r
    r.close()


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Harness:
    """`harness alloc` in a fresh process, and the probe containers it owns (by its owner label)."""

    def __init__(self, runner: DockerRunner, *args: str) -> None:
        self.client = runner.client
        self.proc = subprocess.Popen([*HARNESS, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)

    def containers(self, **labels: str) -> list:
        wanted = [LABEL_FILTER, f"{OWNER_LABEL}={self.proc.pid}", *(f"{k}={v}" for k, v in labels.items())]
        return self.client.containers.list(all=True, filters={"label": wanted})

    def finish(self, timeout: float) -> tuple[int, str, str, list[str]]:
        """Exit code, stdout, stderr and the names of its containers still there once it has ended; whatever
        happens, it is killed and its containers removed."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
            return self.proc.returncode, out, err, [c.name for c in self.containers()]
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
            for c in self.containers():
                c.remove(force=True)


def test_duet_docker_verifies_each_arm_in_its_own_container(runner: DockerRunner, tmp_path: Path) -> None:
    out = tmp_path / "duet-docker"
    harness = Harness(runner, *DUET, "--runner", "docker", "--sets", "2", "--windows-per-set", "3",
                      "--out", str(out))
    code, _, err, left = harness.finish(timeout=600)
    assert code == 0, err[-3000:]
    assert not left, f"containers left behind: {left}"
    sets = _jsonl(out / "alloc/sets.jsonl")
    assert [s["status"] for s in sets] == ["ok", "ok"] and all(s["runner"] == "docker" for s in sets)
    ids = set()
    for record in sets:
        arms = {a["label"]: a for a in record["arms"]}
        for name, arm in arms.items():
            assert arm["verified"] and arm["exit_code"] == 0, arm
            assert arm["loaded_allocator"]["name"] == name  # read inside the container's own process
            assert arm["pid"] == 1  # the probe is its container's entrypoint, in its own PID namespace
            c = arm["container"]
            assert c["image"] == f"harness-probe:{name}" and c["image_id"] == runner.images[name].id
            assert re.fullmatch(r"[0-9a-f]{64}", c["id"]) and c["exit_code"] == 0 and not c["oom_killed"]
            assert c["stats_samples"] >= 1 and 100 < c["working_set_peak_mb"] <= c["peak_mb"] < 8192
            ids.add(c["id"])
            if arm["placement"] is not None:  # the cpuset applied, as the probe saw it from inside
                assert arm["cpu_affinity"] == arm["placement"]["cpus"]
        assert arms["jemalloc"]["loaded_allocator"]["malloc_library"] == runner.images["jemalloc"].library
        if len(os.sched_getaffinity(0)) >= 2:
            assert not set(arms["glibc"]["cpu_affinity"]) & set(arms["jemalloc"]["cpu_affinity"])
    assert len(ids) == 4  # a fresh container per arm and set
    for cid in ids:
        with pytest.raises(NotFound):
            runner.client.containers.get(cid)
    windows = _jsonl(out / "alloc/windows.jsonl")
    assert len(windows) == 2 * (3 + 1) * 2  # sets × (steps + warm-up) × arms
    assert (out / "alloc/summary.md").exists()


def test_runner_auto_picks_docker_for_duet(runner: DockerRunner, tmp_path: Path) -> None:
    harness = Harness(runner, *DUET, "--runner", "auto", "--sets", "1", "--windows-per-set", "1",
                      "--out", str(tmp_path / "auto"))
    code, _, err, left = harness.finish(timeout=600)
    assert code == 0, err[-3000:]
    assert "runner auto: docker (Docker " in err and not left
    assert [s["runner"] for s in _jsonl(tmp_path / "auto/alloc/sets.jsonl")] == ["docker"]


def test_container_killed_mid_set_fails_only_its_set(runner: DockerRunner, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    harness = Harness(runner, *DUET, "--runner", "docker", "--sets", "2", "--windows-per-set", "20",
                      "--measure-s", "0.3", "--out", str(out))
    try:
        wait_for(lambda: len([w for w in _jsonl(out / "alloc/windows.jsonl") if w["set_index"] == 0]) >= 2,
                 300, "windows of set 1")
        victims = harness.containers(**{"harness.allocator": "jemalloc"})
        assert len(victims) == 1 and victims[0].status == "running", [c.name for c in victims]
        victims[0].kill()
    finally:
        code, _, err, left = harness.finish(timeout=600)
    assert code == 1, err[-3000:]
    assert not left, f"containers left behind: {left}"
    assert "1 of 2 sets failed" in err and "Traceback" not in err
    sets = _jsonl(out / "alloc/sets.jsonl")
    assert [(s["status"], s["ended_by"]) for s in sets] == [("failed", "died"), ("ok", "windows")]
    killed = {a["label"]: a for a in sets[0]["arms"]}["jemalloc"]
    assert killed["container"]["id"] == victims[0].id and killed["exit_code"] == 137
    assert "jemalloc probe" in sets[0]["failure"]
    assert all(a["verified"] and a["exit_code"] == 0 for a in sets[1]["arms"])


def _mid_set(harness: Harness, out: Path) -> list:
    """Waits until the first set measures, returns its two running containers."""
    wait_for(lambda: _jsonl(out / "alloc/windows.jsonl"), 300, "the first windows")
    running = [c for c in harness.containers() if c.status == "running"]
    assert len(running) == 2, [c.name for c in running]
    return running


def test_sigterm_mid_set_removes_every_container(runner: DockerRunner, tmp_path: Path) -> None:
    out = tmp_path / "sigterm"
    harness = Harness(runner, *DUET, "--runner", "docker", "--sets", "2", "--windows-per-set", "40",
                      "--measure-s", "0.3", "--out", str(out))
    try:
        _mid_set(harness, out)
        harness.proc.send_signal(signal.SIGTERM)
    finally:
        code, _, err, left = harness.finish(timeout=120)
    assert code == 130, err[-3000:]
    assert not left, f"containers left behind: {left}"
    assert "interrupted" in err and "Traceback" not in err
    assert [s["status"] for s in _jsonl(out / "alloc/sets.jsonl")] == ["interrupted"]


def test_sigkill_of_the_harness_stops_its_containers(runner: DockerRunner, tmp_path: Path) -> None:
    """No clean-up runs: the attached stdin goes away with the harness, the engine closes the probes' stdin
    (StdinOnce), each probe leaves its request loop and its container stops; only stopped ones are left."""
    out = tmp_path / "sigkill"
    harness = Harness(runner, *DUET, "--runner", "docker", "--sets", "2", "--windows-per-set", "40",
                      "--measure-s", "0.3", "--out", str(out))
    try:
        _mid_set(harness, out)
        harness.proc.kill()
        harness.proc.communicate()

        def stopped() -> bool:
            containers = harness.containers()
            return len(containers) == 2 and all(c.status == "exited" for c in containers)

        wait_for(stopped, 30, "its containers to stop")
    finally:
        harness.finish(timeout=60)  # removes them
    assert not harness.containers()
