"""Fast tier: a results directory on a nearly full filesystem (a small tmpfs mounted for the test) and a
read-only runs.jsonl with --resume: refused in one line before anything starts, or, when the disk fills
during the run, one line and exit 1 that says where the run just measured is, with no half-written file.
Mounting and chattr need root: elsewhere these tests are skipped."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import ReplayRunner

from harness.alloc import run as alloc
from harness.errors import EXIT_FAULT
from harness.measure.records import Environment
from harness.measure.results import ResultsDir, ResultsError, ResultsWriteError

pytestmark = [pytest.mark.fast, pytest.mark.skipif(os.geteuid() != 0, reason="mount and chattr need root")]
SINGLE = "h100-phi3-mini"


def _config(runner: ReplayRunner, runs: int = 2) -> alloc.AllocConfig:
    return alloc.AllocConfig(model="synthetic:phi3-mini", device="cuda", allocators=runner.resolve_allocators(
        ["glibc", "jemalloc"], {}, {}), runs=runs, warm_gens=8, max_new_tokens=32, warmup_runs=0,
        runner=runner.name)


def _environment() -> Environment:
    return Environment(collected_at=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), host={})


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of this test's own, unmounted afterwards."""
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(fs: Path, leave: int = 0) -> None:
    """Fills `fs` until `leave` bytes or fewer are free."""
    with open(fs / "filler", "ab") as fh, contextlib.suppress(OSError):
        while (st := os.statvfs(fs)).f_bavail * st.f_frsize > leave:
            fh.write(b"\0" * max(4096, min(2**20, st.f_bavail * st.f_frsize - leave)))
            fh.flush()


def _no_partial_files(root: Path) -> None:
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")], "a half-written file was left"


def test_a_nearly_full_out_is_refused_before_anything_starts(small_fs: Path) -> None:
    _fill(small_fs, leave=2 * 2**20)
    runner = ReplayRunner(SINGLE)
    with pytest.raises(ResultsError) as refused:
        alloc.execute(_config(runner), runner, ResultsDir(small_fs / "out"), environment=_environment())
    assert "MiB free" in str(refused.value) and "choose another --out" in str(refused.value)
    assert not (small_fs / "out" / alloc.RUNS_FILE).exists()


class _FillingRunner(ReplayRunner):
    """Replays runs; the disk fills up after the second one."""

    def __init__(self, fs: Path) -> None:
        super().__init__(SINGLE)
        self.fs, self.done = fs, 0

    def run_probe(self, request):  # type: ignore[no-untyped-def]
        outcome = super().run_probe(request)
        self.done += 1
        if self.done == 2:
            _fill(self.fs)
        return outcome


def test_a_disk_that_fills_mid_run_ends_in_one_line_and_the_measured_run_is_kept(small_fs: Path) -> None:
    out = small_fs / "out"
    runner = _FillingRunner(small_fs)
    with pytest.raises(ResultsWriteError) as failed:
        alloc.execute(_config(runner), runner, ResultsDir(out), environment=_environment())
    message = str(failed.value)
    assert failed.value.exit_code == EXIT_FAULT and "\n" not in message
    assert message.startswith(f"cannot append to {out / alloc.RUNS_FILE}: No space left on device; the record "
                              "just measured is kept in "), message
    kept = Path(message.split("kept in ")[1].split(";")[0])
    try:
        on_disk = [json.loads(line) for line in (out / alloc.RUNS_FILE).read_text().splitlines()]
        (third,) = [json.loads(line) for line in kept.read_text().splitlines()]
    finally:
        kept.unlink()
    assert len(on_disk) == 1 and on_disk[0]["status"] == "ok" and third["allocator"] in ("glibc", "jemalloc")
    # a report or plot written then is whole or not there at all
    with pytest.raises(ResultsWriteError, match="cannot write .*summary.md: No space left on device"):
        ResultsDir(out).write_text("alloc/summary.md", "x" * 2**20)
    assert not (out / "alloc/summary.md").exists()
    _no_partial_files(out)


def test_a_read_only_runs_jsonl_is_refused_before_a_resume_starts(tmp_path: Path) -> None:
    runner = ReplayRunner(SINGLE)
    config = _config(runner, runs=1)
    alloc.execute(config, runner, ResultsDir(tmp_path), environment=_environment())
    runs = tmp_path / alloc.RUNS_FILE
    before = runs.read_text()
    more = _config(ReplayRunner(SINGLE), runs=2)
    subprocess.run(["chattr", "+i", str(runs)], check=True)
    try:
        with pytest.raises(ResultsError) as refused:
            alloc.execute(more, ReplayRunner(SINGLE), ResultsDir(tmp_path), resume=True, environment=_environment())
        # the check passed, then the file became read-only: the run measured goes next to it
        with pytest.raises(ResultsWriteError) as failed:
            ResultsDir(tmp_path).append(alloc.RUNS_FILE, {"round": 1})
    finally:
        subprocess.run(["chattr", "-i", str(runs)], check=True)
    assert f"{runs}: Operation not permitted" in str(refused.value) and "make it writable" in str(refused.value)
    assert runs.read_text() == before
    assert str(failed.value) == (f"cannot append to {runs}: Operation not permitted; the record just measured is "
                                 f"kept in {runs}.unsaved; the records before it are kept")
    assert json.loads((tmp_path / "alloc/runs.jsonl.unsaved").read_text()) == {"round": 1}


def test_serve_on_a_nearly_full_out_is_refused_before_anything_is_built(small_fs: Path) -> None:
    """Refused in one line before the synthetic model is written or a server is started."""
    from click.testing import CliRunner

    from harness.cli import main

    _fill(small_fs, leave=2 * 2**20)
    fake = Path(__file__).with_name("fake_openai_server.py")
    cache = small_fs.parent / "models"  # this test's own model cache: nothing may be written there
    result = CliRunner().invoke(main, ["serve", "--server-cmd", f"python {fake} --port {{port}}",
                                       "--model-cache", str(cache), "--out", str(small_fs / "serve")])
    assert result.exit_code == 2, result.output
    assert "MiB free" in result.output
    assert not cache.exists(), "the synthetic model was written before the refusal"
    assert not [p for p in (small_fs / "serve").rglob("*") if p.name != ".lock"]
