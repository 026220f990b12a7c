"""SIGINT and SIGTERM handled alike, and clean-up that a further signal cannot cut short.

Ctrl-C raises KeyboardInterrupt; every command turns SIGTERM into the same exception, so the code that
cleans up after Ctrl-C (kill the probes, remove the containers, stop the server) runs for both. While
that clean-up runs, a second signal must not interrupt it (that left servers running): `Shielded`
swallows further signals and sets `hurry`, so the clean-up can stop waiting and kill at once.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType

from harness.errors import EXIT_INTERRUPTED, EXIT_OK, HarnessError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While active, SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code_of(command: Callable[[], int | None]) -> int:
    """Runs a command with SIGTERM handled as Ctrl-C, for a click command to exit with: the one place where
    an error becomes its line, `error: <message>`, and its exit code (HarnessError.exit_code). An interrupt
    that its own clean-up let through (a second Ctrl-C at an unlucky moment) still ends in one line and exit
    code 130, never a traceback; once the command is over, further signals are ignored until the exit."""
    with sigterm_as_interrupt():
        try:
            code = command() or EXIT_OK
        except HarnessError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            code = exc.exit_code
        except KeyboardInterrupt:
            print("error: interrupted (Ctrl-C / SIGTERM)", file=sys.stderr, flush=True)
            code = EXIT_INTERRUPTED
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:  # the command is over: a late signal must not turn its exit into a traceback
            signal.signal(sig, signal.SIG_IGN)
    return code


class Shielded:
    """`with Shielded(log, "killing the server now (SIGKILL)") as shield:` — inside, SIGINT and SIGTERM do
    not raise: the first one logs "<SIGNAL> received: <on_signal>" and sets `shield.hurry`; `signalled`
    keeps it, so the caller can act on it once the clean-up is done. Outside the main thread (where Python
    delivers no signals) it does nothing."""

    def __init__(self, log: Callable[[str], None] | None = None, on_signal: str = "") -> None:
        self.log = log or (lambda message: None)
        self.on_signal = on_signal
        self.hurry = threading.Event()
        self.signalled: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signalled is None:
            self.signalled = signum
            self.log(f"{signal.Signals(signum).name} received: {self.on_signal}" if self.on_signal else
                     f"{signal.Signals(signum).name} received: finishing the clean-up first")
        self.hurry.set()

    def __enter__(self) -> Shielded:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()
