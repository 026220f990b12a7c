"""The typed records: each round-trips, every older shape the committed reference runs hold loads and is
written back unchanged, unknown keys are kept, and a results file cut short by a crash loses nothing else."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import REPO

from harness.measure.records import (
    AllocRun,
    Environment,
    RecordError,
    ServeEnd,
    ServeRequest,
    StartupRecord,
    TimelineMeta,
    TimelineSample,
)
from harness.measure.results import ResultsDir, read_csv

REFERENCE = REPO / "results" / "reference"


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _shapes(pattern: str) -> dict[tuple[str, ...], str]:
    """One real line per distinct key list (shape and order) in the committed files matching `pattern`."""
    found: dict[tuple[str, ...], str] = {}
    for path in sorted(REFERENCE.rglob(pattern)):
        for line in _lines(path):
            found.setdefault(tuple(json.loads(line)), line)
    return found


def _written(record) -> str:
    return ResultsDir.dumps(record.to_dict())


# --- round trips of records built here ------------------------------------------------------------
BUILT = [
    AllocRun(run_index=3, round=1, position=0, allocator="jemalloc", status="ok", environment="environment.json",
             gen_latency_s=0.5, itl_p25_s=0.02, noise={"minor_faults": 10}, probe={"warm": [{"latency_s": 0.5}]}),
    ServeRequest(server=0, index=1, kind="warm", status="ok", ttft_s=0.01, itl_s=[0.001, 0.002]),
    StartupRecord(server=2, allocator="glibc", round=0, status="failed", failure="boom", log_tail=["x"],
                  phases=[{"key": "args", "label": "imports", "start_s": 0.0, "end_s": 1.0, "duration_s": 1.0}]),
    TimelineMeta(hz=10.0, gpu_reason="no GPU", has_container=True),
    ServeEnd(stopped_early="server 0 died — see the log tail in the report"),
    Environment(collected_at="2026-01-01T00:00:00+00:00", host={"hostname": "h"}, extra={"runner": {"kind": "local"}}),
]


@pytest.mark.parametrize("record", BUILT, ids=lambda r: type(r).__name__)
def test_a_built_record_round_trips(record) -> None:
    data = json.loads(_written(record))
    assert data["schema"] == type(record).tag()  # written with its family and the current version
    again = type(record).load(data)
    assert again == record and again.version == type(record).VERSION
    assert _written(again) == _written(record)  # read and written back: the same line


def test_a_timeline_sample_round_trips_through_its_csv(tmp_path: Path) -> None:
    samples = [TimelineSample(t_s=0.05, values={"server_rss_mb": 812.5, "gpu0_used_mb": 1024.0}),
               TimelineSample(t_s=0.1, marker="spawn:s0 spawn")]
    results = ResultsDir(tmp_path)
    path = results.write_csv("serve/memory_timeline.csv", ["t_s", "server_rss_mb", "gpu0_used_mb", "marker"],
                             [s.to_dict() for s in samples])
    assert [TimelineSample.load(row) for row in read_csv(path)] == samples


# --- every older shape of the committed reference runs --------------------------------------------
def test_every_alloc_run_shape_of_the_reference_loads_and_is_written_back_unchanged() -> None:
    shapes = _shapes("alloc/runs.jsonl")
    assert {len(keys) for keys in shapes} >= {35, 39, 44}  # before pairing, with it, with the noise fields
    for keys, line in shapes.items():
        run = AllocRun.load(json.loads(line))
        assert run.version == 1 and run.environment is None and not run.extra
        assert _written(run) == line
        assert run.recorded("steal_pct") == ("steal_pct" in keys)
        if len(keys) == 35:  # before pairing: read as not paired
            assert run.pair is None and run.concurrent_with is None


def test_every_serve_request_shape_of_the_reference_loads_and_is_written_back_unchanged() -> None:
    shapes = _shapes("serve/requests.jsonl")
    versions = set()
    for line in shapes.values():
        request = ServeRequest.load(json.loads(line))
        versions.add(request.version)
        assert _written(request) == line
        assert request.ends_at_stream_end == (request.version == 1 and request.mode == "stream")
    assert versions == {1, 2}  # serve-request/1 (E2E to the end of the stream) and /2


def test_every_startup_shape_of_the_reference_loads_and_is_written_back_unchanged() -> None:
    shapes = _shapes("serve/startup.jsonl")
    assert len(shapes) >= 4  # the keys differ, and so does their order
    for keys, line in shapes.items():
        startup = StartupRecord.load(json.loads(line))
        assert _written(startup) == line
        assert startup.recorded("allocator") == ("allocator" in keys)
    # Re-analysed (its fields replaced), an older record keeps its keys in their order.
    keys, line = next((k, v) for k, v in shapes.items() if k.index("compile_cache") < k.index("server_figures"))
    redone = replace(StartupRecord.load(json.loads(line)), phases=[], unaccounted_s=1.0)
    assert tuple(redone.to_dict()) == keys


def test_every_environment_and_timeline_file_of_the_reference_loads_and_is_written_back_unchanged() -> None:
    envs = sorted(REFERENCE.rglob("environment*.json"))
    assert envs
    for path in envs:
        data = json.loads(path.read_text())
        env = Environment.load(data)
        assert env.version == 1 and data.get("schema", "environment/1") == "environment/1"  # older ones untagged
        assert env.to_dict() == data and list(env.to_dict()) == list(data)
        assert env.host_key and env.gpu_name
    serve_env = Environment.load(json.loads((REFERENCE / "h100-phi3-mini-vllm/fresh/serve/environment.json")
                                            .read_text()))
    assert serve_env.added("server_vllm")["vllm"]  # what serve added is kept, at the top level
    for path in sorted(REFERENCE.rglob("serve/timeline.json")):
        data = json.loads(path.read_text())
        assert TimelineMeta.load(data).to_dict() == data


# --- unknown keys, other families, newer versions ---------------------------------------------------
def test_unknown_keys_are_kept_in_their_place() -> None:
    line = next(iter(_shapes("alloc/runs.jsonl").values()))
    data = json.loads(line)
    keys = list(data)
    data = {**{k: data[k] for k in keys[:5]}, "future_field": {"x": 1}, **{k: data[k] for k in keys[5:]}}
    run = AllocRun.load(data)
    assert run.extra == {"future_field": {"x": 1}}
    assert list(run.to_dict()) == list(data) and run.to_dict() == data
    assert replace(run, gen_latency_s=1.0).to_dict()["future_field"] == {"x": 1}  # kept through a change


def test_a_missing_field_reads_as_its_default_and_is_not_written_back() -> None:
    run = AllocRun.load({"schema": "alloc-run/1", "run_index": 0, "round": 0, "position": 0, "allocator": "glibc",
                         "status": "ok"})
    assert run.warmup is False and run.noise is None and not run.recorded("noise")
    assert list(run.to_dict()) == ["schema", "run_index", "round", "position", "allocator", "status"]
    assert "concurrent_with" in replace(run, concurrent_with=4).to_dict()  # set since: written


def test_other_families_newer_versions_and_incomplete_records_are_refused() -> None:
    with pytest.raises(RecordError, match="not a alloc-run/2"):
        AllocRun.load({"schema": "serve-request/2", "server": 0})
    with pytest.raises(RecordError, match="newer harness"):
        ServeRequest.load({"schema": "serve-request/3", "server": 0, "index": 0, "kind": "cold"})
    with pytest.raises(RecordError, match="no run_index"):
        AllocRun.load({"schema": "alloc-run/1", "round": 0, "position": 0, "allocator": "glibc", "status": "ok"})
    with pytest.raises(RecordError):
        StartupRecord.load(["not", "a", "dict"])


# --- the one writer and loader ---------------------------------------------------------------------
def test_a_cut_last_line_is_skipped_and_reported_and_the_next_record_is_kept(tmp_path: Path) -> None:
    lines = _lines(REFERENCE / "h100-phi3-mini/alloc/runs.jsonl")[:3]
    runs_file = tmp_path / "alloc/runs.jsonl"
    runs_file.parent.mkdir()
    runs_file.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:200])  # a crash cut the third line
    results = ResultsDir(tmp_path)
    runs = results.read_records("alloc/runs.jsonl", AllocRun)
    assert [r.run_index for r in runs] == [0, 1]
    assert results.skipped_lines("alloc/runs.jsonl") == [3]
    assert "line 3: not a whole JSON record" in results.skipped_note("alloc/runs.jsonl")
    again = AllocRun.load(json.loads(lines[2]))
    results.append_record("alloc/runs.jsonl", again)  # the re-run goes on a line of its own
    runs = results.read_records("alloc/runs.jsonl", AllocRun)
    assert [r.run_index for r in runs] == [0, 1, 2] and runs[2] == again
    assert results.skipped_lines("alloc/runs.jsonl") == [3]
    assert runs_file.read_text().splitlines()[2] == lines[2][:200]  # the file keeps the cut line


def test_a_line_of_another_family_is_skipped_and_reported(tmp_path: Path) -> None:
    results = ResultsDir(tmp_path)
    results.append("serve/requests.jsonl", {"schema": "alloc-run/2", "run_index": 0})
    results.append_record("serve/requests.jsonl", BUILT[1])
    assert results.read_records("serve/requests.jsonl", ServeRequest) == [BUILT[1]]
    assert results.skipped_lines("serve/requests.jsonl") == [1]


def test_environments_are_read_by_file_name_and_each_run_names_its_own(tmp_path: Path) -> None:
    """A run that names its environment file belongs to that host, whatever the clocks say; an older run
    without one still belongs to the last environment collected before it started."""
    from harness.alloc.report import run_hosts

    results = ResultsDir(tmp_path)
    first = Environment(collected_at="2026-01-01T10:00:00+00:00", host={"hostname": "a"})
    second = Environment(collected_at="2026-01-01T12:00:00+00:00", host={"hostname": "b"})
    results.write_record("environment.json", first)
    results.write_record("environment.resume-1.json", second)
    envs = results.read_environments()
    assert list(envs) == ["environment.json", "environment.resume-1.json"] and envs["environment.json"] == first

    def run(i: int, started: str, env: str | None) -> AllocRun:
        return AllocRun(run_index=i, round=0, position=i, allocator="glibc", status="ok", started_at=started,
                        environment=env)

    skewed = run(0, "2026-01-01T09:00:00+00:00", "environment.resume-1.json")  # a clock behind the first host's
    older = run(1, "2026-01-01T12:30:00+00:00", None)
    assert run_hosts([skewed, older], envs) == {0: "b", 1: "b"}
    assert run_hosts([run(2, "2026-01-01T11:00:00+00:00", None)], envs) == {2: "a"}
