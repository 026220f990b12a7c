"""The probe: one fresh process, one model load, one cold `generate`, then the measured window: K warm
`generate` calls, or as many as fill S seconds of generation (`--measure-s`).

Run as `python -m harness.probe --model synthetic:tiny ...`. Prints exactly one line starting with
RESULT_MARKER followed by a JSON object (or ERROR_MARKER on failure).

With `--session` the process stays up after its cold generate and measures one window per request read on
stdin (harness.probe.protocol): the duet design alternates windows of two such processes. Imports nothing of
the driver: only this sub-package, the standard library, torch and transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from harness.probe import protocol

T_PROCESS_START = time.perf_counter()

RESULT_MARKER = "HARNESS_PROBE_RESULT "
ERROR_MARKER = protocol.ERROR_MARKER
DEFAULT_PROMPT = "Explain NUMA-aware inference in 2 short bullet points."


class TokenClock:
    """A generation streamer that timestamps every `put`: the prompt first, then each new token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: Any) -> None:  # transformers calls put(prompt) then put(token) per step
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _peak_rss_mb() -> float:
    """VmHWM of this process: the peak resident set size."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _contention() -> dict[str, float]:
    """Counters of what took CPU time from this process: the hypervisor's steal on the CPUs it may run on
    (/proc/stat, in clock ticks, with their total) and the kernel's involuntary preemptions of its threads."""
    mine = {f"cpu{c}" for c in os.sched_getaffinity(0)}
    steal = total = 0
    try:
        with open("/proc/stat") as fh:
            for line in fh:
                name, *ticks = line.split()
                if name in mine:  # user nice system idle iowait irq softirq steal (guest time is inside user)
                    values = [int(v) for v in ticks[:8]]
                    steal += values[7] if len(values) > 7 else 0
                    total += sum(values)
    except (OSError, ValueError):
        pass
    return {"steal": steal, "total": total,
            "involuntary_switches": resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw}


def _contention_during(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    ticks = after["total"] - before["total"]
    return {"steal_pct": 100.0 * (after["steal"] - before["steal"]) / ticks if ticks > 0 else None,
            "involuntary_switches": int(after["involuntary_switches"] - before["involuntary_switches"])}


def _page_faults() -> tuple[int, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_majflt


def _cpu_freq_files() -> list[str]:
    """cpufreq's current frequency of each CPU this process may run on (absent on many VMs)."""
    files = [f"/sys/devices/system/cpu/cpu{c}/cpufreq/scaling_cur_freq" for c in sorted(os.sched_getaffinity(0))]
    return [f for f in files if os.access(f, os.R_OK)]


def _read_mhz(files: list[str]) -> float | None:
    """The mean current frequency of those CPUs in MHz (sysfs gives kHz)."""
    values = []
    for path in files:
        try:
            with open(path) as fh:
                values.append(int(fh.read()) / 1000.0)
        except (OSError, ValueError):
            continue
    return statistics.fmean(values) if values else None


def _nvml_handle(device: str) -> tuple[Any, Any, str | None]:
    """(pynvml, the NVML handle of the GPU torch uses, None), or (None, None, why it cannot be read)."""
    try:
        import pynvml
    except ImportError:
        return None, None, "pynvml (nvidia-ml-py) is not installed where the probe runs"
    try:
        import torch

        pynvml.nvmlInit()
        index = torch.cuda.current_device()
        uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
        if uuid:
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        else:  # NVML numbers every GPU of the host; torch only the visible ones
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return pynvml, handle, None
    except Exception as exc:  # no driver library, or an NVML error
        return None, None, f"NVML: {exc}"


# NVML's clock event ("throttle") reasons that slow the GPU down, as opposed to idling or app clocks.
SLOWDOWN_REASONS = 0x4 | 0x8 | 0x20 | 0x40 | 0x80  # SW power cap, HW slowdown, SW/HW thermal, power brake


class NoiseSampler:
    """What besides the allocator could slow the measured generations, read every `period_s` while they run
    (one daemon thread, started and stopped around the window; it mostly sleeps): the GPU's SM and memory
    clocks and clock event (throttle) reasons through NVML, and the mean current frequency of the CPUs this
    process may use (cpufreq). Where one cannot be read, the result says why instead of giving a number."""

    def __init__(self, device: str, period_s: float = 0.1) -> None:
        self.period_s = period_s
        self.cpu_files = _cpu_freq_files()
        self.nvml, self.handle, self.gpu_unreadable = (None, None, None)
        if device.startswith("cuda"):
            self.nvml, self.handle, self.gpu_unreadable = _nvml_handle(device)
        else:
            self.gpu_unreadable = "no GPU in use"
        self.sm: list[int] = []
        self.mem: list[int] = []
        self.reasons: list[int] = []
        self.cpu_mhz: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="noise-sampler", daemon=True)

    def _sample(self) -> None:
        if self.handle is not None:
            nvml = self.nvml
            try:
                self.sm.append(nvml.nvmlDeviceGetClockInfo(self.handle, nvml.NVML_CLOCK_SM))
                self.mem.append(nvml.nvmlDeviceGetClockInfo(self.handle, nvml.NVML_CLOCK_MEM))
                reasons = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
                    nvml.nvmlDeviceGetCurrentClocksThrottleReasons
                self.reasons.append(int(reasons(self.handle)))
            except Exception as exc:  # NVML error mid-window: say so, keep what was read
                self.gpu_unreadable, self.handle = f"NVML: {exc}", None
        if self.cpu_files:
            mhz = _read_mhz(self.cpu_files)
            if mhz is not None:
                self.cpu_mhz.append(mhz)

    def _loop(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self.period_s):
                return

    def __enter__(self) -> NoiseSampler:
        self._faults = _page_faults()
        if self.handle is not None or self.cpu_files:  # no thread where there is nothing to read
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        minor, major = _page_faults()
        self.minor_faults, self.major_faults = minor - self._faults[0], major - self._faults[1]

    def result(self) -> dict[str, Any]:
        gpu = None
        if self.sm:
            gpu = {"sm_clock_min_mhz": min(self.sm), "sm_clock_max_mhz": max(self.sm),
                   "mem_clock_min_mhz": min(self.mem), "mem_clock_max_mhz": max(self.mem),
                   "clock_event_reasons": _union(self.reasons),
                   "slowdown_pct": 100.0 * sum(bool(r & SLOWDOWN_REASONS) for r in self.reasons) / len(self.reasons),
                   "samples": len(self.sm)}
        cpu = None
        if self.cpu_mhz:
            cpu = {"min_mhz": min(self.cpu_mhz), "mean_mhz": statistics.fmean(self.cpu_mhz),
                   "max_mhz": max(self.cpu_mhz), "samples": len(self.cpu_mhz)}
        return {"period_s": self.period_s, "minor_faults": self.minor_faults, "major_faults": self.major_faults,
                "gpu": gpu, "gpu_unreadable": None if gpu else self.gpu_unreadable or "no NVML sample taken",
                "cpu_freq": cpu, "cpu_freq_unreadable": None if cpu else (
                    "no cpufreq scaling_cur_freq in sysfs for these CPUs" if not self.cpu_files
                    else "no cpufreq sample taken")}


def _union(masks: list[int]) -> int:
    out = 0
    for m in masks:
        out |= m
    return out


def _quantile(sorted_values: list[float], q: float) -> float | None:
    """Linear-interpolated quantile (numpy's default) without importing numpy into the probe's timings."""
    if not sorted_values:
        return None
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def timed_generate(model, inputs: dict, max_new_tokens: int, device: str) -> dict[str, Any]:
    clock = TokenClock()
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
        streamer=clock, pad_token_id=model.generation_config.pad_token_id,
    )
    _sync(device)
    t1 = time.perf_counter()
    token_stamps = clock.stamps[1:]  # stamps[0] is the prompt being handed to the streamer
    n_new = int(out.shape[-1] - inputs["input_ids"].shape[-1])
    ttft = token_stamps[0] - t0 if token_stamps else None
    gaps = [b - a for a, b in zip(token_stamps, token_stamps[1:], strict=False)]
    return {
        "latency_s": t1 - t0,
        "ttft_s": ttft,
        "tpot_s": (statistics.fmean(gaps) if gaps else None),
        "itl_s": [round(g, 7) for g in gaps],  # every inter-token gap: shows whether noise is bursty or steady
        "new_tokens": n_new,
        "output_ids": out[0].tolist(),
    }


def _window_open(warm: list[dict[str, Any]], args: argparse.Namespace) -> bool:
    """Another warm generate? --measure-s: until that much generation time is measured (at least one);
    otherwise until --warm-gens are done."""
    if args.measure_s is not None:
        return not warm or sum(g["latency_s"] for g in warm) < args.measure_s
    return len(warm) < args.warm_gens


# Packages transformers imports at start-up where installed, for features the probe never uses: scikit-learn
# (assisted decoding) costs about 1.5 s of every run on a GPU host's image. Marked absent, they are not imported.
UNUSED_AT_STARTUP = ("sklearn",)


@dataclass
class Loaded:
    """A probe process with its model loaded: what every measured window needs."""

    torch: Any
    model: Any
    tokenizer: Any
    inputs: Any
    spec: Any
    device: str
    dtype: Any
    allocator: dict[str, Any]
    max_new_tokens: int
    import_s: float
    device_init_s: float
    load_s: float
    versions: dict[str, Any]


def load(args: argparse.Namespace) -> Loaded:
    """Reads which malloc this process uses (before torch), imports torch and transformers, loads the model."""
    from harness.probe.loaded_allocator import loaded_allocator

    allocator = loaded_allocator()  # before torch: what malloc resolves to does not change later
    for name in UNUSED_AT_STARTUP:
        sys.modules.setdefault(name, None)  # importlib.util.find_spec now answers None: "not installed"
    import torch
    import transformers

    from harness.probe.models import load_model_and_tokenizer, parse_model

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]

    spec = parse_model(args.model)
    t_imported = time.perf_counter()
    if device.startswith("cuda"):
        torch.empty(0, device=device)  # creates the CUDA context, timed apart from the model load
    t_context = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(spec, device, dtype, seed=args.seed)
    _sync(device)
    t_loaded = time.perf_counter()
    inputs = tokenizer(args.prompt, return_tensors="pt").to(device)
    return Loaded(torch=torch, model=model, tokenizer=tokenizer, inputs=inputs, spec=spec, device=device,
                  dtype=dtype, allocator=allocator, max_new_tokens=args.max_new_tokens,
                  import_s=t_imported - T_PROCESS_START, device_init_s=t_context - t_imported,
                  load_s=t_loaded - t_context,
                  versions={"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "cuda": torch.version.cuda})


def generate(loaded: Loaded) -> dict[str, Any]:
    with loaded.torch.inference_mode():
        return timed_generate(loaded.model, dict(loaded.inputs), loaded.max_new_tokens, loaded.device)


def measure_window(loaded: Loaded, warm_gens: int, measure_s: float | None) -> dict[str, Any]:
    """The measured window: `warm_gens` generates, or as many as fill `measure_s` seconds (at least one),
    with what else could have slowed them read around it (contention, page faults, clocks)."""
    window = argparse.Namespace(warm_gens=warm_gens, measure_s=measure_s)
    with loaded.torch.inference_mode(), NoiseSampler(loaded.device) as sampler:
        before = _contention()
        t_window = time.perf_counter()
        warm: list[dict[str, Any]] = []
        while _window_open(warm, window):
            warm.append(timed_generate(loaded.model, dict(loaded.inputs), loaded.max_new_tokens, loaded.device))
        window_s = time.perf_counter() - t_window
        contention = _contention_during(before, _contention())
    for g in warm:
        g.pop("output_ids")
    return {"warm": warm, "window_s": window_s, "contention": contention, "noise": sampler.result()}


def window_figures(measured: list[dict[str, Any]], max_new_tokens: int) -> dict[str, Any]:
    """The figures of a set of measured generates: medians, and quartiles of every inter-token gap."""
    itl = sorted(gap for g in measured for gap in g["itl_s"])
    return {
        "gen_latency_s": statistics.median(g["latency_s"] for g in measured),
        "measured_s": sum(g["latency_s"] for g in measured),  # seconds of measured generation
        "ttft_s": statistics.median(g["ttft_s"] for g in measured if g["ttft_s"] is not None),
        "tpot_s": (statistics.median(g["tpot_s"] for g in measured if g["tpot_s"] is not None)
                   if max_new_tokens > 1 else None),
        # Decode step time from every inter-token gap of the measured generations. Its lower quartile stays
        # on the uncontended steps when a shared host slows some stretches of a run (alloc/summary.md explains).
        "itl_p25_s": _quantile(itl, 0.25),
        "itl_p50_s": _quantile(itl, 0.50),
        "itl_p90_s": _quantile(itl, 0.90),
    }


def _gpu_peaks(loaded: Loaded) -> dict[str, Any] | None:
    if not loaded.device.startswith("cuda"):
        return None
    torch = loaded.torch
    index = torch.cuda.current_device()
    return {"name": torch.cuda.get_device_name(index),
            "peak_allocated_mb": torch.cuda.max_memory_allocated(index) / 2**20,
            "peak_reserved_mb": torch.cuda.max_memory_reserved(index) / 2**20}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One run: load, a cold generate, the measured window (with --warm-gens 0, the cold generate itself)."""
    loaded = load(args)
    cold_measured = args.measure_s is None and args.warm_gens == 0
    if cold_measured:
        with loaded.torch.inference_mode(), NoiseSampler(loaded.device) as sampler:
            before = _contention()
            t_window = time.perf_counter()
            cold = generate(loaded)
            window = {"warm": [], "window_s": time.perf_counter() - t_window,
                      "contention": _contention_during(before, _contention())}
        window["noise"] = sampler.result()
    else:
        cold = generate(loaded)
        window = measure_window(loaded, args.warm_gens, args.measure_s)
    text = loaded.tokenizer.decode(cold["output_ids"][loaded.inputs["input_ids"].shape[-1]:],
                                   skip_special_tokens=True)
    cold.pop("output_ids")
    warm = window["warm"]
    return {
        "schema": "probe/1",
        "model": loaded.spec.to_dict(),
        "device": loaded.device,
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "prompt_tokens": int(loaded.inputs["input_ids"].shape[-1]),
        "max_new_tokens": args.max_new_tokens,
        "warm_gens": len(warm),
        "measure_s": args.measure_s,
        "allocator": loaded.allocator,
        "import_s": loaded.import_s,
        "device_init_s": loaded.device_init_s,
        "load_s": loaded.load_s,
        "cold": cold,
        "warm": warm,
        **window_figures(warm or [cold], args.max_new_tokens),
        "window_s": window["window_s"],
        "peak_rss_mb": _peak_rss_mb(),
        "final_rss_mb": _rss_mb(),
        "gpu": _gpu_peaks(loaded),
        "sample_text": text[:200],
        "torch_threads": loaded.torch.get_num_threads(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)),  # where the measuring process was allowed to run
        # While the measured generations ran: CPU time the hypervisor gave to other guests, and preemptions;
        # page faults, GPU clocks and throttle reasons, CPU frequency (each None with the reason where unreadable).
        "contention": window["contention"],
        "noise": window["noise"],
        "versions": loaded.versions,
        "pid": os.getpid(),
        "probe_s": time.perf_counter() - T_PROCESS_START,
    }


def serve_session(args: argparse.Namespace, requests: Any = None, out: Any = None) -> int:
    """--session: load and run the cold generate, say Ready, then answer one WindowRequest per stdin line
    until stdin ends or a request says stop. A malformed request ends the process with an error line."""
    requests = requests if requests is not None else sys.stdin
    out = out if out is not None else sys.stdout
    loaded = load(args)
    cold = generate(loaded)
    cold.pop("output_ids")
    ready = protocol.Ready(
        schema=protocol.SCHEMA, pid=os.getpid(), allocator=loaded.allocator,
        cpu_affinity=sorted(os.sched_getaffinity(0)), device=loaded.device,
        dtype=str(loaded.dtype).replace("torch.", ""), model=loaded.spec.to_dict(),
        prompt_tokens=int(loaded.inputs["input_ids"].shape[-1]), max_new_tokens=args.max_new_tokens,
        import_s=loaded.import_s, device_init_s=loaded.device_init_s, load_s=loaded.load_s, cold=cold,
        torch_threads=loaded.torch.get_num_threads(), versions=loaded.versions,
        ready_s=time.perf_counter() - T_PROCESS_START)
    print(ready.line(), file=out, flush=True)
    for line in requests:
        if not line.strip():
            continue
        request = protocol.WindowRequest.parse(line)
        if request.stop:
            break
        print(window_result(loaded, request).line(), file=out, flush=True)
    return 0


def window_result(loaded: Loaded, request: protocol.WindowRequest) -> protocol.WindowResult:
    window = measure_window(loaded, request.gens or 0, request.seconds)
    warm, noise = window["warm"], window["noise"]
    gpu = _gpu_peaks(loaded)
    return protocol.WindowResult(
        window=request.window, gens=len(warm), latencies_s=[g["latency_s"] for g in warm],
        **window_figures(warm, loaded.max_new_tokens), window_s=window["window_s"], rss_mb=_rss_mb(),
        peak_rss_mb=_peak_rss_mb(), steal_pct=window["contention"]["steal_pct"],
        involuntary_switches=window["contention"]["involuntary_switches"], minor_faults=noise["minor_faults"],
        major_faults=noise["major_faults"], gpu_peak_allocated_mb=gpu["peak_allocated_mb"] if gpu else None,
        extra={"noise": noise})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.probe", description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--warm-gens", type=int, default=3)
    p.add_argument("--measure-s", type=float, default=None,
                   help="warm generates until this many seconds of generation are measured (replaces --warm-gens)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--session", action="store_true",
                   help="stay up after the cold generate and answer measured windows asked for on stdin "
                        "(harness.probe.protocol)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.session:
        try:
            return serve_session(args)
        except Exception as exc:  # the driver ends this set and records why
            traceback.print_exc(file=sys.stderr)
            print(ERROR_MARKER + json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
            return 2
    try:
        result = run(args)
    except Exception as exc:  # reported to the driver as a failed run, with the reason
        traceback.print_exc(file=sys.stderr)
        print(ERROR_MARKER + json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 2
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the result is out: skip tearing down torch, the model and the CUDA context (seconds)
