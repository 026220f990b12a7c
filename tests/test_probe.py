"""The probe in real fresh processes, under real allocator libraries."""

from __future__ import annotations

import os

import pytest

from harness.alloc.run import verify
from harness.alloc.runners.base import ProbeRequest
from harness.alloc.runners.local import LocalRunner
from harness.measure.allocators import Allocator, find_library
from harness.probe.models import ModelError, parse_model, save_synthetic_model_dir


def probe(allocator: Allocator, model: str = "synthetic:tiny", **kw):
    request = ProbeRequest(allocator=allocator, model=model, device="cpu", warm_gens=kw.pop("warm_gens", 1),
                           max_new_tokens=kw.pop("max_new_tokens", 6), timeout_s=kw.pop("timeout_s", 300), **kw)
    return LocalRunner().run_probe(request)


def check_result(outcome, allocator: Allocator, max_new_tokens: int = 6):
    assert outcome.exit_code == 0, outcome.log_tail
    result = outcome.probe
    assert result["allocator"]["name"] == allocator.name
    assert verify(allocator, result) is None
    assert result["cold"]["new_tokens"] == max_new_tokens  # exactly T tokens, no early stop
    assert all(g["new_tokens"] == max_new_tokens for g in result["warm"])
    assert 0 < result["ttft_s"] < result["gen_latency_s"]
    assert result["tpot_s"] > 0
    assert result["peak_rss_mb"] > 50 and outcome.parent_maxrss_mb > 50
    assert outcome.wall_real_s > result["gen_latency_s"]
    return result


def test_probe_under_glibc():
    glibc = Allocator("glibc", None)
    result = check_result(probe(glibc), glibc)
    assert result["allocator"]["malloc_library"].split("/")[-1].startswith("libc")
    assert result["allocator"]["version"]  # gnu_get_libc_version()


@pytest.mark.parametrize("name", ["jemalloc", "tcmalloc", "mimalloc"])
def test_probe_under_preloaded_allocator(name):
    path = find_library(name)
    assert path, f"{name} is not installed: scripts/setup-system.sh installs it"
    allocator = Allocator(name, path)
    result = check_result(probe(allocator), allocator)
    assert os.path.realpath(path) == result["allocator"]["malloc_library"]
    assert result["allocator"]["version"], "the loaded library reports its own version"


def test_caller_ld_preload_does_not_leak_into_glibc_runs(jemalloc_path, monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", jemalloc_path)
    glibc = Allocator("glibc", None)
    check_result(probe(glibc), glibc)


def test_verification_catches_the_wrong_library(jemalloc_path, tcmalloc_path):
    # Asked for jemalloc, but the path given is tcmalloc: the process ran, the run must not count.
    wrong = Allocator("jemalloc", tcmalloc_path)
    outcome = probe(wrong)
    assert outcome.exit_code == 0
    reason = verify(wrong, outcome.probe)
    assert reason is not None and tcmalloc_path in reason and "malloc resolved to" in reason


def test_same_weights_and_tokens_from_a_saved_local_directory(tmp_path):
    """The real from_pretrained path, on a directory the test saves itself."""
    model_dir = save_synthetic_model_dir("tiny", tmp_path / "tiny-model", seed=0)
    spec = parse_model(str(model_dir))
    assert spec.kind == "local"
    glibc = Allocator("glibc", None)
    local = check_result(probe(glibc, model=str(model_dir), max_new_tokens=6), glibc)
    synthetic = check_result(probe(glibc, max_new_tokens=6), glibc)
    assert local["model"]["kind"] == "local"
    assert local["sample_text"] == synthetic["sample_text"] != ""


@pytest.mark.fast
def test_model_names_are_checked():
    assert parse_model("synthetic:tiny").kind == "synthetic"
    assert parse_model("microsoft/Phi-3-mini-4k-instruct").kind == "hub"
    for bad in ("synthetic:huge", "not a model", "/nonexistent/dir/x/y"):
        with pytest.raises(ModelError):
            parse_model(bad)


def test_unloadable_hub_model_fails_the_probe_with_a_reason(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this machine reaches no hub; do not wait on one
    outcome = probe(Allocator("glibc", None), model="nonexistent-org/nonexistent-model",
                    timeout_s=120)
    assert outcome.exit_code == 2 and outcome.probe is None
    assert "cannot load model" in outcome.error


def test_measured_window_in_seconds_and_the_noise_read_while_it_ran():
    """--measure-s: warm generates until that much generation is measured; the probe reports what else could
    have slowed them (page faults always, GPU clocks and CPU frequency or the reason they cannot be read)."""
    glibc = Allocator("glibc", None)
    outcome = probe(glibc, measure_s=1.0)
    result = check_result(outcome, glibc)
    latencies = [g["latency_s"] for g in result["warm"]]
    assert result["warm_gens"] == len(latencies) >= 1 and result["measure_s"] == 1.0
    assert result["measured_s"] == pytest.approx(sum(latencies)) and result["measured_s"] >= 1.0
    assert sum(latencies[:-1]) < 1.0, "no generate starts once the window is full"
    assert result["window_s"] >= result["measured_s"] and outcome.wall_real_s > result["window_s"]
    noise = result["noise"]
    assert noise["minor_faults"] >= 0 and noise["major_faults"] >= 0
    assert noise["gpu"] is None and noise["gpu_unreadable"] == "no GPU in use"
    if noise["cpu_freq"] is None:
        assert noise["cpu_freq_unreadable"]
    else:
        assert 0 < noise["cpu_freq"]["min_mhz"] <= noise["cpu_freq"]["mean_mhz"] <= noise["cpu_freq"]["max_mhz"]
