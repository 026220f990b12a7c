"""Server commands per engine: vLLM, `transformers serve`, or any OpenAI-compatible `--server-cmd`."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.probe.models import ModelSpec, parse_model
from harness.serve.config import ConfigError, ServeConfig

PLACEHOLDER = re.compile(r"\{(host|port|model|model_dir)\}")


def split_command(option: str, text: str) -> list[str]:
    """A command line as the shell would split it; ConfigError (one line) on an unbalanced quote."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"{option}: {exc} in {text!r}") from None


def fill_placeholders(command: str, values: dict[str, str]) -> str:
    """{host} {port} {model} {model_dir} filled in; every other brace (a shell's ${VAR}, JSON) kept as written."""
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], command)


@dataclass(frozen=True)
class ServerSpec:
    """What to launch and what the server will call the model."""

    argv: list[str]
    env: dict[str, str]
    served_model: str | None  # None: take the one model /v1/models lists
    model_dir: str | None


def model_dir_for(spec: ModelSpec, config: ServeConfig, weights: bool) -> str:
    """A local directory for the model; synthetic models are generated once per cache dir."""
    if spec.kind != "synthetic":
        return spec.name  # local directory or hub id (resolved by the server, offline)
    from harness.probe.models import save_synthetic_model_dir

    assert spec.synthetic_key is not None
    root = Path(config.model_cache or os.path.join(tempfile.gettempdir(), "harness-models"))
    out = root / f"{spec.synthetic_key}-{'weights' if weights else 'config'}"
    if not (out / "config.json").exists() or (weights and not any(out.glob("*.safetensors"))):
        save_synthetic_model_dir(spec.synthetic_key, out, weights=weights)
    return str(out)


def server_env(config: ServeConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)  # the server's own launcher decides; recorded from /proc/<pid>/maps
    if config.server_preload:  # vLLM CPU appends its own libgomp (and a bundled tcmalloc, if any)
        env["LD_PRELOAD"] = os.path.realpath(config.server_preload)
    env.update({
        "PYTHONUNBUFFERED": "1",  # log lines arrive when written: phase times from arrival
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_HOST_IP": config.host,  # engine <-> API server traffic stays on loopback
        "TOKENIZERS_PARALLELISM": "false",
    })
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{config.kv_cache_gib:g}")
    # `transformers serve` answers /v1/models by scanning the hub cache and fails (HTTP 500) when the
    # directory does not exist, as on a fresh offline host: make sure it exists.
    hf_home = env.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    os.makedirs(env.get("HF_HUB_CACHE") or os.path.join(hf_home, "hub"), exist_ok=True)
    return env


_BUILD_PROBE = """import json, torch, vllm
print(json.dumps({"vllm": vllm.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
                  "build": "cuda" if torch.version.cuda else "cpu"}))"""


def vllm_build(python: str) -> dict[str, str | None]:
    """Which vLLM the server's Python imports: its version, torch's, and whether the build is CUDA or CPU.
    `{"error": ...}` when it cannot import vLLM."""
    try:
        proc = subprocess.run([python, "-c", _BUILD_PROBE], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"cannot run {python}: {exc}"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"{python} cannot import vllm: {tail[:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def describe_build(build: dict[str, str | None]) -> str:
    if "error" in build:
        return str(build["error"])
    where = f"CUDA {build['cuda']}" if build.get("build") == "cuda" else "CPU"
    return f"vllm {build['vllm']} ({where} build, torch {build['torch']})"


CONTAINER_MODELS = "/models"


def container_model_path(model_dir: str) -> str:
    """Where a local model directory appears inside the server container (bind-mounted read-only)."""
    return f"{CONTAINER_MODELS}/{Path(model_dir).resolve().name}"


def vllm_args(config: ServeConfig, spec: ModelSpec, model: str) -> list[str]:
    """vLLM OpenAI-server options (after `python -m vllm.entrypoints.openai.api_server`)."""
    served = config.served_model_name or config.model
    args = ["--model", model, "--served-model-name", served, "--host", config.host, "--port", str(config.port)]
    if spec.kind == "synthetic":
        args += ["--load-format", "dummy"]
    if config.dtype:
        args += ["--dtype", config.dtype]
    if config.max_model_len:
        args += ["--max-model-len", str(config.max_model_len)]
    if config.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", str(config.gpu_memory_utilization)]
    return args + list(config.extra_args)


def container_env(config: ServeConfig) -> dict[str, str]:
    """The server container's environment: only what the server needs, nothing of the host's."""
    return {
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_HOST_IP": config.host,
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CPU_KVCACHE_SPACE": f"{config.kv_cache_gib:g}",
    }


def build(config: ServeConfig, runner: str = "local") -> ServerSpec:
    """Raises ConfigError (unknown model, missing environment) before anything is started.
    runner "docker": `argv` holds the arguments for the image's vLLM entrypoint, the model as seen
    inside the container; `model_dir` stays the host directory to mount."""
    try:
        spec = parse_model(config.model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    env = server_env(config)
    if runner == "docker":
        if config.engine != "vllm":
            raise ConfigError(f"--runner docker serves --engine vllm only, not {config.engine!r}: "
                              "use --runner local")
        if config.server_preload:
            raise ConfigError("--server-preload names a host library: it cannot apply to --runner docker")
        model_dir = model_dir_for(spec, config, weights=False)
        inside = container_model_path(model_dir) if os.path.isdir(model_dir) else model_dir
        served = config.served_model_name or config.model
        return ServerSpec(vllm_args(config, spec, inside), container_env(config), served, model_dir)
    if config.engine == "vllm":
        if not os.path.exists(config.vllm_python):
            raise ConfigError(f"vLLM environment not found: {config.vllm_python} "
                              "(run scripts/setup-vllm.sh or pass --vllm-python)")
        model_dir = model_dir_for(spec, config, weights=False)
        served = config.served_model_name or config.model
        argv = [config.vllm_python, "-m", "vllm.entrypoints.openai.api_server"]
        return ServerSpec(argv + vllm_args(config, spec, model_dir), env, served, model_dir)
    if config.engine == "transformers":
        model_dir = model_dir_for(spec, config, weights=True)
        argv = [*split_command("--transformers-cmd", config.transformers_cmd), "serve", model_dir,
                "--host", config.host, "--port", str(config.port), "--device", config.device]
        if config.dtype:
            argv += ["--dtype", config.dtype]
        return ServerSpec(argv + list(config.extra_args), env, model_dir, model_dir)
    assert config.server_cmd is not None
    split_command("--server-cmd", config.server_cmd)  # an unbalanced quote: said before the model is made
    model_dir = model_dir_for(spec, config, weights=True)
    cmd = fill_placeholders(config.server_cmd, {"host": config.host, "port": str(config.port),
                                                "model": config.model, "model_dir": model_dir})
    return ServerSpec(split_command("--server-cmd", cmd) + list(config.extra_args), env, config.served_model_name,
                      model_dir)
