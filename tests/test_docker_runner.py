"""The docker runner on a real engine with the real probe images: no mocks.

Skipped only where no Docker daemon answers; with HARNESS_REQUIRE_DOCKER=1 (CI) that is a failure.
"""

from __future__ import annotations

import _thread
import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import (
    HARNESS,
    REPO,
    SEQUENTIAL,
    check_stopped_experiment,
    docker_probe_runner,
    run_harness,
    this_runs_containers,
    wait_for,
)

from harness.alloc import run as alloc
from harness.alloc.runners.base import ProbeRequest, RunnerError
from harness.alloc.runners.docker import LABEL_FILTER, DockerRunner
from harness.containers.engine import OWNER_LABEL, owner_labels
from harness.containers.stats import MemoryPeaks, working_set_bytes

pytestmark = pytest.mark.docker
TINY = dict(model="synthetic:tiny", device="cpu", warm_gens=1, max_new_tokens=4)


@pytest.fixture(scope="session")
def runner() -> DockerRunner:
    r = docker_probe_runner()
    yield r
    r.close()


@pytest.fixture(autouse=True)
def no_leftover_containers(request):
    yield
    if "runner" not in request.fixturenames:
        return
    r: DockerRunner = request.getfixturevalue("runner")
    left = this_runs_containers(r.client, LABEL_FILTER)
    for c in left:
        c.remove(force=True)
    assert not left, f"containers left behind: {[c.name for c in left]}"


def _request(runner: DockerRunner, name: str, **kw) -> ProbeRequest:
    allocator = runner.resolve_allocators([name], {}, {})[0]
    return ProbeRequest(allocator=allocator, **{**TINY, **kw})


@pytest.mark.parametrize("name", ["glibc", "jemalloc"])
def test_probe_verified_with_container_memory(runner, name):
    outcome = runner.run_probe(_request(runner, name))
    assert outcome.error is None and outcome.exit_code == 0, outcome.log_tail
    assert alloc.verify(_request(runner, name).allocator, outcome.probe) is None
    loaded = outcome.probe["allocator"]
    assert loaded["name"] == name
    if name == "jemalloc":
        assert loaded["malloc_library"] == runner.images["jemalloc"].library
        assert loaded["malloc_library"].startswith("/usr/lib/") and loaded["version"]
    c = outcome.container
    assert c["image"] == f"harness-probe:{name}" and c["image_id"].startswith("sha256:")
    assert c["oom_killed"] is False and c["stats_samples"] >= 1
    # torch alone needs well over 100 MB; the working set never exceeds the usage peak
    assert 100 < c["working_set_peak_mb"] <= c["peak_mb"] < 8192
    assert 1 < outcome.wall_real_s < 600


def test_failing_probe_recorded_with_exit_code_and_log_tail(runner):
    outcome = runner.run_probe(_request(runner, "glibc", model="synthetic:no-such-model"))
    assert outcome.probe is None and outcome.exit_code == 2
    assert "no-such-model" in outcome.error
    assert any("Traceback" in line or "Error" in line for line in outcome.log_tail)
    config = alloc.AllocConfig(model="synthetic:no-such-model", device="cpu",
                               allocators=runner.resolve_allocators(["glibc"], {}, {}), runs=1,
                               warm_gens=1, max_new_tokens=4, runner="docker")
    run = alloc.plan(config)[0]
    record = alloc.build_record(config, run, 0, "now", outcome, "docker")
    assert record.status == "failed" and record.exit_code == 2 and record.log_tail


def test_oom_killed_container_recorded_as_failed(runner):
    small = DockerRunner(runner.client, "cpu", runner.images, mem_limit="48m")
    outcome = small.run_probe(_request(runner, "jemalloc"))
    assert outcome.probe is None
    assert outcome.container["oom_killed"] is True and outcome.exit_code == 137
    assert "OOM" in outcome.error


def test_timeout_kills_and_removes_the_container(runner):
    outcome = runner.run_probe(_request(runner, "glibc", timeout_s=2))
    assert outcome.probe is None and "timed out" in outcome.error
    assert outcome.exit_code == 137  # SIGKILL


def test_ctrl_c_removes_the_container(runner):
    timer = threading.Timer(3.0, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.run_probe(_request(runner, "glibc"))
    finally:
        timer.cancel()
    # no_leftover_containers checks that the container is gone


class SocketProxy:
    """A unix-socket relay to the real daemon that can be cut: the daemon 'disappears' for the client."""

    def __init__(self, target: str, path: Path) -> None:
        self.target, self.path = target, str(path)
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(self.path)
        self.server.listen(16)
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.server.close()
        os.unlink(self.path)
        for s in self.conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def test_daemon_disappearing_mid_run_raises_runner_error(runner, tmp_path):
    import docker

    proxy = SocketProxy("/var/run/docker.sock", tmp_path / "d.sock")
    client = docker.DockerClient(base_url=f"unix://{proxy.path}", timeout=30)
    cut_runner = DockerRunner(client, "cpu", runner.images)
    timer = threading.Timer(4.0, proxy.cut)
    timer.start()
    try:
        with pytest.raises(RunnerError, match="stopped answering"):
            cut_runner.run_probe(_request(runner, "glibc"))
    finally:
        timer.cancel()
    # the container outlives the lost connection; the real daemon still removes it (fixture asserts none)
    for c in this_runs_containers(runner.client, LABEL_FILTER):
        c.remove(force=True)


@pytest.mark.fast
def test_working_set_as_docker_stats_computes_it():
    v1 = {"usage": 500, "max_usage": 800, "stats": {"total_inactive_file": 120, "inactive_file": 1}}
    v2 = {"usage": 500, "stats": {"inactive_file": 100}}
    assert working_set_bytes(v1) == 380 and working_set_bytes(v2) == 400
    assert working_set_bytes({"usage": 50, "stats": {"inactive_file": 90}}) == 50
    assert working_set_bytes({}) is None
    peaks = MemoryPeaks()
    for sample in ({"memory_stats": v1}, {"memory_stats": {}}, {"memory_stats": v2}):
        peaks.add(sample)
    d = peaks.to_dict()
    assert d["stats_samples"] == 2 and d["peak_mb"] == 800 / 2**20 and d["working_set_peak_mb"] == 400 / 2**20


def test_cli_alloc_runner_docker_end_to_end(runner, tmp_path):
    out = tmp_path / "y"
    cpu = max(os.sched_getaffinity(0))  # --affinity becomes the container's cpuset
    proc = run_harness(*SEQUENTIAL, "--runner", "docker", "--model", "synthetic:tiny", "--allocators", "glibc,jemalloc",
                       "--runs", "2", "--warmup-runs", "0", "--warm-gens", "1", "--max-new-tokens", "4",
                       "--affinity", str(cpu), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(line) for line in (out / "alloc/runs.jsonl").read_text().splitlines()]
    assert len(runs) == 4 and all(r["status"] == "ok" and r["runner"] == "docker" for r in runs)
    assert all(r["probe"]["cpu_affinity"] == [cpu] for r in runs)
    assert all(r["container_peak_mb"] > 100 and r["container"]["image"].startswith("harness-probe:") for r in runs)
    rows = list(csv.DictReader((out / "alloc/allocator_latency_comparison.csv").open()))
    assert [r["allocator"] for r in rows] == ["glibc", "jemalloc"]
    assert all(float(r["container_peak_mb"]) > 100 and float(r["container_working_set_peak_mb"]) > 100 for r in rows)
    env = json.loads((out / "environment.json").read_text())["runner"]
    assert env["runner"] == "docker"
    assert env["docker"]["images"]["jemalloc"]["ld_preload"].endswith(".so.2")
    wheels = {w["name"]: w for w in env["docker"]["wheels"]}
    assert wheels["torch"]["version"].startswith("2.13.0") and len(wheels["torch"]["sha256"]) == 64


def test_no_daemon_is_a_clear_error(tmp_path):
    env = {"DOCKER_HOST": f"unix://{tmp_path}/no-daemon.sock"}
    proc = run_harness(*SEQUENTIAL, "--runner", "docker", "--model", "synthetic:tiny", "--out", str(tmp_path / "o"),
                       env=env, timeout=120)
    assert proc.returncode != 0
    assert f"no Docker daemon at {tmp_path}/no-daemon.sock" in proc.stderr and "scripts/setup-docker.sh" in proc.stderr
    assert "Traceback" not in proc.stderr and "FileNotFoundError" not in proc.stderr  # in words, not a repr


def _compose() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_compose_file_validates(profile):
    compose = _compose()
    if compose is None:
        pytest.fail("no compose tool: run scripts/setup-docker.sh (installs Debian's docker-compose)")
    proc = subprocess.run([*compose, "--profile", profile, "config"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "image: harness-driver:latest" in proc.stdout and "capabilities:" in proc.stdout
    assert f"{REPO}/results:/opt/harness/results" in proc.stdout  # results bind-mounted from ./results


def test_cli_alloc_docker_stops_on_precision_or_time(runner, tmp_path):
    """--target-ci / --max-time with fresh containers: the same stopping rule and records as the local runner."""
    out = tmp_path / "t"
    t0 = time.time()
    proc = run_harness(*SEQUENTIAL, "--runner", "docker", "--model", "synthetic:tiny", "--allocators", "glibc,jemalloc",
                       "--warmup-runs", "0", "--max-new-tokens", "8", "--target-ci", "50", "--max-time", "60s",
                       "--measure-s", "0.5", "--runs", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_stopped_experiment(out, 0.5, 60, t0, time.time())
    runs = [json.loads(line) for line in (out / "alloc/runs.jsonl").read_text().splitlines()]
    assert all(r["runner"] == "docker" and r["verified"] for r in runs)
    # read inside each container: page faults always; CPU frequency and GPU clocks, or why not
    assert all(r["noise"]["minor_faults"] >= 0 and r["noise"]["gpu_unreadable"] for r in runs)


def test_sigterm_to_alloc_removes_the_probe_container(runner, tmp_path):
    """SIGTERM is handled like Ctrl-C: the running probe container is removed, the command exits 130."""
    proc = subprocess.Popen([*HARNESS, *SEQUENTIAL, "--runner", "docker", "--model", "synthetic:tiny", "--allocators",
                             "glibc", "--runs", "1", "--warmup-runs", "0", "--out", str(tmp_path / "t")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def its_containers() -> list:
        return runner.client.containers.list(all=True, filters={"label": f"{OWNER_LABEL}={proc.pid}"})

    try:
        wait_for(lambda: [c for c in its_containers() if c.status == "running"], 300, "the probe container")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        left = [c.name for c in its_containers()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for c in its_containers():
            c.remove(force=True)
    assert proc.returncode == 130, err[-2000:]
    assert not left, f"probe containers left behind: {left}"
    assert "interrupted" in err and "Traceback" not in err


def test_doctor_names_leftovers_but_not_containers_in_use():
    """A server container whose harness still runs is in use: doctor never offers to remove it."""
    import docker

    from harness import doctor
    from harness.containers import images

    client = docker.from_env(timeout=60)
    labels = {"harness": "server", **owner_labels()}
    tag = uuid.uuid4().hex[:8]
    in_use = client.containers.run(images.CPU_BASE, ["sleep", "300"], detach=True, labels=labels,
                                   name=f"harness-test-in-use-{tag}")
    left = client.containers.create(images.CPU_BASE, ["true"], labels={**labels, OWNER_LABEL: "1"},
                                    name=f"harness-test-left-{tag}")
    try:
        row = next(r for r in doctor.docker_rows() if r[0] == "no leftover server containers")
    finally:
        for c in (in_use, left):
            c.remove(force=True)
        client.close()
    _, ok, detail, fix = row
    assert f"{in_use.name} in use by harness PID {os.getpid()}" in detail, detail
    assert not ok and left.name in fix and in_use.name not in fix, fix


def test_doctor_never_offers_a_running_commands_containers_and_removing_one_ends_the_run_in_one_line(
        runner, tmp_path):
    """While `harness alloc` runs, doctor counts each of its probe containers, in every state it passes
    through (created, running, exited), as in use; `docker rm -f` of one ends the run with one line, not a
    raw Docker error."""
    from harness import doctor

    proc = subprocess.Popen([*HARNESS, *SEQUENTIAL, "--runner", "docker", "--model", "synthetic:tiny", "--allocators",
                             "glibc", "--runs", "3", "--warmup-runs", "0", "--warm-gens", "1", "--max-new-tokens",
                             "4", "--out", str(tmp_path / "t")], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

    def its_containers() -> list:
        return runner.client.containers.list(all=True, filters={"label": f"{OWNER_LABEL}={proc.pid}"})

    seen: dict[str, set[str]] = {}
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(seen) < 2:  # the first run's container, then the second's
            mine = its_containers()
            for c in mine:
                seen.setdefault(c.name, set()).add(c.status)
            _, ok, detail, _ = doctor.leftover_row(mine, "probe")
            assert ok, f"doctor offered a running command's container: {detail}"
            time.sleep(0.05)
        victim = wait_for(lambda: [c for c in its_containers() if c.status == "running"], 120, "a probe container")[0]
        victim.remove(force=True)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for c in its_containers():
            c.remove(force=True)
    assert len(seen) >= 2 and "running" in set().union(*seen.values()), seen
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and "Traceback" not in err and "409" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith(
        f"error: the probe container {victim.name} was removed from outside while running the glibc probe "
        "(docker rm -f?); continue with --resume (runs so far kept in "), err[-3000:]
