"""memory_timeline.csv / .png and the figures the report quotes from them (min, max, jumps)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.measure.records import StartupRecord, TimelineMeta, TimelineSample
from harness.measure.results import ResultsDir, save_figure
from harness.serve.phases import SHORT
from harness.serve.sampler import Marker, MemorySampler

CSV_FILE = "serve/memory_timeline.csv"
PNG_FILE = "serve/memory_timeline.png"
META_FILE = "serve/timeline.json"


@dataclass
class Timeline:
    """The samples and markers of one serve run, and how they were taken: what the report and the plot
    read, from the live sampler or back from disk (`load`)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    hz: float = 20.0
    enabled: bool = True
    gpu_reason: str | None = None
    has_container: bool = False

    def columns(self) -> list[str]:
        names = series_names(self.rows)
        gpus = [n for n in names if n.startswith("gpu")]
        host = [n for n in names if not n.startswith("gpu")] or (["server_rss_mb"] if not self.has_container
                                                                   else ["container_usage_mb"])
        return ["t_s", *host, *gpus, "marker"]

    def csv_rows(self) -> list[dict[str, Any]]:
        """Samples and markers merged in time order; a marker row carries only t_s and its label."""
        merged = [TimelineSample(t_s=r["t_s"], values={k: v for k, v in r.items() if k != "t_s"}) for r in self.rows]
        merged += [TimelineSample(t_s=m.t_s, marker=f"{m.kind}:{m.label}") for m in self.markers]
        return [s.to_dict() for s in sorted(merged, key=lambda s: s.t_s)]

    def meta(self) -> TimelineMeta:
        return TimelineMeta(hz=self.hz, enabled=self.enabled, gpu_reason=self.gpu_reason,
                            has_container=self.has_container)


def from_sampler(sampler: MemorySampler) -> Timeline:
    return Timeline(list(sampler.rows), list(sampler.markers), sampler.hz, sampler.enabled, sampler.gpu_reason,
                    sampler.has_container)


def load(results: ResultsDir) -> Timeline:
    """The timeline of a finished run, from memory_timeline.csv and timeline.json."""
    meta = TimelineMeta.load(results.read_json(META_FILE) or {})
    csv_path = results.root / CSV_FILE
    rows, markers = load_csv(csv_path) if csv_path.exists() else ([], [])
    return Timeline(rows, markers, meta.hz, meta.enabled, meta.gpu_reason, meta.has_container)


def series_names(rows: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for r in rows:
        for k in r:
            if k.endswith("_mb") and k not in names:
                names.append(k)
    return names


def value_at(rows: list[dict[str, Any]], name: str, t: float, after: bool = False) -> float | None:
    """Last sample at or before t (or first at or after t when `after`)."""
    pts = [(r["t_s"], r[name]) for r in rows if r.get(name) is not None]
    if after:
        later = [v for ts, v in pts if ts >= t]
        return later[0] if later else None
    earlier = [v for ts, v in pts if ts <= t]
    return earlier[-1] if earlier else None


def value_between(rows: list[dict[str, Any]], name: str, start: float, end: float) -> float | None:
    """The last sample in [start, end): the state after one event and before the next."""
    inside = [r[name] for r in rows if r.get(name) is not None and start <= r["t_s"] < end]
    return inside[-1] if inside else None


@dataclass(frozen=True)
class Jump:
    server: int
    series: str
    before_cold: float | None
    after_cold: float | None
    after_warm: float | None
    nearest: bool = False  # a reading after a request is the sample nearest its end (none fell after it)

    @property
    def cold_jump(self) -> float | None:
        return _diff(self.after_cold, self.before_cold)

    @property
    def warm_jump(self) -> float | None:
        return _diff(self.after_warm, self.after_cold)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def jumps(rows: list[dict[str, Any]], markers: list[Marker]) -> list[Jump]:
    """Per server and series: memory just before the cold request, after it, after the last warm one."""
    out: list[Jump] = []
    servers = sorted({int(m.label.split()[0][1:]) for m in markers if m.label.startswith("s") and
                      m.kind in ("request_start", "request_end") and m.label.split()[0][1:].isdigit()})
    for s in servers:
        mine = [m for m in markers if m.label.split()[0] == f"s{s}"]
        cold_start = next((m.t_s for m in mine if m.kind == "request_start" and "cold" in m.label), None)
        cold = _request_span(mine, "cold")
        warms = [m.label for m in mine if m.kind == "request_end" and "warm" in m.label]
        warm = _request_span(mine, warms[-1].split()[1]) if warms else None
        if cold_start is None:
            continue
        stop = next((m.t_s for m in mine if m.kind == "stop" and m.t_s > cold_start), math.inf)
        for name in series_names(rows):
            (after_cold, near_cold), (after_warm, near_warm) = (_reading_after(rows, name, mine, span, stop)
                                                                for span in (cold, warm))
            out.append(Jump(s, name, value_at(rows, name, cold_start), after_cold, after_warm,
                            nearest=near_cold or near_warm))
    return out


def _request_span(mine: list[Marker], what: str) -> tuple[float, float] | None:
    """(start, end) of this server's request `what` ("cold", "warm2"), once it ended."""
    start = next((m.t_s for m in mine if m.kind == "request_start" and m.label.split()[1:2] == [what]), None)
    end = next((m.t_s for m in mine if m.kind == "request_end" and m.label.split()[1:2] == [what]), None)
    return None if start is None or end is None else (start, end)


def _reading_after(rows: list[dict[str, Any]], name: str, mine: list[Marker], span: tuple[float, float] | None,
                   stop: float) -> tuple[float | None, bool]:
    """The state after a request: the last sample after its end and before this server's next marker (its
    next request, an idle gap or the stop request); where none fell in that gap (requests a few ms apart),
    the sample nearest its end, from its start until the stop request: never a reading taken while the
    server was already stopping. With whether it is that nearest one."""
    if span is None:
        return None, False
    start, end = span
    following = [m.t_s for m in mine if m.t_s > end]
    between = value_between(rows, name, end, min(following) if following else math.inf)
    if between is not None:
        return between, False
    near = [(abs(r["t_s"] - end), r[name]) for r in rows
            if r.get(name) is not None and start <= r["t_s"] < stop]
    return (min(near, key=lambda pair: pair[0])[1], True) if near else (None, False)


def serving_windows(markers: list[Marker]) -> list[tuple[float, float]]:
    """(ready, stop) per server: the time it was up and answering."""
    readies = [m.t_s for m in markers if m.kind == "ready"]
    stops = [m.t_s for m in markers if m.kind == "stop"]
    return [(r, next((s for s in stops if s >= r), math.inf)) for r in readies]


def extremes(rows: list[dict[str, Any]], windows: list[tuple[float, float]] | None = None
             ) -> dict[str, tuple[float, float]]:
    """Min and max per series, over all samples or only those inside `windows`."""
    if windows is not None:
        rows = [r for r in rows if any(a <= r["t_s"] <= b for a, b in windows)]
    out = {}
    for name in series_names(rows):
        vals = [r[name] for r in rows if r.get(name) is not None and math.isfinite(r[name])]
        if vals:
            out[name] = (min(vals), max(vals))
    return out


def peaks(rows: list[dict[str, Any]], start: float, end: float) -> dict[str, float]:
    """Each series' highest sample in [start, end] (one server's life), and `gpu_used_mb`: the highest
    sum over the GPUs at one sample, where there are GPU series."""
    window = [r for r in rows if start <= r["t_s"] <= end]
    out = {name: hi for name, (_, hi) in extremes(window).items()}
    gpu_sums = [sum(v for k, v in r.items() if k.startswith("gpu") and k.endswith("_used_mb") and v is not None)
                for r in window if any(k.startswith("gpu") for k in r)]
    if gpu_sums:
        out["gpu_used_mb"] = max(gpu_sums)
    return out


def load_csv(path: str | Path) -> tuple[list[dict[str, Any]], list[Marker]]:
    """Samples and markers back from memory_timeline.csv (to redraw or re-report a run)."""
    from harness.measure.results import read_csv

    rows: list[dict[str, Any]] = []
    markers: list[Marker] = []
    for sample in (TimelineSample.load(r) for r in read_csv(path)):
        if sample.marker:
            kind, _, label = sample.marker.partition(":")
            markers.append(Marker(sample.t_s, label, kind))
        else:
            rows.append({"t_s": sample.t_s, **sample.values})
    return rows, markers


def save(results: ResultsDir, timeline: Timeline) -> Path:
    """The samples (CSV) and their markers and series (JSON): what `load` reads back."""
    csv_path = results.write_csv(CSV_FILE, timeline.columns(), timeline.csv_rows())
    results.write_record(META_FILE, timeline.meta())
    return csv_path


MAX_ZOOMS = 3
COLORS = {"spawn": "tab:gray", "ready": "tab:green", "stop": "tab:red", "event": "tab:purple"}


def request_spans(markers: list[Marker]) -> list[tuple[str, float, float]]:
    """(label, start, end) of each request, from its start/end markers."""
    ends = [m for m in markers if m.kind == "request_end"]
    out = []
    for st in (m for m in markers if m.kind == "request_start"):
        en = next((e for e in ends if e.label == st.label and e.t_s >= st.t_s), None)
        out.append((st.label, st.t_s, en.t_s if en else st.t_s))
    return out


def _draw(ax: Any, rows: list[dict[str, Any]], markers: list[Marker], every_label: bool,
          window: tuple[float, float] | None = None) -> None:
    if window:
        rows = [r for r in rows if window[0] <= r["t_s"] <= window[1]]
    for name in series_names(rows):
        pts = [(r["t_s"], r[name]) for r in rows if r.get(name) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2,
                    label=name.replace("_mb", "").replace("_", " ") + " (MiB)")
    lo, hi = window or (-float("inf"), float("inf"))
    top = ax.get_ylim()[1]
    for m in markers:
        if m.kind in COLORS and lo <= m.t_s <= hi:
            ax.axvline(m.t_s, color=COLORS[m.kind], ls="--", lw=0.8)
            ax.text(m.t_s, top, " " + m.label, rotation=90, va="top", ha="right", fontsize=7,
                    color=COLORS[m.kind])
    for label, t0, t1 in request_spans(markers):
        if not lo <= t0 <= hi:
            continue
        color = "tab:orange" if "cold" in label else "tab:blue"
        ax.axvspan(t0, max(t1, t0 + 0.005), color=color, alpha=0.3)
        if every_label or "cold" in label:
            ax.text(t0, top * 0.7, " " + label, rotation=90, va="top", fontsize=7, color=color)
    ax.set_ylabel("MiB")
    ax.grid(alpha=0.3)


def phase_bands(markers: list[Marker], startups: list[StartupRecord]) -> list[tuple[str, float, float]]:
    """(short label, start, end) on the sampler's clock for every start-up phase of every server: the
    phases are timed from spawn, and each server's spawn marker places them."""
    out = []
    for st in startups:
        spawn = next((m.t_s for m in markers if m.kind == "spawn" and m.label == f"s{st.server} spawn"), None)
        if spawn is None:
            continue
        for p in st.phases or []:
            out.append((SHORT.get(p["key"], p["key"]), spawn + p["start_s"], spawn + p["end_s"]))
    return out


BAND_COLORS = ("#e8e8ff", "#fff0d8", "#e0f4e0", "#f8e0f0", "#e0f0f8", "#f4f4d8")


def _draw_bands(ax: Any, bands: list[tuple[str, float, float]]) -> None:
    """Each start-up phase as a shaded band, labelled at the bottom where it is wide enough to read."""
    if not bands:
        return
    lo, hi = ax.get_xlim()
    min_width = 0.008 * (hi - lo)
    bottom = ax.get_ylim()[0]
    for i, (label, t0, t1) in enumerate(bands):
        ax.axvspan(t0, t1, color=BAND_COLORS[i % len(BAND_COLORS)], alpha=0.9, lw=0, zorder=0)
        if t1 - t0 >= min_width:
            ax.text((t0 + t1) / 2, bottom, label + " ", rotation=90, va="bottom", ha="center", fontsize=6.5,
                    color="0.35", zorder=1)


def plot(path: Path, timeline: Timeline, startups: list[StartupRecord] | None = None) -> Path | None:
    """Top: the whole run (start-up phases as bands, spawn/ready/stop lines, request spans). Below: each
    server's requests zoomed."""
    rows, markers, gpu_reason = timeline.rows, timeline.markers, timeline.gpu_reason
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spans = request_spans(markers)
    servers = sorted({label.split()[0] for label, _, _ in spans})[:MAX_ZOOMS]
    fig = plt.figure(figsize=(13, 8.5 if servers else 5.5), dpi=110)
    grid = fig.add_gridspec(2 if servers else 1, max(len(servers), 1),
                            height_ratios=[3, 2] if servers else [1])
    ax = fig.add_subplot(grid[0, :])
    _draw(ax, rows, markers, every_label=False)
    _draw_bands(ax, phase_bands(markers, startups or []))
    ax.set_xlabel("time since sampler start (s); shaded bands: start-up phases from the server log")
    title = "Server memory timeline"
    if gpu_reason:
        title += f" (no GPU series: {gpu_reason.replace('no GPU series: ', '')[:60]})"
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize=8)
    for i, server in enumerate(servers):
        mine = [(t0, t1) for label, t0, t1 in spans if label.split()[0] == server]
        pad = max(0.2, 0.05 * (mine[-1][1] - mine[0][0]))
        window = (mine[0][0] - pad, mine[-1][1] + pad)
        zoom = fig.add_subplot(grid[1, i])
        _draw(zoom, rows, markers, every_label=True, window=window)
        zoom.set_xlim(*window)
        zoom.set_title(f"{server}: requests (zoom)", fontsize=9)
        zoom.set_xlabel("s")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tight_layout complains about long rotated labels; harmless
        fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path
