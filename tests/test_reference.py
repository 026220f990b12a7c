"""Committed reference results: real runs with their environment, and a README that quotes them exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

REFERENCE = REPO / "results" / "reference"


def test_readme_results_block_is_generated_from_the_files():
    proc = subprocess.run([sys.executable, "scripts/render_reference.py", "--check"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _serve_runs():
    """Every committed serve run (a `serve/` folder with its config), at any depth."""
    return sorted(config.parent.parent for config in REFERENCE.rglob("serve/config.json"))


@pytest.mark.fast
def test_every_reference_directory_holds_a_run():
    """An empty or misplaced reference folder must not pass unnoticed."""
    for d in (d for d in REFERENCE.iterdir() if d.is_dir()):
        assert (list(d.glob("alloc/runs.jsonl")) or list(d.rglob("serve/config.json"))
                or list(d.rglob("alloc/windows.jsonl"))), f"{d.name} holds no run"


def _duet_runs():
    """Every committed duet experiment or calibration (an `alloc/windows.jsonl` with its config), at any depth."""
    return sorted(w.parent.parent for w in REFERENCE.rglob("alloc/windows.jsonl"))


@pytest.mark.fast
def test_every_duet_reference_has_its_environment_and_verified_sets():
    runs = _duet_runs()
    assert runs
    for d in runs:
        env = json.loads((d / "environment.json").read_text())
        assert env["software"]["torch"] and env["host"]["cpu_model"]
        sets = [json.loads(line) for line in (d / "alloc" / "sets.jsonl").read_text().splitlines()]
        counted = [s for s in sets if s["status"] in ("ok", "interrupted") and s["steps"] > 0]
        assert counted, d
        for record in counted:  # every arm's malloc read in its own process
            assert all(a["verified"] and a["loaded_allocator"]["name"] == a["allocator"] for a in record["arms"])
            assert len({a["pid"] for a in record["arms"]}) == len(record["arms"])


def test_committed_duet_reports_are_what_the_harness_computes_from_the_windows(tmp_path):
    from conftest import run_harness

    for d in sorted({r if r.name != "calibration" else r.parent for r in _duet_runs()}):
        copy = tmp_path / d.name
        subprocess.run(["cp", "-r", str(d), str(copy)], check=True)
        for derived in [*copy.rglob("summary.md"), *copy.rglob("allocator_latency_comparison.csv")]:
            derived.unlink()
        proc = run_harness("report", str(copy))
        assert proc.returncode == 0, proc.stderr[-2000:]
        for sub in ("", "calibration"):
            for name in ("summary.md", "allocator_latency_comparison.csv"):
                committed = d / sub / "alloc" / name
                if committed.exists():
                    assert (copy / sub / "alloc" / name).read_text() == committed.read_text(), f"{d.name}: {sub} {name}"


@pytest.mark.fast
def test_every_reference_directory_has_its_environment_and_verified_runs():
    dirs = [d for d in REFERENCE.iterdir() if d.is_dir()] + _serve_runs()
    assert dirs
    for d in dirs:
        runs_file = d / "alloc" / "runs.jsonl"
        if runs_file.exists():
            env = json.loads((d / "environment.json").read_text())
            assert env["software"]["torch"] and env["host"]["cpu_model"]
            runs = [json.loads(line) for line in runs_file.read_text().splitlines()]
            ok = [r for r in runs if r["status"] == "ok"]
            assert ok and all(r["verified"] and r["loaded_allocator"]["name"] == r["allocator"] for r in ok)
        if (d / "serve").exists():
            assert json.loads((d / "serve" / "environment.json").read_text())
            assert (d / "serve" / "first_token_latency.md").read_text().startswith("# First-token latency")


def test_committed_reports_are_what_the_harness_computes_from_the_runs(tmp_path):
    """Each reference summary and CSV is the current `harness report` of its runs, not a stale or edited copy."""
    from conftest import run_harness

    for d in (d for d in REFERENCE.iterdir() if (d / "alloc" / "runs.jsonl").exists()):
        copy = tmp_path / d.name
        (copy / "alloc").mkdir(parents=True)
        for src in [d / "alloc" / "runs.jsonl", d / "alloc" / "config.json", *d.glob("alloc/stopping.jsonl"),
                    *d.glob("environment*.json")]:
            (copy / src.relative_to(d)).write_bytes(src.read_bytes())
        proc = run_harness("report", str(copy))
        assert proc.returncode == 0, proc.stderr[-2000:]
        for name in ("summary.md", "allocator_latency_comparison.csv"):
            assert (copy / "alloc" / name).read_text() == (d / "alloc" / name).read_text(), f"{d.name}: {name}"


def test_committed_serve_reports_are_what_the_harness_rebuilds(tmp_path):
    """Each serve reference's report, comparison CSV and start-up records are what `harness report` rebuilds
    from its records and logs (a live run ends the same way), so no figure is stale or edited."""
    from conftest import run_harness

    runs = _serve_runs()
    assert runs
    for d in runs:
        copy = tmp_path / d.relative_to(REFERENCE)
        copy.mkdir(parents=True)
        subprocess.run(["cp", "-r", str(d / "serve"), str(copy)], check=True)
        proc = run_harness("report", str(copy))
        assert proc.returncode == 0, proc.stderr[-2000:]
        for rebuilt in (copy / "serve").iterdir():
            if rebuilt.suffix in (".md", ".csv", ".jsonl"):
                assert rebuilt.read_text() == (d / "serve" / rebuilt.name).read_text(), f"{d}: {rebuilt.name}"
