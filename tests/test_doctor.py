"""`harness doctor`, the parts that need no Docker daemon and no vLLM: the allocator and GPU rows, the
leftover-container rule, and the table. test_docker_runner.py checks the Docker rows on a real daemon."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from types import SimpleNamespace

import psutil
import pytest

from harness import doctor
from harness.containers.engine import OWNER_LABEL, OWNER_STARTED_LABEL
from harness.measure import environment
from harness.measure.allocators import find_library

pytestmark = pytest.mark.fast


def test_allocator_rows_give_each_library_or_the_package_that_installs_it(monkeypatch, tmp_path) -> None:
    rows = doctor.allocator_rows()
    names = ("jemalloc", "tcmalloc", "mimalloc")
    assert [row[0] for row in rows] == [f"{name} library (local runner)" for name in names]
    for (_, ok, detail, _), name in zip(rows, names, strict=True):
        path = find_library(name)
        assert (ok, detail) == (path is not None, path or "not found")
    # a host whose library directories hold none of them
    monkeypatch.setattr(doctor, "find_library", lambda name: find_library(name, [str(tmp_path)]))
    assert doctor.allocator_rows() == [
        ("jemalloc library (local runner)", False, "not found", "sudo apt-get install -y libjemalloc2"),
        ("tcmalloc library (local runner)", False, "not found", "sudo apt-get install -y libtcmalloc-minimal4"),
        ("mimalloc library (local runner)", False, "not found", "sudo apt-get install -y libmimalloc2.0")]


def test_gpu_row_says_what_nvml_sees_or_how_to_get_it() -> None:
    info = environment.gpus()
    check, ok, detail, fix = doctor.gpu_row()
    assert check == "GPUs visible through NVML" and ok == bool(info.get("available"))
    if ok:
        assert all(d["name"] in detail for d in info["devices"]) and fix == ""
    else:
        assert detail == info["reason"] and fix in ("pip install nvidia-ml-py", "install the NVIDIA driver "
                                                    "(nvidia-smi must work); CPU-only hosts use --device cpu")


def _container(name: str, status: str, owner: int | str, created: dt.datetime,
               started: float | None = None) -> SimpleNamespace:
    """What doctor reads of a Docker container: its name, state, labels and creation time."""
    labels = {"harness": "server", OWNER_LABEL: str(owner)}
    if started is not None:
        labels[OWNER_STARTED_LABEL] = repr(started)
    return SimpleNamespace(name=name, status=status, labels=labels,
                           attrs={"Created": created.strftime("%Y-%m-%dT%H:%M:%S.%f000Z")})


def test_a_container_whose_harness_still_runs_is_in_use_in_every_state_never_a_leftover() -> None:
    """Created and not yet started, running, exited and not yet removed: while the harness process that
    created it runs (its PID and its start time on the labels), a container is in use."""
    now = dt.datetime.now(dt.timezone.utc)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_owner = int(ended.stdout)  # a harness process that has ended
    me, my_start = os.getpid(), psutil.Process().create_time()
    containers = [
        _container("in-use", "running", me, now, my_start),
        _container("starting", "created", me, now, my_start),
        _container("just-exited", "exited", me, now, my_start),
        _container("orphan", "running", dead_owner, now, my_start),
        _container("pid-reused", "exited", me, now, my_start - 3600),  # its owner started an hour earlier
        _container("reused-pid", "running", os.getpid(), now - dt.timedelta(days=30)),  # made before this process
        _container("unlabelled", "running", "", now),
    ]
    check, ok, detail, fix = doctor.leftover_row(containers, "server")
    assert check == "no leftover server containers" and not ok
    assert detail == ("4 found" + "".join(f"; {name} in use by harness PID {me}"
                                          for name in ("in-use", "starting", "just-exited")))
    assert fix == "docker rm -f orphan pid-reused reused-pid unlabelled"
    assert doctor.leftover_row(containers[:3], "server")[1] is True


def test_the_table_offers_a_fix_only_for_what_is_missing() -> None:
    table = doctor.render([("jemalloc library (local runner)", True, "/usr/lib/libjemalloc.so.2", "apt install x"),
                           ("vLLM available", False, "no .venv-vllm", "make vllm")])
    header, _, present, missing = table.splitlines()
    assert header.split() == ["check", "status", "detail", "fix"]
    assert present.split()[-2:] == ["ok", "/usr/lib/libjemalloc.so.2"] and "apt install" not in table
    assert missing.split()[-5:] == ["MISSING", "no", ".venv-vllm", "make", "vllm"]
