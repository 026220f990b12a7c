"""Committed reference results: real runs with their environment, and a README that quotes them exactly."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

REFERENCE = REPO / "results" / "reference"


def test_readme_results_block_is_generated_from_the_files():
    proc = subprocess.run([sys.executable, "scripts/render_reference.py", "--check"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_reference_directory_has_its_environment_and_verified_runs():
    dirs = [d for d in REFERENCE.iterdir() if d.is_dir()]
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
