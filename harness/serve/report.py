"""DIR/serve/first_token_latency.md: every figure computed from requests, start-ups and the timeline."""

from __future__ import annotations

import math
from pathlib import Path

from harness.measure.records import ServeEnd, ServeRequest, StartupRecord
from harness.measure.results import ResultsDir
from harness.measure.stats import Summary, summarize
from harness.serve import comparison, duet_stats, startup, timeline
from harness.serve.config import ServeConfig
from harness.serve.timeline import Timeline

REPORT_FILE = "serve/first_token_latency.md"
REQUESTS_FILE = "serve/requests.jsonl"
STARTUP_FILE = "serve/startup.jsonl"
CONFIG_FILE = "serve/config.json"
END_FILE = "serve/end.json"  # how the run ended (ServeEnd): why it stopped early, or that it did not
# serve-request/2: streamed e2e_s and tpot_s end at the last token event (vLLM's benchmark client);
# serve-request/1 records ended them after the usage chunk and [DONE].
REQUEST_SCHEMA = "serve-request/2"


def _ms(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x * 1e3:.1f}"


def _s(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.2f}"


def _mb(x: float | None) -> str:
    return "–" if x is None else f"{x:+.0f}" if x < 0 or x > 0 else "0"


def _ok(requests: list[ServeRequest], kind: str) -> list[ServeRequest]:
    return [r for r in requests if r.status == "ok" and r.kind == kind]


def _summary_row(label: str, s: Summary) -> str:
    return f"| {label} | {_ms(s.median)} | {_ms(s.p90)} | {_ms(s.minimum)} | {_ms(s.maximum)} | {s.n} |"


def latency_table(requests: list[ServeRequest]) -> list[str]:
    lines = ["| metric (ms) | median | p90 | min | max | n |", "|---|---|---|---|---|---|"]
    older = any(r.ends_at_stream_end for r in requests)
    e2e = "E2E (to the end of the stream: serve-request/1 records)" if older else "E2E (to the last token)"
    metrics = [("TTFT", "ttft_s"), ("server TTFT (/metrics)", "server_ttft_s"), ("TPOT", "tpot_s"),
               (e2e, "e2e_s"), ("wall (whole request)", "wall_s")]
    groups = [("cold", _ok(requests, "cold")), ("warm", _ok(requests, "warm"))]
    for gap in sorted({r.idle_gap_s for r in _ok(requests, "idle")}):
        groups.append((f"after {gap:g} s idle", [r for r in _ok(requests, "idle") if r.idle_gap_s == gap]))
    for kind, rows in groups:
        if not rows:
            continue
        for name, key in metrics:
            vals = [getattr(r, key) for r in rows]
            if any(v is not None for v in vals):
                lines.append(_summary_row(f"{kind} {name}", summarize(vals)))
    return lines


def drop_ratios(requests: list[ServeRequest], key: str) -> list[tuple[int, float, float, float]]:
    """Per server: (server, first, second, first/second) for the cold request and the one after it."""
    out = []
    for s in sorted({r.server for r in requests}):
        mine = sorted((r for r in requests if r.server == s and r.status == "ok"),
                      key=lambda r: r.index)
        if len(mine) >= 2 and mine[0].kind == "cold" and getattr(mine[0], key) and getattr(mine[1], key):
            a, b = getattr(mine[0], key), getattr(mine[1], key)
            out.append((s, a, b, a / b))
    return out


def phase_table(record: StartupRecord) -> list[str]:
    total = record.spawn_to_health_s
    lines = ["| phase (the work that ends at its log line) | from (s) | to (s) | duration (s) | share | "
             "server's own figure (s) |", "|---|---|---|---|---|---|"]

    def share(d: float) -> str:
        return f"{100 * d / total:.1f} %" if total else "–"

    for p in record.phases or []:
        lines.append(f"| {p['label']} | {p['start_s']:.2f} | {p['end_s']:.2f} | {p['duration_s']:.2f} | "
                     f"{share(p['duration_s'])} | {_s(p.get('reported_s'))} |")
    if record.unaccounted_s is not None:
        last = (record.phases or [{}])[-1].get("end_s", 0.0)
        lines.append(f"| unaccounted (after the last log milestone, until /health 200) | {last:.2f} | "
                     f"{(total or last + record.unaccounted_s):.2f} | "
                     f"{record.unaccounted_s:.2f} | {share(record.unaccounted_s)} | – |")
    return lines


FIGURE_TEXT = [
    ("weights_gib", "weights {:.2f} GiB"), ("weights_s", "loaded in {:.2f} s"),
    ("dynamo_s", "Dynamo transform {:.2f} s"), ("graph_compile_s", "graph compile {:.2f} s"),
    ("graph_cache_load_s", "compiled graphs loaded from cache in {:.2f} s"),
    ("compile_s", "torch.compile {:.2f} s in total"), ("profile_run_s", "profiling run {:.2f} s"),
    ("kv_cache_gib", "KV cache {:.2f} GiB"), ("kv_cache_tokens", "{:,.0f} tokens"),
    ("graph_capture_s", "CUDA graphs captured in {:.0f} s"), ("graph_gib", "taking {:.2f} GiB"),
    ("init_engine_s", "engine init {:.2f} s"),
]


def figures_line(record: StartupRecord) -> str | None:
    """The server's own start-up figures in one sentence."""
    figures = record.server_figures or {}
    parts = [text.format(figures[key]) for key, text in FIGURE_TEXT if figures.get(key) is not None]
    return ("The server's own figures: " + "; ".join(parts) + ".") if parts else None


def silence_table(record: StartupRecord) -> list[str]:
    """Silent stretches of the log and what the server's stacks show it doing in each."""
    silent = record.silences or []
    if not silent:
        return []
    lines = ["Silent stretches (no log line for 2 s or more) and what the server was doing, from its Python "
             "stacks (share of that process's samples in the stretch):", "",
             "| from (s) | to (s) | duration (s) | in phase | stack samples | top frames |",
             "|---|---|---|---|---|---|"]
    for s in silent:
        top = "<br>".join(f"{100 * share:.0f} % {what.replace('|', '/')}" for what, share in s.get("top") or [])
        if not top:
            top = f"no stacks: {record.stacks_reason or 'no sample fell in this stretch'}"
        lines.append(f"| {s['start_s']:.2f} | {s['end_s']:.2f} | {s['end_s'] - s['start_s']:.2f} | {s['phase']} "
                     f"| {s.get('stack_samples', 0)} | {top} |")
    return lines + [""]


def imports_line(record: StartupRecord) -> str | None:
    """How much of each process's sampled start-up went to Python imports, and to compiling source."""
    shares = record.import_shares or {}
    parts = [f"{role} {100 * v['importing']:.0f} % importing ({100 * v['compiling_bytecode']:.0f} % compiling "
             f"source to bytecode; {v['samples']} samples)" for role, v in shares.items() if v["samples"] >= 5]
    return ("Stack samples over the whole start-up: " + "; ".join(parts) + ". Compiling to bytecode means the "
            "interpreter found no usable `.pyc` cache and pays that again at every start.") if parts else None


def coverage_line(record: StartupRecord) -> str | None:
    cov = record.coverage()
    if cov is None:
        return None
    silent = sum(s["end_s"] - s["start_s"] for s in record.silences or [])
    unnamed = sum(s["end_s"] - s["start_s"] for s in record.silences or [] if not s.get("top"))
    return (f"Named phases cover {100 * cov:.1f} % of spawn → /health 200; "
            f"{record.unaccounted_s or 0:.2f} s lie after the last milestone. The log was silent for "
            f"{silent:.1f} s in stretches of 2 s or more, {unnamed:.1f} s of it with no stack sample.")


def slo_paragraph(requests: list[ServeRequest], startups: list[StartupRecord], key: str) -> str:
    cold = summarize([getattr(r, key) for r in _ok(requests, "cold")])
    warm = summarize([getattr(r, key) for r in _ok(requests, "warm")])
    ready = summarize([s.spawn_to_health_s for s in startups if s.spawn_to_health_s])
    first = summarize([s.spawn_to_first_token_s for s in startups if s.spawn_to_first_token_s])
    what = "TTFT" if key == "ttft_s" else "request wall time"
    parts = []
    if cold.n and warm.n:
        ratio = cold.median / warm.median
        extra = cold.median - warm.median
        slo = cold.minimum
        met = sum(1 for r in _ok(requests, "warm") if (getattr(r, key) or math.inf) <= slo)
        missed = sum(1 for r in _ok(requests, "cold") if (getattr(r, key) or 0.0) > slo)
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
        worst_gap = max(r.idle_gap_s for r in idle)
        after = summarize([getattr(r, key) for r in idle if r.idle_gap_s == worst_gap])
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


def memory_section(sampler: Timeline) -> list[str]:
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
        lines += ["", "Readings: the last sample before the cold request; the last after it and before the next "
                  "request; the last after the last warm request and before anything else (idle gap, stop)."
                  + (" Where no sample fell between a request's end and the next event, the one nearest its end "
                     "(from its start, before the stop request)." if any(j.nearest for j in js) else ""), "",
                  "| server | series | before cold (MiB) | after cold | after last warm | cold jump "
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


def allocator_check_line(record: StartupRecord) -> str:
    """What each process of the server tree mapped as its malloc, and the verdict."""
    check = record.allocator_check
    procs = "; ".join(f"{p['role']} (pid {p['pid']}): "
                      f"{', '.join(lib.rsplit('/', 1)[-1] for lib in p['malloc']) or 'glibc malloc'}"
                      for p in check.get("processes") or [])
    verdict = "verified" if check.get("verified") else f"NOT verified — {check.get('reason')}"
    return f"Allocator {record.allocator}: {verdict}. Malloc per process: {procs or 'none read'}."


def _f0(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}"


def write(results: ResultsDir, config: ServeConfig, requests: list[ServeRequest],
          startups: list[StartupRecord], sampler: Timeline, error: str | None) -> Path:
    key = "ttft_s" if any(r.ttft_s is not None for r in requests) else "wall_s"
    out = [f"# First-token latency and warm start: {config.model} on {config.engine}", ""]
    if error:
        out += [f"**Run stopped early:** {error}", ""]
    where = (f"attached to {config.url}" if config.attach
             else f"{config.cold_starts} fresh server(s), runner {config.runner}")
    if config.allocators:
        where = (f"{len({s.round for s in startups})} round(s) of {len(config.allocators)} fresh servers "
                 f"(one per allocator), runner {config.runner}")
    if config.allocators and config.design == "duet":
        where = (f"{len({s.round for s in startups})} set(s) of {len(config.allocators)} fresh servers up at once "
                 f"(the duet design), runner {config.runner}")
    gaps = f", idle gaps {list(config.idle_gaps)} s" if config.idle_gaps else ""
    out += [f"{where}; {config.warm_requests} warm request(s) per server, max_tokens {config.max_tokens}, "
            f"mode {config.request_mode}{gaps}.", ""]
    if config.allocators and config.baseline:
        order = list(config.allocators)
        stops = [e for e in results.read_jsonl(comparison.STOP_FILE) if e.get("event") == "stop"]
        stop = stops[-1] if stops else None
        if config.design == "duet":
            out += duet_stats.section(results, startups, requests, order, config.baseline, config.warm_requests, stop)
        else:
            comparison.write(results, startups, requests, order, config.baseline)
            out += comparison.section(startups, requests, order, config.baseline, stop)

    out += ["## Cold vs warm wall time (as the seed's curl)", "",
            "| server | cold_req_real_s | warm_req_real_s | first/second |", "|---|---|---|---|"]
    for s, a, b, ratio in drop_ratios(requests, "wall_s"):
        out.append(f"| {s} | {a:.4f} | {b:.4f} | {ratio:.2f}× |")
    out += ["", "## Latency (cold = first request on a fresh server; warm = the ones right after)", ""]
    if config.allocators:
        out += ["All allocators' servers together, failed ones included; per allocator: see Allocators.", ""]
    out += latency_table(requests) + [""]
    drops = drop_ratios(requests, key)
    if drops:
        ratios = [d[3] for d in drops]
        what = "TTFT" if key == "ttft_s" else "wall time"
        out.append(f"First-to-second drop in {what}: median {summarize(ratios).median:.2f}× "
                   f"(per server: {', '.join(f'{r:.2f}×' for r in ratios)}).")
        out.append("")
    failed = [r for r in requests if r.status != "ok"]
    if failed:
        out += [f"Failed requests: {len(failed)} — " + "; ".join(sorted({r.failure for r in failed})), ""]

    out += ["## Start-up", ""]
    if config.attach:
        out += ["Attached to a running server: no start-up figures.", ""]
    for st in startups:
        arm = f", {st.allocator}, round {(st.round or 0) + 1}" if st.allocator else ""
        out.append(f"### Server {st.server} ({st.status}{arm})")
        out.append("")
        cache = st.compile_cache or {}
        if cache.get("mode"):
            triton = f"; Triton kernel cache {cache['triton']}" if cache.get("triton") else ""
            out.append(f"torch.compile cache: {cache['mode']}{triton}"
                       + (f" (the log shows a cache {cache['use']})" if cache.get("use") else "") + ".")
            out.append("")
        out.append(f"spawn → /health 200: {_s(st.spawn_to_health_s)} s; → /v1/models: "
                   f"{_s(st.spawn_to_models_s)} s; → first token: "
                   f"{_s(st.spawn_to_first_token_s)} s.")
        if st.failure:
            out += ["", f"Fault: {st.failure}" + (f" — server {st.exit}" if st.exit else "")]
            if st.log_tail:
                out += ["", "Server log tail:", "", "```", *[ln[-220:] for ln in st.log_tail], "```"]
            elif st.fault not in ("AllocatorMismatchError", "Interrupted"):
                out += ["", "The server had logged nothing."]
        out += ["", *phase_table(st), "",
                "Times are from line arrival (s since spawn); the server's own figure is the duration the "
                "line itself reports, which may span several phases (vLLM's `init engine ... took` covers "
                "profiling, KV cache and warm-up).", ""]
        out += [line for line in (coverage_line(st), figures_line(st), imports_line(st)) if line]
        out += ["", *silence_table(st)]
        maps = st.allocators_mapped or {}
        libs = sorted({lib.rsplit("/", 1)[-1] for v in maps.values() for lib in v})
        preloads = sorted({p["ld_preload"] for p in st.processes or [] if p.get("ld_preload")})
        if maps:
            out.append(f"Allocator/OpenMP libraries mapped by the server tree: {', '.join(libs) or 'none'}; "
                       f"LD_PRELOAD seen: {', '.join(preloads) or 'none'}.")
            if st.server_preload:
                ok = st.preload_verified
                out.append(f"--server-preload {st.server_preload}: "
                           + ("mapped by every server process." if ok else "NOT mapped by every server process "
                              "(see startup.jsonl allocators_mapped)."))
            out.append("")
        if st.allocator_check:
            out += [allocator_check_line(st), ""]

    out += ["## Memory timeline", "", *memory_section(sampler), ""]
    out += ["## What this means for SLOs", "", slo_paragraph(requests, startups, key), ""]
    out += ["Raw data: `requests.jsonl`, `startup.jsonl`, `server-*.log`, `config.json`, "
            "`environment.json`" + (f", `{comparison.CSV_FILE.split('/')[-1]}`" if config.allocators else "")
            + ".", ""]
    return results.write_text(REPORT_FILE, "\n".join(out))


def rebuild(results: ResultsDir) -> Path:
    """The report, timeline plot and start-up analysis from what the run left on disk: config.json,
    requests.jsonl, startup.jsonl (re-analysed from each server's log and stacks), end.json and the
    timeline CSV. A live run ends here too (once it wrote end.json), so that its report is exactly what
    `harness report` rebuilds later."""
    saved = results.read_json(CONFIG_FILE)
    if saved is None:
        raise FileNotFoundError(f"{results.root / CONFIG_FILE} is missing: not a serve run")
    config = ServeConfig.from_dict(saved)
    requests = results.read_records(REQUESTS_FILE, ServeRequest)
    startups = [startup.reanalyse(results.root, r) for r in results.read_records(STARTUP_FILE, StartupRecord)]
    if startups:
        results.rewrite_records(STARTUP_FILE, startups)
    snapshot = timeline.load(results)
    timeline.plot(results.path(timeline.PNG_FILE), snapshot, startups)
    return write(results, config, requests, startups, snapshot, _stop_line(results, config, startups))


def _stop_line(results: ResultsDir, config: ServeConfig, startups: list[StartupRecord]) -> str | None:
    """Why the run stopped early, or None when it ran to its end. A run older than end.json: its first
    failed start-up's failure, where that stopped it."""
    saved = results.read_json(END_FILE)
    if saved is not None:
        return ServeEnd.load(saved).stopped_early
    failures = [s.failure for s in startups if s.failure]
    # A comparison goes on past a failed server (its section lists them); a plain run stops at the first.
    stopped = failures and (not config.allocators or len(failures) == len(startups))
    return failures[0] if stopped else None
