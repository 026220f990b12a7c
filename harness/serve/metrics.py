"""The server's own TTFT from Prometheus `/metrics`: histogram sum/count deltas around a request."""

from __future__ import annotations

import re
from dataclasses import dataclass

import httpx

TTFT_METRIC = "vllm:time_to_first_token_seconds"
_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")


@dataclass(frozen=True)
class HistogramTotals:
    sum: float
    count: float


def parse_histogram(text: str, metric: str = TTFT_METRIC) -> HistogramTotals | None:
    """Sum and count of a histogram over all label sets (engines/models); None if absent."""
    total_sum = total_count = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        name = m.group("name")
        if name == metric + "_sum":
            total_sum += float(m.group("value"))
            found = True
        elif name == metric + "_count":
            total_count += float(m.group("value"))
            found = True
    return HistogramTotals(total_sum, total_count) if found else None


def scrape(client: httpx.Client, base_url: str, metric: str = TTFT_METRIC) -> HistogramTotals | None:
    """None when the server has no /metrics or no such histogram (e.g. `transformers serve`)."""
    try:
        resp = client.get(base_url + "/metrics", timeout=5.0)
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    return parse_histogram(resp.text, metric)


def mean_delta(before: HistogramTotals | None, after: HistogramTotals | None) -> float | None:
    """Mean of the observations between two scrapes (one request at concurrency 1: its value)."""
    if before is None or after is None or after.count <= before.count:
        return None
    return (after.sum - before.sum) / (after.count - before.count)
