"""The harness's errors: each carries the exit code it ends the command with, and is turned into one line
(`error: <message>`) in one place, the command line's entry point."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAULT = 1  # the run itself failed: a fault of the host, the engine, a server, a probe
EXIT_USAGE = 2  # the command was asked for something that cannot work: fix the command line
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM (128 + SIGINT, as shells report it)


class HarnessError(Exception):
    """Base of every error the harness reports: one line, exit code `exit_code`."""

    exit_code = EXIT_FAULT


class UsageError(HarnessError):
    exit_code = EXIT_USAGE


class RunnerError(HarnessError, RuntimeError):
    """A runner (local or docker, of probes or servers) cannot go on: no daemon, daemon gone, image missing."""


class Interrupted(HarnessError):
    """Ctrl-C or SIGTERM ended the command after its clean-up; the message says what was kept."""

    exit_code = EXIT_INTERRUPTED
