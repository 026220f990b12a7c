"""ServeConfig: everything one `harness serve` run needs, typed and validated in one place."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any
from urllib.parse import urlparse

from harness import REPO_ROOT
from harness.containers.runner_choice import DEFAULT_RUNNER, RUNNERS
from harness.errors import UsageError
from harness.measure.allocators import Allocator, AllocatorError, parse_allocator_envs, parse_allocator_libs, resolve

ENGINES = ("vllm", "transformers", "custom")
REQUEST_MODES = ("stream", "plain")
COMPILE_CACHES = ("fresh", "shared")
DESIGNS = ("sequential", "duet")  # --allocators: per-server rounds, or sets of servers up at once
DEFAULT_VLLM_PYTHON = str(REPO_ROOT / ".venv-vllm" / "bin" / "python")
DEFAULT_PROMPT = "Explain NUMA-aware inference in 2 short bullet points."
# --metric of an open-ended allocator comparison -> the per-server figure its ratio CI is taken on.
STOP_METRICS = {"warm_tpot": "warm_tpot_s", "warm_ttft": "warm_ttft_s", "warm_e2e": "warm_e2e_s",
                "cold_ttft": "cold_ttft_s", "startup": "spawn_to_health_s"}
DEFAULT_STOP_METRIC = "warm_tpot"  # the decode step: what alloc's default (ITL p25) is for a bare generate


class ConfigError(UsageError):
    """Options that cannot work together."""


def default_vllm_python() -> str:
    return os.environ.get("HARNESS_VLLM_PYTHON", DEFAULT_VLLM_PYTHON)


@dataclass(frozen=True)
class ServeConfig:
    """One serve experiment: which server, which requests, where results go."""

    model: str = "synthetic:tiny"
    out: str = "results/serve-run"
    engine: str = "vllm"
    runner: str = DEFAULT_RUNNER
    url: str | None = None  # attach to a running server: no start-up figures
    server_cmd: str | None = None  # engine "custom": {host} {port} {model} {model_dir} are filled in
    host: str = "127.0.0.1"
    port: int | None = None  # None: a free port, taken when the run starts
    cold_starts: int = 1
    warm_requests: int = 5
    idle_gaps: tuple[float, ...] = ()
    max_tokens: int = 16
    prompt: str = DEFAULT_PROMPT
    request_mode: str = "stream"  # stream: SSE with TTFT; plain: one JSON body, as the seed's curl
    sample_hz: float = 20.0
    sampler: bool = True
    health_timeout_s: float = 600.0
    request_timeout_s: float = 300.0
    dtype: str | None = None
    max_model_len: int | None = 2048
    gpu_memory_utilization: float | None = None
    served_model_name: str | None = None
    vllm_python: str = field(default_factory=default_vllm_python)
    transformers_cmd: str = "transformers"  # `transformers serve` from the environment that has it
    kv_cache_gib: float = 1.0  # VLLM_CPU_KVCACHE_SPACE on CPU
    device: str = "auto"
    extra_args: tuple[str, ...] = ()  # passed through to the server command
    model_cache: str | None = None  # where synthetic model directories are written
    # vLLM's torch.compile cache: "fresh" = an empty VLLM_CACHE_ROOT per cold start (every start
    # equally cold, as on a new node); "shared" = vLLM's default ~/.cache/vllm (a restart in place).
    compile_cache: str = "fresh"
    server_preload: str | None = None  # LD_PRELOAD for the server tree (e.g. libjemalloc.so.2)
    profile_startup: bool = False  # sample the server tree's Python stacks (py-spy) until it is ready
    stack_hz: float = 2.0
    # Allocator comparison: each round starts one fresh server per allocator (order rotated by round);
    # empty: one server per cold start under the launcher's own allocator, as before.
    allocators: tuple[str, ...] = ()
    allocator_lib: tuple[str, ...] = ()  # NAME=PATH, as `harness alloc --allocator-lib`
    allocator_env: tuple[str, ...] = ()  # NAME:VAR=VALUE, as `harness alloc --allocator-env`
    # The stopping rule of `harness alloc` (harness.measure.stopping): open-ended rounds until every ratio CI on
    # `metric` is ±target_ci (a fraction) or narrower, checked once a round from round `cold_starts` on,
    # or until no server would likely end before max_time_s, or max_rounds rounds. None: cold_starts rounds.
    target_ci: float | None = None
    max_time_s: float | None = None
    max_rounds: int | None = None
    metric: str = DEFAULT_STOP_METRIC
    # sequential: rounds of one server per allocator at a time; duet: sets of one server per allocator, all up at
    # once, warm requests alternating between them (cold_starts: sets, warm_requests: steps per set).
    design: str = "sequential"

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r} (choose from {', '.join(ENGINES)})")
        if self.runner not in RUNNERS:
            raise ConfigError(f"unknown runner {self.runner!r} (choose from {', '.join(RUNNERS)})")
        if self.request_mode not in REQUEST_MODES:
            raise ConfigError(f"unknown request mode {self.request_mode!r}")
        if self.server_preload and not os.path.isfile(self.server_preload):
            raise ConfigError(f"--server-preload {self.server_preload!r} is not a file")
        if self.compile_cache not in COMPILE_CACHES:
            raise ConfigError(f"unknown compile cache {self.compile_cache!r} (fresh or shared)")
        if self.engine == "custom" and not self.server_cmd and not self.url:
            raise ConfigError("--engine custom needs --server-cmd '...' (or --url to attach)")
        if self.cold_starts < 1:
            raise ConfigError("--cold-starts must be at least 1")
        if self.warm_requests < 0 or self.max_tokens < 1:
            raise ConfigError("--warm-requests must be >= 0 and --max-tokens >= 1")
        if self.sample_hz <= 0:
            raise ConfigError("--sample-hz must be positive")
        if self.stack_hz <= 0:
            raise ConfigError("--stack-hz must be positive")
        if any(g < 0 for g in self.idle_gaps):
            raise ConfigError("--idle-gaps must be non-negative seconds")
        if self.url and self.cold_starts > 1:
            raise ConfigError("--url attaches to one running server: --cold-starts must be 1")
        if self.url and not (urlparse(self.url).scheme in ("http", "https") and urlparse(self.url).hostname):
            raise ConfigError(f"--url must start with http:// or https://, e.g. http://{self.url}")
        for option, seconds in (("--health-timeout", self.health_timeout_s),
                                ("--request-timeout", self.request_timeout_s)):
            if not 0 < seconds < math.inf:
                raise ConfigError(f"{option} must be positive seconds, got {seconds:g}")
        self._validate_numbers()
        self._validate_allocators()

    def _validate_numbers(self) -> None:
        """What the command line's types refuse, for a config built in code; and what the server would refuse
        only once it runs (a minute later)."""
        numbers = [("--sample-hz", self.sample_hz), ("--stack-hz", self.stack_hz),
                   ("--kv-cache-gib", self.kv_cache_gib), ("--gpu-memory-utilization", self.gpu_memory_utilization),
                   ("--target-ci", self.target_ci),
                   ("--max-time", self.max_time_s), *(("--idle-gaps", gap) for gap in self.idle_gaps)]
        for option, value in numbers:
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{option} must be a finite number, got {value}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"--max-model-len must be at least 1, got {self.max_model_len}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("--gpu-memory-utilization must be more than 0 and at most 1")
        limit = self.max_model_len
        if self.engine == "vllm" and not self.attach and limit and self.max_tokens >= limit:
            raise ConfigError(f"--max-tokens {self.max_tokens} leaves no room for the prompt within --max-model-len "
                              f"{limit}: give at most {limit - 1}, or a larger --max-model-len")

    def _validate_allocators(self) -> None:
        if not self.allocators:
            if self.design != "sequential":
                raise ConfigError("--design duet compares allocators: add --allocators")
            if self.allocator_lib or self.allocator_env or self.open_ended or self.max_rounds is not None:
                raise ConfigError("--allocator-lib, --allocator-env, --target-ci, --max-time and --max-rounds "
                                  "apply to an allocator comparison: add --allocators")
            return
        if self.url:
            raise ConfigError("--allocators starts its own servers: it cannot attach (--url)")
        if self.server_preload:
            raise ConfigError("--allocators sets each server's LD_PRELOAD itself: leave out --server-preload")
        try:
            resolve(list(self.allocators), parse_allocator_libs(self.allocator_lib),
                    parse_allocator_envs(self.allocator_env), check_files=False)
        except AllocatorError as exc:
            raise ConfigError(str(exc)) from exc
        self._validate_stopping()
        self._validate_design()

    def _validate_design(self) -> None:
        if self.design not in DESIGNS:
            raise ConfigError(f"unknown --design {self.design!r} (choose from {', '.join(DESIGNS)})")
        if self.design != "duet":
            return
        refused = [("needs at least two --allocators", len(self.allocators) < 2),
                   ("runs its servers locally for now: use --runner local", self.runner == "docker"),
                   ("gives each server its own free port: leave out --port", self.port is not None),
                   ("has no idle gaps: leave out --idle-gaps", bool(self.idle_gaps)),
                   ("starts its servers at once: leave out --profile-startup", self.profile_startup),
                   ("needs --warm-requests 1 or more (its steps per set)", self.warm_requests < 1),
                   ("measures streamed requests: leave out --request-mode plain", self.request_mode != "stream"),
                   ("stops on a warm figure: --metric warm_tpot, warm_ttft or warm_e2e",
                    self.open_ended and not self.metric.startswith("warm_"))]
        for why, bad in refused:
            if bad:
                raise ConfigError(f"--design duet {why}")

    def _validate_stopping(self) -> None:
        if self.metric not in STOP_METRICS:
            raise ConfigError(f"unknown --metric {self.metric!r} (choose from {', '.join(STOP_METRICS)})")
        if self.target_ci is not None and (len(self.allocators) < 2 or not self.target_ci > 0):
            raise ConfigError("--target-ci needs a positive percentage and at least two --allocators")
        if self.max_time_s is not None and not self.max_time_s > 0:
            raise ConfigError("--max-time must be more than 0 s")
        if self.max_rounds is not None and not self.open_ended:
            raise ConfigError("--max-rounds caps an open-ended comparison: give --target-ci or --max-time with it")

    @property
    def open_ended(self) -> bool:
        """Rounds until the stopping rule ends them (--target-ci / --max-time), not a fixed --cold-starts."""
        return self.target_ci is not None or self.max_time_s is not None

    def arms(self, check_files: bool = True) -> list[Allocator]:
        """The allocator arms (library paths checked here when `check_files`; the docker runner's come
        from its images)."""
        try:
            return resolve(list(self.allocators), parse_allocator_libs(self.allocator_lib),
                           parse_allocator_envs(self.allocator_env), check_files=check_files)
        except AllocatorError as exc:
            raise ConfigError(str(exc)) from exc

    @property
    def baseline(self) -> str | None:
        """glibc when it is an arm, else the first: every ratio is against it (as in `harness alloc`)."""
        if not self.allocators:
            return None
        return "glibc" if "glibc" in self.allocators else self.allocators[0]

    @property
    def attach(self) -> bool:
        return self.url is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeConfig:
        """A config back from config.json (keys it does not know, e.g. runner_reason, are left out)."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in known}
        for key in ("idle_gaps", "extra_args", "allocators", "allocator_lib", "allocator_env"):
            if key in kw:
                kw[key] = tuple(kw[key] or ())
        return cls(**kw)


def parse_gaps(text: str | None) -> tuple[float, ...]:
    """'0,1,10' -> (0.0, 1.0, 10.0)."""
    if not text:
        return ()
    try:
        gaps = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise ConfigError(f"--idle-gaps must be comma-separated seconds, got {text!r}") from exc
    if not all(math.isfinite(g) for g in gaps):
        raise ConfigError(f"--idle-gaps must be finite seconds, got {text!r}")
    return gaps
