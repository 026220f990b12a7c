"""`harness serve`: the click command. Register it with `main.add_command(serve)`."""

from __future__ import annotations

import sys
from typing import Any

import click

from harness.measure import options
from harness.measure.options import Number, csv_list, default_out
from harness.measure.signals import exit_code_of
from harness.measure.stopping import parse_duration
from harness.serve.config import (
    DESIGNS,
    ENGINES,
    REQUEST_MODES,
    STOP_METRICS,
    ConfigError,
    ServeConfig,
    default_vllm_python,
    parse_gaps,
)
from harness.serve.run import run_serve


def config_from_options(**kw: Any) -> ServeConfig:
    """Click options -> ServeConfig (raises ConfigError on bad --idle-gaps or --max-time). Without --out, a
    new results/<timestamp> directory, as for harness alloc."""
    if kw.get("server_cmd"):
        kw["engine"] = "custom"
    if kw.get("vllm_python") is None:
        kw.pop("vllm_python", None)
    kw["idle_gaps"] = parse_gaps(kw.pop("idle_gaps"))
    kw["extra_args"] = tuple(kw.pop("server_arg") or ())
    kw["allocators"] = tuple(csv_list(kw.pop("allocators")))
    kw["allocator_lib"] = tuple(kw.pop("allocator_lib") or ())
    kw["allocator_env"] = tuple(kw.pop("allocator_env") or ())
    target = kw.pop("target_ci")
    kw["target_ci"] = target / 100 if target is not None else None
    max_time = kw.pop("max_time")
    try:
        kw["max_time_s"] = parse_duration(max_time) if max_time is not None else None
    except ValueError as exc:
        raise ConfigError(f"--max-time: {exc}") from None
    kw["out"] = kw.get("out") or default_out()
    return ServeConfig(**kw)


# Every default is ServeConfig's (one source); `harness bench` shares these options with `harness serve`.
D = ServeConfig
engine_option = options.option("--engine", type=click.Choice(ENGINES), default=D.engine, show_default=True)
cold_starts_option = options.option("--cold-starts", default=D.cold_starts, show_default=True,
                                    type=click.IntRange(1),
                                    help="Fresh servers (with --allocators: rounds, one server per allocator each).")
warm_requests_option = options.option("--warm-requests", default=D.warm_requests, show_default=True,
                                      type=click.IntRange(0), help="Requests right after the cold one, per server.")
port_option = options.option("--port", default=D.port, type=click.IntRange(1, 65535),
                              help="The server's port [default: a free port of --host, taken at the start].")


@click.command("serve")
@engine_option()
@options.runner(help="local: a process group here; docker: a container of harness-vllm:cpu (CPU) or "
                     "vllm/vllm-openai (NVIDIA), vLLM only; auto: docker when the engine answers and the image "
                     "is there or can be built, else local (it says which and why).")
@click.option("--model", default=D.model, show_default=True,
              help="synthetic:tiny | synthetic:phi3-mini | hub id (offline cache) | local directory.")
@click.option("--url", default=None,
              help="Attach to a running OpenAI-compatible server (no start-up figures).")
@click.option("--server-cmd", default=None,
              help="Any OpenAI-compatible server ({host} {port} {model} {model_dir} are filled in); "
                   "implies --engine custom.")
@cold_starts_option()
@warm_requests_option()
@click.option("--idle-gaps", default=None,
              help="e.g. 0,1,10: one more request after idling that many seconds.")
@click.option("--max-tokens", default=D.max_tokens, show_default=True, type=click.IntRange(1))
@click.option("--prompt", default=D.prompt, show_default=False)
@click.option("--request-mode", type=click.Choice(REQUEST_MODES), default=D.request_mode, show_default=True,
              help="stream: SSE with TTFT/TPOT; plain: one JSON body as the seed's curl (wall time only).")
@click.option("--sample-hz", default=D.sample_hz, show_default=True, type=Number(0.1, 1000))
@click.option("--sampler/--no-sampler", default=D.sampler, show_default=True, help="Memory timeline sampling.")
@click.option("--host", default=D.host, show_default=True)
@port_option()
@click.option("--health-timeout", "health_timeout_s", default=D.health_timeout_s, show_default=True,
              type=Number(0, min_open=True),
              help="Seconds to wait for /health 200 and /v1/models.")
@click.option("--request-timeout", "request_timeout_s", default=D.request_timeout_s, show_default=True,
              type=Number(0, min_open=True),
              help="Seconds for each whole request (and for each read of its response).")
@click.option("--dtype", default=D.dtype, help="Passed to the server (--dtype).")
@click.option("--max-model-len", default=D.max_model_len, show_default=True, type=click.IntRange(1),
              help="vLLM --max-model-len.")
@click.option("--gpu-memory-utilization", default=D.gpu_memory_utilization, type=Number(0, 1, min_open=True),
              help="vLLM --gpu-memory-utilization.")
@click.option("--served-model-name", default=D.served_model_name,
              help="Model name the server answers to [default: --model].")
@click.option("--vllm-python", default=None,
              help=f"Python of the vLLM environment [default: {default_vllm_python()}].")
@click.option("--transformers-cmd", default=D.transformers_cmd, show_default=True,
              help="Command that provides `transformers serve` (needs transformers[serving]).")
@click.option("--kv-cache-gib", default=D.kv_cache_gib, show_default=True, type=Number(0, min_open=True),
              help="VLLM_CPU_KVCACHE_SPACE on CPU.")
@click.option("--device", default=D.device, show_default=True, help="transformers serve --device.")
@click.option("--server-arg", multiple=True, help="Extra argument for the server command (repeatable).")
@click.option("--compile-cache", type=click.Choice(["fresh", "shared"]), default=D.compile_cache, show_default=True,
              help="vLLM torch.compile cache: fresh per cold start (a new node) or ~/.cache/vllm (restart).")
@click.option("--server-preload", default=D.server_preload, metavar="LIB",
              help="LD_PRELOAD for the server (e.g. /usr/lib/x86_64-linux-gnu/libjemalloc.so.2); "
                   "verified in /proc/<pid>/maps and reported.")
@options.allocators(None, "Compare allocators, e.g. glibc,jemalloc[,tcmalloc,mimalloc]: every round (--cold-starts "
                          "rounds) starts one fresh server per allocator, order rotated each round, each server's "
                          "allocator verified in its API server and engine core (/proc/PID/maps); ratios vs glibc.")
@options.allocator_lib()
@options.allocator_env()
@options.target_ci(help="With --allocators: add rounds until the ratio CI of every allocator against the baseline, "
                        "on --metric, is ±PCT % wide or narrower (checked once a round from round --cold-starts "
                        "on), or --max-time is up: harness alloc's rule.")
@options.max_time(help="With --allocators: start no server that would likely end after this much time (90s, 2m, "
                       "1h30m); a server in flight is never cut. Without --target-ci: rounds until then.")
@options.max_rounds
@click.option("--metric", default=D.metric, show_default=True, type=click.Choice(list(STOP_METRICS)),
              help="The per-server figure --target-ci applies to.")
@click.option("--design", type=click.Choice(DESIGNS), default=D.design, show_default=True,
              help="With --allocators: sequential: rounds of one fresh server at a time; duet: sets of one fresh "
                   "server per allocator up at once (each on its own CPUs, memory settings halved), warm requests "
                   "alternating between them (--cold-starts: sets, --warm-requests: steps per set), a CI over sets.")
@click.option("--profile-startup", is_flag=True,
              help="Sample the server's Python stacks (py-spy dump) from spawn to /health and name what it "
                   "does in each silent stretch of its log (needs root or ptrace_scope 0).")
@click.option("--stack-hz", default=D.stack_hz, show_default=True, type=Number(0.1, 20),
              help="Stack samples per second per server process with --profile-startup.")
@click.option("--model-cache", default=D.model_cache, help="Where synthetic model directories are generated.")
@options.out(help="Results directory (DIR/serve/...) [default: results/<timestamp>].")
def serve(**kw: Any) -> None:
    """First-token path: fresh servers, cold then warm requests, start-up phases, memory timeline."""
    sys.exit(exit_code_of(lambda: run_outcome(config_from_options(**kw))))


def run_outcome(config: ServeConfig) -> None:
    """Runs serve; raises the error it ended with (exit_code_of prints its line)."""
    failure = run_serve(config).failure()
    if failure is not None:
        raise failure


if __name__ == "__main__":
    serve()
