"""DIR/serve/first_token_latency.md: every figure computed from requests, start-ups and the timeline."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from harness.results import ResultsDir
from harness.serve import timeline
from harness.serve.config import ServeConfig
from harness.serve.sampler import MemorySampler
from harness.stats import Summary, summarize

REPORT_FILE = "serve/first_token_latency.md"


def _ms(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x * 1e3:.1f}"


def _s(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.2f}"


def _mb(x: float | None) -> str:
    return "–" if x is None else f"{x:+.0f}" if x < 0 or x > 0 else "0"


def _ok(requests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in requests if r.get("status") == "ok" and r.get("kind") == kind]


def _summary_row(label: str, s: Summary) -> str:
    return f"| {label} | {_ms(s.median)} | {_ms(s.p90)} | {_ms(s.minimum)} | {_ms(s.maximum)} | {s.n} |"


def latency_table(requests: list[dict[str, Any]]) -> list[str]:
    lines = ["| metric (ms) | median | p90 | min | max | n |", "|---|---|---|---|---|---|"]
    metrics = [("TTFT", "ttft_s"), ("server TTFT (/metrics)", "server_ttft_s"), ("TPOT", "tpot_s"),
               ("E2E", "e2e_s"), ("wall (whole request)", "wall_s")]
    groups = [("cold", _ok(requests, "cold")), ("warm", _ok(requests, "warm"))]
    for gap in sorted({r["idle_gap_s"] for r in _ok(requests, "idle")}):
        groups.append((f"after {gap:g} s idle", [r for r in _ok(requests, "idle") if r["idle_gap_s"] == gap]))
    for kind, rows in groups:
        if not rows:
            continue
        for name, key in metrics:
            vals = [r.get(key) for r in rows]
            if any(v is not None for v in vals):
                lines.append(_summary_row(f"{kind} {name}", summarize(vals)))
    return lines


def drop_ratios(requests: list[dict[str, Any]], key: str) -> list[tuple[int, float, float, float]]:
    """Per server: (server, first, second, first/second) for the cold request and the one after it."""
    out = []
    for s in sorted({r["server"] for r in requests}):
        mine = sorted((r for r in requests if r["server"] == s and r.get("status") == "ok"),
                      key=lambda r: r["index"])
        if len(mine) >= 2 and mine[0]["kind"] == "cold" and mine[0].get(key) and mine[1].get(key):
            a, b = mine[0][key], mine[1][key]
            out.append((s, a, b, a / b))
    return out


def phase_table(startup: dict[str, Any]) -> list[str]:
    lines = ["| phase (ends at log line) | from (s) | to (s) | duration (s) | server's own figure (s) |",
             "|---|---|---|---|---|"]
    for p in startup.get("phases") or []:
        lines.append(f"| {p['label']} | {p['start_s']:.2f} | {p['end_s']:.2f} | {p['duration_s']:.2f} | "
                     f"{_s(p.get('reported_s'))} |")
    if startup.get("unaccounted_s") is not None:
        last = (startup.get("phases") or [{}])[-1].get("end_s", 0.0)
        lines.append(f"| unaccounted (after the last log milestone, until /health 200) | {last:.2f} | "
                     f"{(startup.get('spawn_to_health_s') or last + startup['unaccounted_s']):.2f} | "
                     f"{startup['unaccounted_s']:.2f} | – |")
    return lines


def slo_paragraph(requests: list[dict[str, Any]], startups: list[dict[str, Any]], key: str) -> str:
    cold = summarize([r.get(key) for r in _ok(requests, "cold")])
    warm = summarize([r.get(key) for r in _ok(requests, "warm")])
    ready = summarize([s.get("spawn_to_health_s") for s in startups if s.get("spawn_to_health_s")])
    first = summarize([s.get("spawn_to_first_token_s") for s in startups if s.get("spawn_to_first_token_s")])
    what = "TTFT" if key == "ttft_s" else "request wall time"
    parts = []
    if cold.n and warm.n:
        ratio = cold.median / warm.median
        extra = cold.median - warm.median
        slo = cold.minimum
        met = sum(1 for r in _ok(requests, "warm") if (r.get(key) or math.inf) <= slo)
        missed = sum(1 for r in _ok(requests, "cold") if (r.get(key) or 0.0) > slo)
        parts.append(
            f"The first request on a fresh server had a median {what} of {_ms(cold.median)} ms against "
            f"{_ms(warm.median)} ms once warm: a first-request penalty of {ratio:.1f}× "
            f"({_ms(extra)} ms more; n = {cold.n} cold, {warm.n} warm). A {what} SLO set at the fastest cold "
            f"request's {_ms(slo)} ms would be missed by {missed} of {cold.n} cold requests and met by "
            f"{met} of {warm.n} warm ones; warm p90 is {_ms(warm.p90)} ms.")
    elif cold.n:
        parts.append(f"Only cold requests were measured: median {what} {_ms(cold.median)} ms (n = {cold.n}).")
    if ready.n:
        times = ready.median / cold.median if cold.n and cold.median > 0 else math.nan
        parts.append(
            ("" if math.isnan(times) else f"Start-up took {times:.0f}× the cold request's median {what}: ")
            + "the server needed a median "
            f"{ready.median:.1f} s (max {ready.maximum:.1f} s) from process start to /health 200"
            + (f" and {first.median:.1f} s to its first token" if first.n else "")
            + ". A replica that is started on demand therefore misses any interactive SLO for the request "
            "that triggered it; capacity must come from a warm pool sized for the peak arrival rate over "
            f"that {ready.median:.0f} s start-up window, and each new replica should be sent one throw-away "
            "request before it joins the pool, so that no user pays the cold penalty.")
    idle = _ok(requests, "idle")
    if idle and warm.n:
        worst_gap = max(r["idle_gap_s"] for r in idle)
        after = summarize([r.get(key) for r in idle if r["idle_gap_s"] == worst_gap])
        ratio = after.median / warm.median
        head = (f"After {worst_gap:g} s without traffic the median {what} was {_ms(after.median)} ms "
                f"({ratio:.1f}× warm, n = {after.n})")
        if ratio >= 1.5:
            parts.append(head + ": a low-traffic service can miss its SLO without any restart; a keep-alive "
                         "request more often than that gap (or a pool busy enough never to idle that long) "
                         "avoids it.")
        else:
            parts.append(head + ": idling that long did not cost much here.")
    return " ".join(parts) if parts else "No successful requests: nothing to say about SLOs."


def memory_section(sampler: MemorySampler) -> list[str]:
    lines: list[str] = []
    if sampler.gpu_reason:
        lines.append(f"GPU memory: not sampled — {sampler.gpu_reason}.")
    if not sampler.enabled:
        return lines + ["Memory sampling was off (--no-sampler)."]
    ext = timeline.extremes(sampler.rows)
    if not ext:
        return lines + ["No memory samples (no server process to sample)."]
    serving = timeline.extremes(sampler.rows, timeline.serving_windows(sampler.markers))
    lines += ["", "| series | min while serving (MiB) | max while serving | min whole run | max whole run |",
              "|---|---|---|---|---|"]
    for name, (lo, hi) in ext.items():
        s_lo, s_hi = serving.get(name, (None, None))
        lines.append(f"| {name} | {_f0(s_lo)} | {_f0(s_hi)} | {lo:.0f} | {hi:.0f} |")
    js = timeline.jumps(sampler.rows, sampler.markers)
    if js:
        lines += ["", "| server | series | before cold (MiB) | after cold | after last warm | cold jump "
                  "| warm jump |",
                  "|---|---|---|---|---|---|---|"]
        for j in js:
            lines.append(f"| {j.server} | {j.series} | {_f0(j.before_cold)} | {_f0(j.after_cold)} | "
                         f"{_f0(j.after_warm)} | {_mb(j.cold_jump)} | {_mb(j.warm_jump)} |")
    if sampler.has_container:
        host = ("container usage and working set come from the Docker engine's stats stream (a new value "
                "about once a second, held between values), computed as `docker stats` does: working set = "
                "usage − inactive file cache")
    else:
        host = "server RSS is the sum over the server's process tree (shared pages counted in each process)"
    lines.append(f"\nSampled at {sampler.hz:g} Hz ({len(sampler.rows)} samples); {host}. "
                 "Timeline: `memory_timeline.csv`, `memory_timeline.png`.")
    return lines


def _f0(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}"


def write(results: ResultsDir, config: ServeConfig, requests: list[dict[str, Any]],
          startups: list[dict[str, Any]], sampler: MemorySampler, error: str | None) -> Path:
    key = "ttft_s" if any(r.get("ttft_s") is not None for r in requests) else "wall_s"
    out = [f"# First-token latency and warm start: {config.model} on {config.engine}", ""]
    if error:
        out += [f"**Run stopped early:** {error}", ""]
    where = (f"attached to {config.url}" if config.attach
             else f"{config.cold_starts} fresh server(s), runner {config.runner}")
    gaps = f", idle gaps {list(config.idle_gaps)} s" if config.idle_gaps else ""
    out += [f"{where}; {config.warm_requests} warm request(s) per server, max_tokens {config.max_tokens}, "
            f"mode {config.request_mode}{gaps}.", ""]

    out += ["## Cold vs warm wall time (as the seed's curl)", "",
            "| server | cold_req_real_s | warm_req_real_s | first/second |", "|---|---|---|---|"]
    for s, a, b, ratio in drop_ratios(requests, "wall_s"):
        out.append(f"| {s} | {a:.4f} | {b:.4f} | {ratio:.2f}× |")
    out += ["", "## Latency (cold = first request on a fresh server; warm = the ones right after)", ""]
    out += latency_table(requests) + [""]
    drops = drop_ratios(requests, key)
    if drops:
        ratios = [d[3] for d in drops]
        what = "TTFT" if key == "ttft_s" else "wall time"
        out.append(f"First-to-second drop in {what}: median {summarize(ratios).median:.2f}× "
                   f"(per server: {', '.join(f'{r:.2f}×' for r in ratios)}).")
        out.append("")
    failed = [r for r in requests if r.get("status") != "ok"]
    if failed:
        out += [f"Failed requests: {len(failed)} — " + "; ".join(sorted({r['failure'] for r in failed})), ""]

    out += ["## Start-up", ""]
    if config.attach:
        out += ["Attached to a running server: no start-up figures.", ""]
    for st in startups:
        out.append(f"### Server {st['server']} ({st.get('status')})")
        out.append("")
        cache = st.get("compile_cache") or {}
        if cache.get("mode"):
            out.append(f"torch.compile cache: {cache['mode']}"
                       + (f" (the log shows a cache {cache['use']})" if cache.get("use") else "") + ".")
            out.append("")
        out.append(f"spawn → /health 200: {_s(st.get('spawn_to_health_s'))} s; → /v1/models: "
                   f"{_s(st.get('spawn_to_models_s'))} s; → first token: "
                   f"{_s(st.get('spawn_to_first_token_s'))} s.")
        if st.get("failure"):
            out += ["", f"Fault: {st['failure']}" + (f" — server {st['exit']}" if st.get("exit") else "")]
            if st.get("log_tail"):
                out += ["", "Server log tail:", "", "```", *[ln[-220:] for ln in st["log_tail"]], "```"]
            else:
                out += ["", "The server had logged nothing."]
        out += ["", *phase_table(st), "",
                "Times are from line arrival (s since spawn); the server's own figure is the duration the "
                "line itself reports, which may span several phases (vLLM's `init engine ... took` covers "
                "profiling, KV cache and warm-up).", ""]
        maps = st.get("allocators_mapped") or {}
        libs = sorted({lib.rsplit("/", 1)[-1] for v in maps.values() for lib in v})
        preloads = sorted({p["ld_preload"] for p in st.get("processes") or [] if p.get("ld_preload")})
        if maps:
            out.append(f"Allocator/OpenMP libraries mapped by the server tree: {', '.join(libs) or 'none'}; "
                       f"LD_PRELOAD seen: {', '.join(preloads) or 'none'}.")
            if st.get("server_preload"):
                ok = st.get("preload_verified")
                out.append(f"--server-preload {st['server_preload']}: "
                           + ("mapped by every server process." if ok else "NOT mapped by every server process "
                              "(see startup.jsonl allocators_mapped)."))
            out.append("")

    out += ["## Memory timeline", "", *memory_section(sampler), ""]
    out += ["## What this means for SLOs", "", slo_paragraph(requests, startups, key), ""]
    out += ["Raw data: `requests.jsonl`, `startup.jsonl`, `server-*.log`, `config.json`, "
            "`environment.json`.", ""]
    return results.write_text(REPORT_FILE, "\n".join(out))
