"""What a starting server does while its log is silent: its Python stacks, sampled with py-spy.

`StackSampler` runs `py-spy dump --json --nonblocking` on every Python process of the server tree a
few times a second from spawn until the server is ready, and appends each dump as a JSON line
(`serve/startup-stacks-K.jsonl`). `name_silences` then names the top frames of each silent stretch
of the log. py-spy reads another process's memory (ptrace): it needs root or
`kernel.yama.ptrace_scope` 0; where it cannot, the sampler says why and the report says so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from harness.serve.phases import Silence

DEFAULT_HZ = 2.0
MAX_FRAMES = 40
DUMP_TIMEOUT_S = 5.0
# Frames that say only "waiting" or "importing": skipped when naming what a stack is doing.
_PLUMBING = ("threading.py", "selectors.py", "queue.py", "<frozen importlib", "concurrent/futures",
             "multiprocessing/connection.py", "subprocess.py", "asyncio/")


def find_py_spy() -> str | None:
    """py-spy next to this interpreter (the harness's venv) or on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _frame(f: dict[str, Any]) -> str:
    return f"{f.get('name')} ({f.get('short_filename') or f.get('filename')}:{f.get('line')})"


def _threads(dump: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The main thread and every thread py-spy saw running, frames innermost first."""
    keep = [t for t in dump if t.get("thread_name") == "MainThread" or t.get("active")]
    return [{"name": t.get("thread_name"), "active": bool(t.get("active")),
             "frames": [_frame(f) for f in (t.get("frames") or [])[:MAX_FRAMES]]} for t in keep]


def python_processes(root_pid: int) -> list[psutil.Process]:
    """The server tree's Python processes (vLLM renames its engine core `VLLM::EngineCore`)."""
    try:
        root = psutil.Process(root_pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    out = []
    for p in tree:
        try:
            name, exe = p.name(), p.exe()
        except psutil.Error:
            continue
        if "python" in os.path.basename(exe) or "python" in name or name.startswith("VLLM"):
            out.append(p)
    return out


@dataclass
class StackSampler:
    """Samples the stacks of the tree under `root_pid` into `out_path` until `stop()`."""

    root_pid: int
    t_spawn: float  # time.perf_counter() at spawn: samples are stamped in seconds since spawn
    out_path: Path
    hz: float = DEFAULT_HZ
    py_spy: str | None = None
    reason: str | None = None  # why no stacks could be read (None: samples were taken)
    samples: int = 0
    _stop: threading.Event | None = None
    _thread: threading.Thread | None = None

    def start(self) -> StackSampler:
        self.py_spy = self.py_spy or find_py_spy()
        if self.py_spy is None:
            self.reason = "py-spy is not installed (pip install py-spy)"
            return self
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._stop is not None and not self._stop.is_set()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=DUMP_TIMEOUT_S + 2)
        if self.samples == 0 and self.reason is None:
            self.reason = "no stack sample was taken before the server was ready"

    def _run(self) -> None:
        assert self._stop is not None
        period = 1.0 / self.hz
        errors: Counter[str] = Counter()
        with open(self.out_path, "a") as out, ThreadPoolExecutor(max_workers=4) as pool:
            while not self._stop.is_set():
                tick = time.perf_counter()
                procs = python_processes(self.root_pid)
                for record in pool.map(self._dump, procs):
                    if "error" in record:
                        errors[record["error"]] += 1
                        continue
                    out.write(json.dumps(record) + "\n")
                    self.samples += 1
                out.flush()
                if not self.samples and sum(errors.values()) >= 6:
                    self.reason = f"py-spy cannot read the server's stacks: {errors.most_common(1)[0][0]}"
                    return
                self._stop.wait(max(period - (time.perf_counter() - tick), 0.0))

    def _dump(self, proc: psutil.Process) -> dict[str, Any]:
        t = time.perf_counter() - self.t_spawn
        try:
            done = subprocess.run([str(self.py_spy), "dump", "--json", "--nonblocking", "--pid", str(proc.pid)],
                                  capture_output=True, text=True, timeout=DUMP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return {"error": f"py-spy dump failed: {exc}"}
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            return {"error": lines[-1][:200] if lines else f"py-spy exit code {done.returncode}"}
        try:
            dump = json.loads(done.stdout)
        except json.JSONDecodeError:
            return {"error": "py-spy printed no JSON"}
        try:
            name = proc.name()
        except psutil.Error:
            name = "?"
        try:
            command = " ".join(proc.cmdline())[:200]
        except psutil.Error:
            command = ""
        return {"t_s": round(t, 3), "pid": proc.pid, "process": name, "cmdline": command,
                "threads": _threads(dump)}


def load(path: Path) -> list[dict[str, Any]]:
    """Samples back from a stacks file (a line cut by a kill is skipped)."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _package(frame: str) -> str:
    """'torch' for 'f (torch/cuda/__init__.py:12)'; 'stdlib' for frozen or top-level modules."""
    where = frame.rsplit(" (", 1)[-1].rstrip(")")
    if where.startswith("<"):
        return "stdlib"
    return where.split("/", 1)[0] if "/" in where else "stdlib"


def doing(frames: list[str]) -> str:
    """What one stack is doing, in a few words: waiting for the engine core, compiling or importing a
    package, or the package of the innermost working frame and the vLLM function that called it."""
    if not frames:
        return "no Python frame"
    if any("wait_for_engine_startup" in f for f in frames):
        return "waiting for the engine core to start (wait_for_engine_startup)"
    modules = [f for f in frames if f.startswith("<module> (")]
    if modules and any("_find_and_load" in f or "importlib" in f for f in frames):
        what = "compiling to bytecode" if any("source_to_code" in f for f in frames) else "import"
        return f"{what}: {_package(modules[0])}"
    work = next((f for f in frames if not any(p in f for p in _PLUMBING)), frames[0])
    caller = next((f for f in frames[frames.index(work):] if "vllm/" in f), None)
    if caller is None:
        return work
    if _package(work) == "vllm":
        return caller
    return f"{_package(work)} in {caller}"


def _role(pid: int, samples: list[dict[str, Any]], roles: dict[int, str]) -> str | None:
    """The role of a sampled process; None for multiprocessing's resource tracker (never start-up work)."""
    if pid in roles:
        return roles[pid]
    frames = [f for x in samples for t in x.get("threads") or [] for f in t.get("frames") or []]
    if any("resource_tracker.py" in f for f in frames):
        return None
    command = next((x.get("cmdline") for x in samples if x.get("cmdline")), None)
    if command:
        return f"pid {pid} ({command[:60]})"
    mains = [f for f in frames if "_run_module_as_main" in f or "spawn_main" in f]
    return f"pid {pid} ({'child process' if mains else 'process'})"


def _waiting(activities: Counter[str]) -> bool:
    return activities.most_common(1)[0][0].startswith("waiting")


def import_shares(samples: list[dict[str, Any]], roles: dict[int, str]) -> dict[str, tuple[float, float, int]]:
    """Per process role over the whole start-up: (share of samples importing, share of them compiling
    source to bytecode, samples), a process that cannot use a bytecode cache pays the compile on every start."""
    out: dict[str, tuple[float, float, int]] = {}
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for x in samples:
        by_pid.setdefault(x["pid"], []).append(x)
    for pid, xs in by_pid.items():
        role = _role(pid, xs, roles)
        if role is None:
            continue
        what = [doing(next((t["frames"] for t in x.get("threads") or [] if t.get("name") == "MainThread"), []))
                for x in xs]
        importing = sum(w.startswith(("import:", "compiling")) for w in what)
        compiling = sum(w.startswith("compiling") for w in what)
        out[role] = (importing / len(what), compiling / len(what), len(what))
    return out


@dataclass(frozen=True)
class NamedSilence:
    silence: Silence
    n_samples: int
    top: list[tuple[str, float]]  # ("role: what it does", share of that role's samples in the stretch)


def name_silences(silent: list[Silence], samples: list[dict[str, Any]], roles: dict[int, str] | None = None,
                  per_role: int = 2) -> list[NamedSilence]:
    """For each silent stretch: per process (resource tracker left out), its most frequent activities."""
    roles = roles or {}
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for x in samples:
        by_pid.setdefault(x["pid"], []).append(x)
    role_of = {pid: _role(pid, xs, roles) for pid, xs in by_pid.items()}
    out = []
    for s in silent:
        inside = [x for x in samples if s.start_s <= x["t_s"] <= s.end_s and role_of.get(x["pid"])]
        counts: dict[str, Counter[str]] = {}
        for x in inside:
            threads = x.get("threads") or []
            main = next((t for t in threads if t.get("name") == "MainThread"), threads[0] if threads else None)
            if main is not None:
                counts.setdefault(role_of[x["pid"]], Counter())[doing(main["frames"])] += 1
        top = []
        for role, c in sorted(counts.items(), key=lambda rc: (_waiting(rc[1]), -sum(rc[1].values()))):
            total = sum(c.values())
            top += [(f"{role}: {what}", n / total) for what, n in c.most_common(per_role)]
        out.append(NamedSilence(s, len(inside), top))
    return out
