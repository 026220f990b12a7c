"""Whether the values read for a record's fields have the types its model declares (JSON's kinds: a float
field takes an integer too), so that a hand-edited or corrupted file is named, not met as a TypeError deep
in a report."""

from __future__ import annotations

import functools
import types
import typing
from typing import Any


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation this module cannot resolve: not checked
        return {}


def fits(value: Any, hint: Any) -> bool:
    """Whether a value read from JSON fits the type `hint` (only the outer type of a container is checked)."""
    origin = typing.get_origin(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    outer = origin or hint
    if outer is tuple:
        return isinstance(value, list | tuple)
    return isinstance(value, outer) if isinstance(outer, type) else True


def first_mismatch(cls: type, values: dict[str, Any]) -> str | None:
    """'field ttft_s: "fast" (str) where float | None is expected', for the first value that does not fit."""
    hints = _hints(cls)
    for name, value in values.items():
        if name in hints and not fits(value, hints[name]):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:39] + "…"
            expected = str(hints[name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
            return f"field {name}: {shown} ({type(value).__name__}) where {expected} is expected"
    return None
