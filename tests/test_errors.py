"""One error model and one source for options: every exception of the harness carries its exit code and
ends a command in one line, printed in one place; the options both experiments have are declared once."""

from __future__ import annotations

import ast
import importlib
import os
import signal
from pathlib import Path

import pytest
from conftest import REPO, SEQUENTIAL, run_harness

from harness.errors import EXIT_FAULT, EXIT_INTERRUPTED, EXIT_USAGE, HarnessError, Interrupted, UsageError
from harness.measure.options import defaults_of
from harness.measure.signals import exit_code_of


def _exception_classes() -> list[tuple[str, str]]:
    """(module, class) of every class named *Error in the driver (the probe imports nothing of it)."""
    found = []
    for path in sorted((REPO / "harness").rglob("*.py")):
        if "probe" in path.relative_to(REPO / "harness").parts:
            continue
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                found.append((module, node.name))
    return found


def test_every_exception_of_the_driver_is_a_harness_error() -> None:
    classes = _exception_classes()
    assert len(classes) >= 15
    for module, name in classes:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, HarnessError), f"{module}.{name}"
        assert cls.exit_code in (EXIT_FAULT, EXIT_USAGE), f"{module}.{name}"
    from harness.measure.allocators import AllocatorError
    from harness.measure.records import RecordError
    from harness.measure.results import ResultsError
    from harness.serve.client import RequestError
    from harness.serve.config import ConfigError
    from harness.serve.server import ServerDiedError

    assert {c.exit_code for c in (AllocatorError, ResultsError, ConfigError, RecordError)} == {EXIT_USAGE}
    assert {c.exit_code for c in (RequestError, ServerDiedError)} == {EXIT_FAULT}


@pytest.mark.parametrize(("error", "code"), [(UsageError("bad option"), EXIT_USAGE),
                                             (HarnessError("the run failed"), EXIT_FAULT),
                                             (Interrupted("interrupted: runs kept"), EXIT_INTERRUPTED)])
def test_exit_code_of_turns_an_error_into_one_line(error: HarnessError, code: int, capsys) -> None:
    def command() -> int:
        raise error

    assert exit_code_of(command) == code
    assert capsys.readouterr().err == f"error: {error}\n"
    for sig in (signal.SIGINT, signal.SIGTERM):  # exit_code_of ignores late signals once the command is over
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


def test_bench_composes_the_two_commands_defaults() -> None:
    from harness.alloc.command import alloc_command
    from harness.cli import bench_command
    from harness.serve.command import serve
    from harness.serve.config import ServeConfig

    alloc, served, bench = (defaults_of(c) for c in (alloc_command, serve, bench_command))
    assert alloc["runner"] == served["runner"] == bench["runner"] == "auto"
    assert alloc["allocators"] == bench["allocators"]
    for name in ("cold_starts", "warm_requests", "port", "engine", "model", "max_tokens", "health_timeout_s"):
        assert served[name] == getattr(ServeConfig, name), name  # serve's defaults are ServeConfig's
    for name in ("cold_starts", "warm_requests", "port", "engine"):
        assert bench[name] == served[name], name
    assert "max_runs" not in alloc and "max_runs" not in served  # the hidden alias is no setting of its own


def test_serve_default_out_is_a_new_timestamped_directory(tmp_path: Path, monkeypatch) -> None:
    """Two default `serve` runs started in the same second get a directory each, as alloc's do."""
    from harness.serve.command import config_from_options, serve

    monkeypatch.chdir(tmp_path)
    first, second = (config_from_options(**defaults_of(serve)) for _ in range(2))
    assert first.out != second.out
    assert Path(first.out).parent == Path("results") and Path(second.out).name.startswith(Path(first.out).name)
    assert (tmp_path / first.out).is_dir() and (tmp_path / second.out).is_dir()


def test_max_runs_is_a_hidden_alias_of_max_rounds(tmp_path: Path) -> None:
    out = tmp_path / "r"
    help_text = run_harness("alloc", "--help", timeout=120).stdout
    assert "--max-rounds" in help_text and "--max-runs" not in help_text
    done = run_harness(*SEQUENTIAL, "--runner", "local", "--max-runs", "3", "--out", str(out), timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == EXIT_USAGE and "Traceback" not in done.stderr, done.stderr
    assert "--max-runs is deprecated: use --max-rounds" in lines[0]
    assert lines[-1] == "error: --max-rounds caps an open-ended experiment: give --target-ci or --max-time with it"
    assert not (out / "alloc").exists()


def test_serve_and_alloc_refuse_docker_for_what_only_the_local_runner_does(tmp_path: Path) -> None:
    """--runner auto and --runner docker are decided by one rule: a custom allocator name, a server other
    than vLLM, run locally (auto) or are refused in one line (docker)."""
    done = run_harness("serve", "--runner", "docker", "--server-cmd", "python3 x.py {port}",
                       "--out", str(tmp_path / "s"), timeout=120)
    assert done.returncode == EXIT_USAGE and done.stderr.splitlines() == [
        "error: --runner docker: the docker runner serves --engine vllm only, not custom"], done.stderr
    done = run_harness(*SEQUENTIAL, "--runner", "docker", "--allocators", "glibc,jebg",
                       "--allocator-lib", f"jebg={os.devnull}", "--out", str(tmp_path / "a"), timeout=120)
    assert done.returncode == EXIT_USAGE and done.stderr.strip().splitlines()[-1] == (
        "error: --runner docker: no probe image has jebg"), done.stderr


@pytest.mark.fast
def test_runner_auto_says_in_words_why_there_is_no_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No socket, a socket nobody listens on, a TCP port that refuses: words, not the SDK's nested reprs."""
    import socket

    from harness.containers.engine import docker_available
    from harness.serve.config import ServeConfig
    from harness.serve.run import choose_runner
    from harness.serve.server import free_port

    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(dead))  # a socket file, never listened on: connections are refused
    port = free_port()
    fix = "; start one with scripts/setup-docker.sh"
    for host, why in ((f"unix://{tmp_path}/none.sock", f"no Docker daemon at {tmp_path}/none.sock"),
                      (f"unix://{dead}", f"no Docker daemon answers at {dead} (connection refused)"),
                      (f"tcp://127.0.0.1:{port}", f"no Docker daemon answers at tcp://127.0.0.1:{port} "
                                                  "(connection refused)")):
        monkeypatch.setenv("DOCKER_HOST", host)
        assert docker_available() == (False, why + fix)
        assert choose_runner(ServeConfig()).line() == f"runner auto: local ({why}{fix})"


@pytest.mark.fast
@pytest.mark.parametrize("args, message", [
    (["--sample-hz", "nan"], "Invalid value for '--sample-hz': 'nan' is not a finite number"),
    (["--stack-hz", "nan"], "Invalid value for '--stack-hz': 'nan' is not a finite number"),
    (["--health-timeout", "inf"], "Invalid value for '--health-timeout': 'inf' is not a finite number"),
    (["--request-timeout", "nan"], "Invalid value for '--request-timeout': 'nan' is not a finite number"),
    (["--request-timeout", "-1"], "Invalid value for '--request-timeout': -1.0 is not in the range x>0."),
    (["--kv-cache-gib", "nan"], "Invalid value for '--kv-cache-gib': 'nan' is not a finite number"),
    (["--gpu-memory-utilization", "1.5"], "Invalid value for '--gpu-memory-utilization': 1.5 is not in the range"),
    (["--max-model-len", "0"], "Invalid value for '--max-model-len': 0 is not in the range x>=1."),
    (["--cold-starts", "0"], "Invalid value for '--cold-starts': 0 is not in the range x>=1."),
    (["--idle-gaps", "0,nan"], "--idle-gaps must be finite seconds, got '0,nan'"),
    (["--idle-gaps", "inf"], "--idle-gaps must be finite seconds, got 'inf'"),
    (["--allocators", "glibc,jemalloc", "--target-ci", "nan"], "Invalid value for '--target-ci': 'nan' is not a"),
    (["--allocators", "glibc,jemalloc", "--max-time", "inf"], "--max-time: not a duration: 'inf'"),
    (["--max-tokens", "2048"], "--max-tokens 2048 leaves no room for the prompt within --max-model-len 2048"),
    (["--max-tokens", "600", "--max-model-len", "512"], "--max-tokens 600 leaves no room for the prompt"),
])
def test_serve_refuses_numbers_out_of_their_meaning_in_one_line(args: list[str], message: str,
                                                                tmp_path: Path) -> None:
    """NaN, infinities and out-of-range values: one line and exit 2, before anything starts or is written."""
    from click.testing import CliRunner

    from harness.cli import main

    out = tmp_path / "r"
    # nothing could start even if a value were let through: no vLLM there, no Docker
    nothing = ["--runner", "local", "--vllm-python", str(tmp_path / "no-vllm/python")]
    result = CliRunner().invoke(main, ["serve", *nothing, *args, "--out", str(out)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == EXIT_USAGE and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.fast
def test_a_config_built_in_code_is_checked_alike() -> None:
    from harness.serve.config import ConfigError, ServeConfig

    for bad in (dict(sample_hz=float("nan")), dict(health_timeout_s=float("inf")), dict(idle_gaps=(float("inf"),)),
                dict(max_tokens=4096), dict(gpu_memory_utilization=2.0), dict(kv_cache_gib=float("inf"))):
        with pytest.raises(ConfigError):
            ServeConfig(**bad).validate()
    ServeConfig(engine="custom", server_cmd="x {port}", max_tokens=4096).validate()  # no --max-model-len there


@pytest.mark.fast
def test_every_float_option_of_every_command_refuses_nan_and_infinities():
    """click's FloatRange lets NaN through every bound: each float option must be options.Number."""
    import click
    from click.testing import CliRunner

    from harness.cli import main
    from harness.measure.options import Number

    loose = [f"{name} {p.opts[0]}" for name, command in main.commands.items() for p in command.params
             if isinstance(p.type, click.FloatRange) and not isinstance(p.type, Number)]
    assert not loose, f"float options that accept NaN: {loose}"
    for args in (["--measure-s", "nan"], ["--timeout", "inf"]):
        result = CliRunner().invoke(main, ["alloc", *args, "--out", "/nonexistent/never-written"])
        assert result.exit_code == 2 and "is not a finite number" in result.output, result.output
