"""One server's start-up, analysed from its stamped log and its stack samples: the fields of its
start-up record (phases, unaccounted time, the server's own figures, compile-cache use, silent
stretches named from stacks). Used live by `run` and again by `harness report`, so a better parser
re-reads old runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from harness.measure.records import StartupRecord
from harness.serve import phases, stacks


def stacks_file(server: int) -> str:
    return f"serve/startup-stacks-{server}.jsonl"


def analyse(lines: list[tuple[float, str]], ready_s: float | None, stack_samples: list[dict[str, Any]],
            stacks_reason: str | None) -> dict[str, Any]:
    """Start-up fields for the record. `stacks_reason`: why no stacks were sampled (None: sampled, or
    not asked for when there are no samples either)."""
    ph, unaccounted = phases.phases(lines, ready_s)
    silent = phases.silences(lines, ready_s, ph)
    roles = phases.process_roles(lines)
    named = stacks.name_silences(silent, stack_samples, roles)
    return {
        "phases": [p.to_dict() for p in ph],
        "unaccounted_s": unaccounted,
        "server_figures": phases.facts(lines),
        "compile_cache_use": phases.compile_cache_use(lines),
        "silences": [{"start_s": n.silence.start_s, "end_s": n.silence.end_s, "phase": n.silence.phase,
                      "stack_samples": n.n_samples, "top": [[what, share] for what, share in n.top]}
                     for n in named],
        "stacks_reason": stacks_reason,
        "import_shares": {role: {"importing": imp, "compiling_bytecode": comp, "samples": n}
                          for role, (imp, comp, n) in stacks.import_shares(stack_samples, roles).items()},
    }


def reanalyse(results_root: Path, record: StartupRecord) -> StartupRecord:
    """The record with its analysis redone from its log and stacks files on disk (unchanged when the
    log is gone)."""
    log = results_root / record.log_path
    if not log.exists():
        return record
    lines = phases.lines_from_stamped_log(log.read_text(errors="replace"))
    ready = record.spawn_to_health_s or (lines[-1][0] if lines else None)
    samples = stacks.load(results_root / stacks_file(record.server))
    fields = analyse(lines, ready, samples, record.stacks_reason)
    cache = dict(record.compile_cache or {})
    cache["use"] = fields.pop("compile_cache_use")
    return dataclasses.replace(record, **fields, compile_cache=cache)
