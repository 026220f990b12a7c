"""memory_timeline.csv / .png and the figures the report quotes from them (min, max, jumps)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.results import ResultsDir
from harness.serve.sampler import Marker, MemorySampler

CSV_FILE = "serve/memory_timeline.csv"
PNG_FILE = "serve/memory_timeline.png"


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


@dataclass(frozen=True)
class Jump:
    server: int
    series: str
    before_cold: float | None
    after_cold: float | None
    after_warm: float | None

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
        cold_end = next((m.t_s for m in mine if m.kind == "request_end" and "cold" in m.label), None)
        warm_ends = [m.t_s for m in mine if m.kind == "request_end" and "warm" in m.label]
        if cold_start is None:
            continue
        for name in series_names(rows):
            out.append(Jump(s, name, value_at(rows, name, cold_start),
                            value_at(rows, name, cold_end, after=True) if cold_end is not None else None,
                            value_at(rows, name, warm_ends[-1], after=True) if warm_ends else None))
    return out


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


def load_csv(path: str | Path) -> tuple[list[dict[str, Any]], list[Marker]]:
    """Samples and markers back from memory_timeline.csv (to redraw or re-report a run)."""
    from harness.results import read_csv

    rows: list[dict[str, Any]] = []
    markers: list[Marker] = []
    for r in read_csv(path):
        t = float(r["t_s"])
        if r.get("marker"):
            kind, _, label = r["marker"].partition(":")
            markers.append(Marker(t, label, kind))
        else:
            rows.append({"t_s": t, **{k: float(v) for k, v in r.items() if k.endswith("_mb") and v != ""}})
    return rows, markers


def write(results: ResultsDir, sampler: MemorySampler) -> tuple[Path, Path | None]:
    csv_path = results.write_csv(CSV_FILE, sampler.columns(), sampler.csv_rows())
    return csv_path, plot(results.path(PNG_FILE), sampler.rows, sampler.markers, sampler.gpu_reason)


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


def plot(path: Path, rows: list[dict[str, Any]], markers: list[Marker],
         gpu_reason: str | None) -> Path | None:
    """Top: the whole run (spawn/ready/stop lines, request spans). Below: each server's requests zoomed."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spans = request_spans(markers)
    servers = sorted({label.split()[0] for label, _, _ in spans})[:MAX_ZOOMS]
    fig = plt.figure(figsize=(12, 8 if servers else 5), dpi=110)
    grid = fig.add_gridspec(2 if servers else 1, max(len(servers), 1),
                            height_ratios=[3, 2] if servers else [1])
    ax = fig.add_subplot(grid[0, :])
    _draw(ax, rows, markers, every_label=False)
    ax.set_xlabel("time since sampler start (s)")
    title = "Server memory timeline"
    if gpu_reason:
        title += f" (no GPU series: {gpu_reason.replace('no GPU series: ', '')[:60]})"
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
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
    fig.savefig(path)
    plt.close(fig)
    return path
