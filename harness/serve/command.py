"""`harness serve`: the click command. Register it with `main.add_command(serve)`."""

from __future__ import annotations

import sys
from typing import Any

import click

from harness.containers.runner_choice import DEFAULT_RUNNER, RUNNERS
from harness.measure.signals import exit_code_of
from harness.measure.stopping import parse_duration
from harness.serve.config import (
    DEFAULT_STOP_METRIC,
    REQUEST_MODES,
    STOP_METRICS,
    ConfigError,
    ServeConfig,
    default_vllm_python,
    parse_gaps,
)
from harness.serve.run import run_serve


def config_from_options(**kw: Any) -> ServeConfig:
    """Click options -> ServeConfig (raises ConfigError on bad --idle-gaps)."""
    kw["idle_gaps"] = parse_gaps(kw.pop("idle_gaps"))
    kw["extra_args"] = tuple(kw.pop("server_arg") or ())
    kw["sampler"] = kw.pop("sampler")
    kw["allocators"] = tuple(a.strip() for a in (kw.pop("allocators") or "").split(",") if a.strip())
    kw["allocator_lib"] = tuple(kw.pop("allocator_lib") or ())
    kw["allocator_env"] = tuple(kw.pop("allocator_env") or ())
    target = kw.pop("target_ci")
    kw["target_ci"] = target / 100 if target is not None else None
    max_time = kw.pop("max_time")
    try:
        kw["max_time_s"] = parse_duration(max_time) if max_time is not None else None
    except ValueError as exc:
        raise ConfigError(f"--max-time: {exc}") from None
    return ServeConfig(**kw)


@click.command("serve")
@click.option("--engine", type=click.Choice(["vllm", "transformers", "custom"]), default="vllm",
              show_default=True)
@click.option("--runner", type=click.Choice(RUNNERS), default=DEFAULT_RUNNER, show_default=True,
              help="local: a process group here; docker: a container of harness-vllm:cpu (CPU) or "
                   "vllm/vllm-openai (NVIDIA), vLLM only; auto: docker when the engine answers and the image "
                   "is there or can be built, else local (it says which and why).")
@click.option("--model", default="synthetic:tiny", show_default=True,
              help="synthetic:tiny | synthetic:phi3-mini | hub id (offline cache) | local directory.")
@click.option("--url", default=None,
              help="Attach to a running OpenAI-compatible server (no start-up figures).")
@click.option("--server-cmd", default=None,
              help="Any OpenAI-compatible server ({host} {port} {model} {model_dir} are filled in); "
                   "implies --engine custom.")
@click.option("--cold-starts", default=1, show_default=True, type=click.IntRange(1),
              help="Fresh servers (with --allocators: rounds, one server per allocator each).")
@click.option("--warm-requests", default=5, show_default=True, type=click.IntRange(0),
              help="Requests right after the cold one, per server.")
@click.option("--idle-gaps", default=None,
              help="e.g. 0,1,10: one more request after idling that many seconds.")
@click.option("--max-tokens", default=16, show_default=True, type=click.IntRange(1))
@click.option("--prompt", default=ServeConfig.prompt, show_default=False)
@click.option("--request-mode", type=click.Choice(REQUEST_MODES), default="stream", show_default=True,
              help="stream: SSE with TTFT/TPOT; plain: one JSON body as the seed's curl (wall time only).")
@click.option("--sample-hz", default=20.0, show_default=True, type=click.FloatRange(0.1, 1000))
@click.option("--sampler/--no-sampler", default=True, show_default=True, help="Memory timeline sampling.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--health-timeout", "health_timeout_s", default=600.0, show_default=True, type=float,
              help="Seconds to wait for /health 200 and /v1/models.")
@click.option("--request-timeout", "request_timeout_s", default=300.0, show_default=True, type=float)
@click.option("--dtype", default=None, help="Passed to the server (--dtype).")
@click.option("--max-model-len", default=2048, show_default=True, type=int, help="vLLM --max-model-len.")
@click.option("--gpu-memory-utilization", default=None, type=float, help="vLLM --gpu-memory-utilization.")
@click.option("--served-model-name", default=None,
              help="Model name the server answers to [default: --model].")
@click.option("--vllm-python", default=None,
              help=f"Python of the vLLM environment [default: {default_vllm_python()}].")
@click.option("--transformers-cmd", default="transformers", show_default=True,
              help="Command that provides `transformers serve` (needs transformers[serving]).")
@click.option("--kv-cache-gib", default=1.0, show_default=True, type=float,
              help="VLLM_CPU_KVCACHE_SPACE on CPU.")
@click.option("--device", default="auto", show_default=True, help="transformers serve --device.")
@click.option("--server-arg", multiple=True, help="Extra argument for the server command (repeatable).")
@click.option("--compile-cache", type=click.Choice(["fresh", "shared"]), default="fresh", show_default=True,
              help="vLLM torch.compile cache: fresh per cold start (a new node) or ~/.cache/vllm (restart).")
@click.option("--server-preload", default=None, metavar="LIB",
              help="LD_PRELOAD for the server (e.g. /usr/lib/x86_64-linux-gnu/libjemalloc.so.2); "
                   "verified in /proc/<pid>/maps and reported.")
@click.option("--allocators", default=None, metavar="NAMES",
              help="Compare allocators, e.g. glibc,jemalloc[,tcmalloc,mimalloc]: every round (--cold-starts "
                   "rounds) starts one fresh server per allocator, order rotated each round, each server's "
                   "allocator verified in its API server and engine core (/proc/PID/maps); ratios vs glibc.")
@click.option("--allocator-lib", multiple=True, metavar="NAME=PATH", help="Library to preload for NAME.")
@click.option("--allocator-env", multiple=True, metavar="NAME:VAR=VALUE",
              help="Environment for one allocator's servers, e.g. jemalloc:MALLOC_CONF=background_thread:true.")
@click.option("--target-ci", default=None, type=click.FloatRange(0, min_open=True), metavar="PCT",
              help="With --allocators: add rounds until the ratio CI of every allocator against the baseline, on "
                   "--metric, is ±PCT % wide or narrower (checked once a round from round --cold-starts on), "
                   "or --max-time is up: harness alloc's rule.")
@click.option("--max-time", default=None, metavar="DURATION",
              help="With --allocators: start no server that would likely end after this much time (90s, 2m, "
                   "1h30m); a server in flight is never cut. Without --target-ci: rounds until then.")
@click.option("--max-rounds", default=None, type=click.IntRange(1),
              help="With --target-ci or --max-time: at most this many rounds.")
@click.option("--metric", default=DEFAULT_STOP_METRIC, show_default=True, type=click.Choice(list(STOP_METRICS)),
              help="The per-server figure --target-ci applies to.")
@click.option("--profile-startup", is_flag=True,
              help="Sample the server's Python stacks (py-spy dump) from spawn to /health and name what it "
                   "does in each silent stretch of its log (needs root or ptrace_scope 0).")
@click.option("--stack-hz", default=2.0, show_default=True, type=click.FloatRange(0.1, 20),
              help="Stack samples per second per server process with --profile-startup.")
@click.option("--model-cache", default=None, help="Where synthetic model directories are generated.")
@click.option("--out", default="results/serve", show_default=True, help="Results directory (DIR/serve/...).")
def serve(**kw: Any) -> None:
    """First-token path: fresh servers, cold then warm requests, start-up phases, memory timeline."""
    if kw.get("server_cmd"):
        kw["engine"] = "custom"
    if kw.get("vllm_python") is None:
        kw.pop("vllm_python")
    sys.exit(exit_code_of(lambda: run_outcome(config_from_options(**kw))))


def run_outcome(config: ServeConfig) -> None:
    """Runs serve; raises the error it ended with (exit_code_of prints its line)."""
    failure = run_serve(config).failure()
    if failure is not None:
        raise failure


if __name__ == "__main__":
    serve()
