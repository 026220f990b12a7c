"""Allocator arms of `harness serve --allocators`: each server's environment, the rounds that interleave
them, and the check that a server really ran under the allocator its arm names.

The check reads `/proc/<pid>/maps` of every process of the server tree once it is ready. The processes
that serve (vLLM's API server, its engine core and any model worker; for other engines, the process the
harness started) must map the arm's library and no other malloc library; for glibc, none at all. vLLM's CPU platform
prepends a tcmalloc bundled under `vllm/libs` to the LD_PRELOAD of the processes it starts (unless
LD_PRELOAD already names a libtcmalloc): such a server maps two mallocs, or tcmalloc under glibc, and is
recorded as failed, never counted. Helpers that do not serve (the multiprocessing resource tracker,
torch.compile workers, docker-init) are recorded but not required.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil

from harness.measure.allocators import Allocator
from harness.measure.records import StartupRecord
from harness.serve.engines import ServerSpec
from harness.serve.phases import process_roles
from harness.serve.server import ServerError

# A library that replaces malloc when preloaded (OpenMP runtimes and the like are not allocators).
MALLOC_LIB = re.compile(r"/\S*lib(tcmalloc|jemalloc|mimalloc)[^/\s]*\.so[.\d]*")
API_SERVER, ENGINE_CORE, WORKER = "api_server", "engine_core", "worker"
SERVING_ROLES = (API_SERVER, ENGINE_CORE, WORKER)
T = TypeVar("T")


class AllocatorMismatchError(ServerError):
    """The server tree did not run under the allocator its arm names."""


def rotated(items: Sequence[T], round_: int) -> list[T]:
    """Round `round_`'s order: the list rotated by the round, so drift hits every arm alike."""
    if not items:
        return []
    shift = round_ % len(items)
    return [*items[shift:], *items[:shift]]


class FixedRounds:
    """The stopping rule of a fixed plan: `--cold-starts` rounds, every one run.

    The round loop asks it as it asks the open-ended rule (harness.serve.comparison.ServeStopper, which is
    harness alloc's `stopping.Stopper`): `rounds()` to go on, `may_start()` before each server (a time
    budget holds one back), `round_done()` after each round (the precision target stops there, from the
    records so far) and `stop()` with the reason."""

    outcome = None  # a fixed plan records no stop

    def __init__(self, rounds: int) -> None:
        self.n = rounds

    def rounds(self) -> Iterator[int]:
        return iter(range(self.n))

    def may_start(self, servers_left_in_round: int, startups: list[StartupRecord]) -> bool:
        return True

    def unit_done(self, seconds: float) -> None:
        """How long a server took (the open-ended rule estimates from it whether the next one fits)."""

    def round_done(self, round_: int, startups: list[StartupRecord]) -> bool:
        """True when no other round is needed."""
        return False

    def stop(self, reason: str, startups: list[StartupRecord], round_: int | None = None) -> None:
        """The open-ended rule records why it stopped; a fixed plan has nothing to record."""


def arm_spec(spec: ServerSpec, arm: Allocator, runner: str) -> ServerSpec:
    """The server's launch for one arm: LD_PRELOAD set to the arm's real library (local; a docker image
    sets its own) and the arm's environment (e.g. MALLOC_CONF)."""
    env = dict(spec.env)
    if runner == "local":
        env.pop("LD_PRELOAD", None)
        if arm.library:
            env["LD_PRELOAD"] = os.path.realpath(arm.library)
    env.update(arm.env)
    return ServerSpec(spec.argv, env, spec.served_model, spec.model_dir)


def role_of(pid: int, name: str, cmdline: str, tag: str, root: int | None) -> str:
    """What a process of the server tree is: from vLLM's `(Role pid=N)` log tag (`tag`; local runner
    only, where the log's PIDs are host PIDs), else from its process title or command line."""
    for prefix, role in (("APIServer", API_SERVER), ("EngineCore", ENGINE_CORE), ("Worker", WORKER)):
        if tag.startswith(prefix):
            return role
    title = f"{name} {cmdline}"
    if "VLLM::EngineCore" in title:
        return ENGINE_CORE
    if "VLLM::Worker" in title:
        return WORKER
    if "resource_tracker" in cmdline:
        return "resource_tracker"
    if "compile_worker" in cmdline:
        return "compile_worker"
    if name == "docker-init" or cmdline.startswith(("/sbin/docker-init", "/dev/init")):
        return "init"
    if pid == root or "vllm.entrypoints" in cmdline or " serve " in f" {cmdline} ":
        return API_SERVER
    return "other"


def malloc_libraries(maps_text: str, wanted: set[str]) -> list[str]:
    """The malloc libraries a process maps: known allocators by name, and the arm's own library by path."""
    found = {m.group(0) for m in MALLOC_LIB.finditer(maps_text)}
    found |= {path for path in wanted if path and f" {path}\n" in maps_text}
    return sorted(found)


def read_tree(pids: list[int], root: int | None, log_roles: dict[int, str], wanted: set[str]
              ) -> list[dict[str, Any]]:
    """pid, role and malloc libraries of each process that could be read."""
    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            name, cmdline = proc.name(), " ".join(proc.cmdline())
            maps = Path(f"/proc/{pid}/maps").read_text()
        except (psutil.Error, OSError):
            continue
        out.append({"pid": pid, "role": role_of(pid, name, cmdline, log_roles.get(pid, ""), root), "name": name,
                    "malloc": malloc_libraries(maps, wanted)})
    return out


def wanted_paths(arm: Allocator) -> set[str]:
    """The names under which the arm's library may show in the maps (the path given, the file it is)."""
    return {arm.library, os.path.realpath(arm.library)} if arm.library else set()


def judge(arm: Allocator, processes: list[dict[str, Any]], engine: str) -> dict[str, Any]:
    """{"verified", "reason", "processes"}: every serving process runs under the arm's allocator (and
    vLLM's API server and engine core are both there to be checked)."""
    wanted = wanted_paths(arm)
    serving = [p for p in processes if p["role"] in SERVING_ROLES]
    problems = []
    for p in serving:
        libs = set(p["malloc"])
        if arm.library is None:
            ok = not libs
            why = f"maps {', '.join(sorted(libs))}, not glibc malloc alone"
        else:
            ok = bool(libs & wanted) and not (libs - wanted)
            why = (f"maps {', '.join(sorted(libs - wanted))} beside {arm.library}" if libs & wanted
                   else f"does not map {arm.library}"
                   + (f" (maps {', '.join(sorted(libs))})" if libs else ""))
        p["verified"] = ok
        if not ok:
            problems.append(f"{p['role']} (pid {p['pid']}) {why}")
    needed = (API_SERVER, ENGINE_CORE) if engine == "vllm" else (API_SERVER,)
    missing = [r for r in needed if not any(p["role"] == r for p in serving)]
    if missing:
        problems.append(f"no {' or '.join(m.replace('_', ' ') for m in missing)} process found to check")
    reason = None
    if problems:
        reason = f"not a {arm.name} server: " + "; ".join(problems)
        if engine == "vllm" and arm.name != "tcmalloc" and any("tcmalloc" in lib for p in serving
                                                               for lib in p["malloc"]):
            reason += (" — vLLM's CPU platform preloads a tcmalloc bundled under vllm/libs into the processes "
                       "it starts unless LD_PRELOAD already names a libtcmalloc")
    return {"verified": not problems, "reason": reason, "processes": processes}


def check_server(arm: Allocator, pids: list[int], root: int | None, lines: list[tuple[float, str]],
                 engine: str, host_pids_in_log: bool) -> dict[str, Any]:
    """The allocator check of one ready server (see the module's docstring). `host_pids_in_log`: the
    log's `(Role pid=N)` tags name host PIDs (local runner; a container's are its own)."""
    log_roles = process_roles(lines) if host_pids_in_log else {}
    return judge(arm, read_tree(pids, root, log_roles, wanted_paths(arm)), engine)
