"""The one data model: a results directory and every artifact written into it.

Samples are appended as JSON lines and flushed to disk as they arrive, so an interrupted command
loses nothing. Tables (CSV), reports (Markdown) and metadata (JSON) are all written here.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any


class ResultsError(RuntimeError):
    """A results directory that cannot be written or resumed."""


def _clean(value: Any) -> Any:
    """JSON has no NaN: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class ResultsDir:
    """`DIR/` with one sub-directory per experiment (`alloc/`, `serve/`)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def ensure_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ResultsError(f"output directory {str(self.root)!r} cannot be written: {exc.strerror}") from exc

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    # --- JSON lines -------------------------------------------------------------------------
    @staticmethod
    def dumps(record: dict[str, Any]) -> str:
        """One record as one JSON line (NaN written as null)."""
        return json.dumps(_clean(record), sort_keys=False)

    def append(self, relpath: str, record: dict[str, Any]) -> None:
        p = self.path(relpath)
        with open(p, "a") as fh:
            fh.write(self.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_jsonl(self, relpath: str) -> list[dict[str, Any]]:
        p = self.root / relpath
        if not p.exists():
            return []
        rows = []
        with open(p) as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill: the runs before it still count
        return rows

    # --- whole files ------------------------------------------------------------------------
    def write_json(self, relpath: str, data: Any) -> Path:
        p = self.path(relpath)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(_clean(data), indent=2, sort_keys=False) + "\n")
        tmp.replace(p)
        return p

    def read_json(self, relpath: str) -> Any:
        p = self.root / relpath
        return json.loads(p.read_text()) if p.exists() else None

    def environments(self) -> list[dict[str, Any]]:
        """environment.json and every environment.resume-N.json: one per invocation that ran."""
        return [json.loads(p.read_text()) for p in sorted(self.root.glob("environment*.json"))]

    def write_text(self, relpath: str, text: str) -> Path:
        p = self.path(relpath)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(p)
        return p

    def write_csv(self, relpath: str, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> Path:
        p = self.path(relpath)
        tmp = p.with_suffix(p.suffix + ".tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _format_cell(row.get(k)) for k in columns})
        tmp.replace(p)
        return p


def _format_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        return f"{value:.6g}"
    return value


def read_csv(path: str | os.PathLike) -> Iterator[dict[str, str]]:
    with open(path, newline="") as fh:
        yield from csv.DictReader(fh)
