"""A results directory and every artifact written into it (the records' model: harness.measure.records).

Samples are appended as JSON lines and flushed to disk as they arrive, so an interrupted command
loses nothing. Tables (CSV), reports (Markdown) and metadata (JSON) are all written here.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from harness.errors import HarnessError, UsageError
from harness.measure.records import Environment, FieldTypeError, Record, RecordError

LOCK_FILE = ".lock"


class ResultsError(UsageError):
    """A results directory that cannot be written or resumed."""


class ResultsWriteError(HarnessError):
    """A write into the results directory failed while the command ran (a full disk, a file made read-only):
    the command ends with this line and exit code 1; what it measured is kept (the line says where)."""


MIN_FREE_BYTES = 4 * 2**20  # reports, plots and records of a run: less free space than this is refused


def _replace_atomically(path: Path, write: Any) -> Path:
    """`write(tmp)` then rename onto `path`: a full disk leaves the old file (or none), never half of one.
    ResultsWriteError, the temporary file removed, when the write fails."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ResultsWriteError(f"cannot write {path}: {exc.strerror or exc}; the records written so far are "
                                "kept (free some space or make it writable, then `harness report` on the "
                                "results directory writes the reports again)") from None
    return path


def save_figure(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """A matplotlib figure saved whole or not at all (no partial PNG on a full disk)."""
    path = Path(path)
    return _replace_atomically(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs))


# Results directories this process holds: resolved path -> [fd of DIR/.lock, how many holders].
_held: dict[Path, list[int]] = {}

R = TypeVar("R", bound=Record)


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
        self._skipped: dict[str, list[int]] = {}  # relpath -> numbers of the lines read_jsonl skipped

    def ensure_writable(self) -> None:
        """Before anything starts: the directory can be written, has room for a run's files, and every
        records file already there (--resume) can be appended to. ResultsError (one line) otherwise."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_text("ok")
            probe.unlink()
            for held in sorted(self.root.glob("*/*.jsonl")):
                open(held, "a").close()  # appends nothing: fails on a read-only or immutable file
        except OSError as exc:
            where = exc.filename or self.root
            raise ResultsError(f"output directory {str(self.root)!r} cannot be written ({where}: "
                               f"{exc.strerror}): make it writable or choose another --out") from exc
        self._check_free(self.root)

    def check_room(self) -> None:
        """ensure_writable's checks where they can be made without creating the directory: its nearest existing
        parent is writable and has room (before a command builds anything it would have to clean up)."""
        existing = self.root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not os.access(existing, os.W_OK):
            raise ResultsError(f"output directory {str(self.root)!r} cannot be written ({existing}: permission "
                               "denied): make it writable or choose another --out")
        self._check_free(existing)

    def _check_free(self, where: Path) -> None:
        free = os.statvfs(where).f_bavail * os.statvfs(where).f_frsize
        if free < MIN_FREE_BYTES:
            raise ResultsError(f"output directory {str(self.root)!r} has only {free / 2**20:.1f} MiB free (a run "
                               f"needs at least {MIN_FREE_BYTES / 2**20:.0f} MiB for its records, reports and "
                               "plots): free some space or choose another --out")

    def lock(self) -> None:
        """Holds DIR/.lock (flock) until unlock() or this process ends: a second command writing the same
        directory would count runs twice, so it is refused with the holder's PID. Nested calls in one
        process (`bench` runs alloc, then serve) share the hold."""
        self.ensure_writable()
        key = self.root.resolve()
        if key in _held:
            _held[key][1] += 1
            return
        fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ResultsError(f"{self.root} is in use by another harness command (PID {holder}): wait for it "
                               "to end or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[key] = [fd, 1]

    def unlock(self) -> None:
        key = self.root.resolve()
        hold = _held.get(key)
        if hold is None:
            return
        hold[1] -= 1
        if hold[1] == 0:
            del _held[key]
            os.close(hold[0])  # closing the descriptor releases the flock

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
        """One record on a line of its own, on disk before this returns. A line cut short by a crash
        stays as it is (read_jsonl skips and reports it); the record goes on the next line."""
        p = self.path(relpath)
        line = self.dumps(record) + "\n"
        size = p.stat().st_size if p.exists() else 0
        try:
            with open(p, "a") as fh:
                try:
                    fh.write(("\n" if _ends_without_newline(p) else "") + line)
                    fh.flush()
                    os.fsync(fh.fileno())
                except OSError:
                    with contextlib.suppress(OSError):
                        os.truncate(p, size)  # no half of the record stays behind (a full disk)
                    raise
        except OSError as exc:
            kept = _keep_elsewhere(p, line)
            raise ResultsWriteError(f"cannot append to {p}: {exc.strerror or exc}; the record just measured is "
                                    + (f"kept in {kept}" if kept else f"not on disk anywhere: {line.strip()[:2000]}")
                                    + "; the records before it are kept") from None

    def read_jsonl(self, relpath: str) -> list[dict[str, Any]]:
        """The records of a JSON-lines file; lines that are not a whole record (cut short by a kill) are
        skipped, and their numbers kept for skipped_note()."""
        return [data for _, data in self._numbered_jsonl(relpath)]

    def _numbered_jsonl(self, relpath: str) -> list[tuple[int, Any]]:
        """(line number, parsed JSON) of every whole line; the numbers of the others kept for skipped_note()."""
        p = self.root / relpath
        self._skipped[relpath] = []
        if not p.exists():
            return []
        rows = []
        with open(p) as fh:
            for number, line in enumerate(fh, start=1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError:
                    self._skipped[relpath].append(number)
        return rows

    def append_record(self, relpath: str, record: Record) -> None:
        """One typed record, dumped through its model (`to_dict`), appended as `append` does."""
        self.append(relpath, record.to_dict())

    def read_records(self, relpath: str, cls: type[R]) -> list[R]:
        """The records of a JSON-lines file, each loaded through `cls` (older shapes included). A line that
        is not a whole JSON record, or not a record of `cls`'s family, is skipped and reported as
        read_jsonl's are."""
        records = []
        for number, data in self._numbered_jsonl(relpath):
            try:
                records.append(cls.load(data))
            except FieldTypeError as exc:  # a record of the family, but not readable: say where, stop
                raise FieldTypeError(f"{self.root / relpath} line {number}: {exc}") from None
            except RecordError:
                self._skipped[relpath].append(number)
        self._skipped[relpath].sort()
        return records

    def rewrite_records(self, relpath: str, records: Iterable[Record]) -> Path:
        """Replaces a JSON-lines file with `records` (an analysis redone from disk), all at once."""
        return self.write_text(relpath, "".join(self.dumps(r.to_dict()) + "\n" for r in records))

    def skipped_lines(self, relpath: str) -> list[int]:
        """Numbers of the lines the last read_jsonl(relpath) skipped."""
        return list(self._skipped.get(relpath, []))

    def skipped_note(self, relpath: str) -> str | None:
        """One line for the user about the lines read_jsonl skipped, or None."""
        numbers = self.skipped_lines(relpath)
        if not numbers:
            return None
        which = f"line {numbers[0]}" if len(numbers) == 1 else f"lines {', '.join(map(str, numbers))}"
        return (f"{self.root / relpath} {which}: not a whole JSON record (cut short by a crash?), skipped; "
                "the file keeps it")

    # --- whole files ------------------------------------------------------------------------
    def write_json(self, relpath: str, data: Any) -> Path:
        text = json.dumps(_clean(data), indent=2, sort_keys=False) + "\n"
        return _replace_atomically(self.path(relpath), lambda tmp: tmp.write_text(text))

    def write_record(self, relpath: str, record: Record) -> Path:
        """A whole-file record (an environment, a timeline's metadata), dumped through its model."""
        return self.write_json(relpath, record.to_dict())

    def read_json(self, relpath: str) -> Any:
        p = self.root / relpath
        return json.loads(p.read_text()) if p.exists() else None

    def read_environments(self) -> dict[str, Environment]:
        """File name → Environment of environment.json and every environment.resume-N.json: one per
        invocation that ran."""
        return {p.name: Environment.load(json.loads(p.read_text()))
                for p in sorted(self.root.glob("environment*.json"))}

    def read_environment(self, relpath: str) -> Environment | None:
        data = self.read_json(relpath)
        return None if data is None else Environment.load(data)

    def write_text(self, relpath: str, text: str) -> Path:
        return _replace_atomically(self.path(relpath), lambda tmp: tmp.write_text(text))

    def write_csv(self, relpath: str, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> Path:
        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
                writer.writeheader()
                for row in rows:
                    writer.writerow({k: _format_cell(row.get(k)) for k in columns})

        return _replace_atomically(self.path(relpath), write)


def _keep_elsewhere(path: Path, line: str) -> Path | None:
    """A record that could not be appended to `path`, written instead to `path`.unsaved next to it, else to
    the temporary directory: where it now is, or None where nothing could be written."""
    for fallback in (path.with_name(path.name + ".unsaved"),
                     Path(tempfile.gettempdir()) / f"harness-unsaved-{os.getpid()}-{path.name}"):
        try:
            with open(fallback, "a") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            return fallback
        except OSError:
            continue
    return None


def _ends_without_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        if fh.seek(0, os.SEEK_END) == 0:
            return False
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"


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
