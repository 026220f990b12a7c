"""What the commands share on their command lines: option values and the default results directory."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path


def csv_list(value: str | None) -> list[str]:
    """"a, b,,c" -> ["a", "b", "c"]."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def default_out(prefix: str = "") -> str:
    """results/<prefix><timestamp>, created here: a second command started in the same second gets its own
    directory (<timestamp>-2, ...), never the first one's."""
    base = Path("results") / (prefix + dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    for n in itertools.count(1):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError:
            return str(base)  # ensure_writable says why it cannot be written
        return str(candidate)
    raise AssertionError("unreachable")
