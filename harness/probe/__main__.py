"""The probe: one fresh process, one model load, one cold and K warm `generate` calls.

Run as `python -m harness.probe --model synthetic:tiny ...`. Prints exactly one line starting with
RESULT_MARKER followed by a JSON object (or ERROR_MARKER on failure). Imports nothing of the driver:
only this sub-package, the standard library, torch and transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from typing import Any

T_PROCESS_START = time.perf_counter()

RESULT_MARKER = "HARNESS_PROBE_RESULT "
ERROR_MARKER = "HARNESS_PROBE_ERROR "
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    from harness.probe.loaded_allocator import loaded_allocator

    allocator = loaded_allocator()  # before torch: what malloc resolves to does not change later
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
    gens = []
    with torch.inference_mode():
        before = _contention()  # the window is the measured generations: the warm ones, else the cold one
        gens.append(timed_generate(model, dict(inputs), args.max_new_tokens, device))
        if args.warm_gens:
            before = _contention()
        for _ in range(args.warm_gens):
            gens.append(timed_generate(model, dict(inputs), args.max_new_tokens, device))
        contention = _contention_during(before, _contention())
    cold, warm = gens[0], gens[1:]
    text = tokenizer.decode(cold["output_ids"][inputs["input_ids"].shape[-1]:], skip_special_tokens=True)
    for g in gens:
        g.pop("output_ids")
    measured = warm or [cold]

    itl = sorted(gap for g in measured for gap in g["itl_s"])
    gpu: dict[str, Any] | None = None
    if device.startswith("cuda"):
        index = torch.cuda.current_device()
        gpu = {
            "name": torch.cuda.get_device_name(index),
            "peak_allocated_mb": torch.cuda.max_memory_allocated(index) / 2**20,
            "peak_reserved_mb": torch.cuda.max_memory_reserved(index) / 2**20,
        }
    return {
        "schema": "probe/1",
        "model": spec.to_dict(),
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "prompt_tokens": int(inputs["input_ids"].shape[-1]),
        "max_new_tokens": args.max_new_tokens,
        "warm_gens": args.warm_gens,
        "allocator": allocator,
        "import_s": t_imported - T_PROCESS_START,
        "device_init_s": t_context - t_imported,
        "load_s": t_loaded - t_context,
        "cold": cold,
        "warm": warm,
        "gen_latency_s": statistics.median(g["latency_s"] for g in measured),
        "ttft_s": statistics.median(g["ttft_s"] for g in measured if g["ttft_s"] is not None),
        "tpot_s": (statistics.median(g["tpot_s"] for g in measured if g["tpot_s"] is not None)
                   if args.max_new_tokens > 1 else None),
        # Decode step time from every inter-token gap of the measured generations. Its lower quartile stays
        # on the uncontended steps when a shared host slows some stretches of a run (alloc/summary.md explains).
        "itl_p25_s": _quantile(itl, 0.25),
        "itl_p50_s": _quantile(itl, 0.50),
        "itl_p90_s": _quantile(itl, 0.90),
        "peak_rss_mb": _peak_rss_mb(),
        "final_rss_mb": _rss_mb(),
        "gpu": gpu,
        "sample_text": text[:200],
        "torch_threads": torch.get_num_threads(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)),  # where the measuring process was allowed to run
        # While the measured generations ran: CPU time the hypervisor gave to other guests, and preemptions.
        "contention": contention,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "cuda": torch.version.cuda},
        "pid": os.getpid(),
        "probe_s": time.perf_counter() - T_PROCESS_START,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.probe", description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--warm-gens", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except Exception as exc:  # reported to the driver as a failed run, with the reason
        traceback.print_exc(file=sys.stderr)
        print(ERROR_MARKER + json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 2
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
