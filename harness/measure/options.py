"""What the commands share on their command lines: option values and the default results directory."""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from harness.containers.runner_choice import DEFAULT_RUNNER, RUNNERS


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


F = TypeVar("F", bound=Callable[..., Any])


class Number(click.FloatRange):
    """A float within a range that is a number: NaN and the infinities are refused (click's FloatRange lets
    NaN through, and infinity where the range has no upper end)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


def option(*decls: str, **attrs: Any) -> Callable[..., Callable[[F], F]]:
    """A click option declared once for every command that has it: `NAME(**changes)` is its decorator, with
    `changes` for what one command says differently (its help, its default); `NAME("--other", "dest")` the
    same option under another name."""

    def decorator(*other_decls: str, **changes: Any) -> Callable[[F], F]:
        return click.option(*(other_decls or decls), **{**attrs, **changes})

    return decorator


def defaults_of(command: click.Command) -> dict[str, Any]:
    """What a command's options give when none is on the command line: another command (bench) composes
    its configuration from them, so that each default is written once, in the option."""
    params = command.make_context(command.name or "", []).params
    return {p.name: params[p.name] for p in command.params if p.name in params and not getattr(p, "hidden", False)}


RUNNER_HELP = ("local: a fresh process here; docker: a fresh container; auto: docker when the engine answers and "
               "the images are there or can be built, else local (it says which and why).")
runner = option("--runner", type=click.Choice(RUNNERS), default=DEFAULT_RUNNER, show_default=True, help=RUNNER_HELP)
allocator_lib = option("--allocator-lib", multiple=True, metavar="NAME=PATH", help="Library to preload for NAME.")
allocator_env = option("--allocator-env", multiple=True, metavar="NAME:VAR=VALUE",
                       help="Environment for one allocator, e.g. jemalloc:MALLOC_CONF=background_thread:true.")
target_ci = option("--target-ci", default=None, type=Number(0, 100, min_open=True), metavar="PCT",
                   help="Add rounds until the ratio CI of every allocator against the baseline, on --metric, is "
                        "±PCT % wide or narrower (its width alone, checked once a round from the last fixed "
                        "round on), or --max-time is up.")
max_time = option("--max-time", default=None, metavar="DURATION",
                  help="Start nothing that would likely end after this much time (90s, 2m, 1h30m); what is in "
                       "flight is never cut. Without --target-ci: rounds until then.")
out = option("--out", default=None, help="Results directory [default: results/<timestamp>].")


def allocators(default: str | None, help: str) -> Callable[[F], F]:
    return click.option("--allocators", default=default, show_default=default is not None, metavar="NAMES",
                        help=help)


def max_rounds(f: F) -> F:
    """--max-rounds, and --max-runs (harness alloc's former name) as a hidden alias that says so."""

    @functools.wraps(f)
    def merged(*args: Any, max_runs: int | None = None, **kw: Any) -> Any:
        if max_runs is not None:
            click.echo("warning: --max-runs is deprecated: use --max-rounds", err=True)
            if kw.get("max_rounds") is None:
                kw["max_rounds"] = max_runs
        return f(*args, **kw)

    merged = click.option("--max-runs", "max_runs", default=None, type=click.IntRange(1), hidden=True)(merged)
    return click.option("--max-rounds", default=None, type=click.IntRange(1),
                        help="With --target-ci or --max-time: at most this many rounds.")(merged)  # type: ignore[return-value]
