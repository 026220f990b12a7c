"""OpenAI-compatible client: the seed's whole-request wall time, and streamed TTFT/ITL/TPOT/E2E.

Clocks are `time.perf_counter()`, started just before the request is handed to httpx (as curl's
wall time starts before connecting). TTFT is taken at the first SSE event that carries non-empty
text, not at the first byte: servers send role-only or empty chunks first.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx


class RequestError(RuntimeError):
    """A request that did not produce a measurement; `kind` says why."""

    def __init__(self, message: str, kind: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind  # "http" | "wrong_model" | "not_streaming" | "transport" | "empty" | "server_error"
        self.status = status


@dataclass
class RequestResult:
    mode: str  # "stream" | "plain"
    wall_s: float  # request handed to httpx -> last byte read
    ttft_s: float | None = None
    e2e_s: float | None = None
    tpot_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    n_events: int = 0  # SSE events with non-empty text
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    text: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def completion_body(model: str, prompt: str, max_tokens: int, stream: bool,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """`extra` carries engine-specific fields, e.g. vLLM's ignore_eos (random weights hit EOS early)."""
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                            **(extra or {})}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def iter_sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The payload of each `data:` field; comments and other fields are skipped."""
    for line in lines:
        if line.startswith("data:"):
            yield line[5:].lstrip(" ")


def event_text(event: dict[str, Any]) -> str:
    """Text in a completions or chat-completions chunk ('' for role-only / usage-only chunks)."""
    parts = []
    for choice in event.get("choices") or []:
        if choice.get("text"):
            parts.append(choice["text"])
        delta = choice.get("delta") or {}
        if delta.get("content"):
            parts.append(delta["content"])
    return "".join(parts)


def transport_reason(exc: httpx.HTTPError) -> str:
    """What went wrong on the wire, in words: '[Errno 111] Connection refused', not ConnectError(...)."""
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer in time ({type(exc).__name__})"
    return str(exc) or type(exc).__name__


def stream_error(event: dict[str, Any]) -> str | None:
    """The message of an error event in a stream (vLLM sends one when its engine fails mid-request)."""
    error = event.get("error")
    if not error:
        return None
    return str(error.get("message") or error if isinstance(error, dict) else error)[:300]


def _error_message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
        err = data.get("error") or data.get("detail") or data
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    except (json.JSONDecodeError, ValueError, AttributeError):
        return resp.text[:300]


def _raise_for_status(resp: httpx.Response, model: str) -> None:
    if resp.status_code == 200:
        return
    msg = _error_message(resp)
    if resp.status_code == 404 or (resp.status_code == 400 and "model" in msg.lower()):
        raise RequestError(f"server rejected model {model!r}: {msg}", "wrong_model", resp.status_code)
    raise RequestError(f"HTTP {resp.status_code}: {msg}", "http", resp.status_code)


def plain_request(client: httpx.Client, base_url: str, model: str, prompt: str, max_tokens: int,
                  extra: dict[str, Any] | None = None) -> RequestResult:
    """One non-streamed completion, timed end to end as `/usr/bin/time curl` does."""
    body = completion_body(model, prompt, max_tokens, stream=False, extra=extra)
    t0 = time.perf_counter()
    try:
        resp = client.post(base_url + "/v1/completions", json=body)
        resp.read()
    except httpx.TransportError as exc:
        raise RequestError(f"request failed: {transport_reason(exc)}", "transport") from exc
    wall = time.perf_counter() - t0
    _raise_for_status(resp, model)
    try:
        data = resp.json()
    except ValueError:
        raise RequestError(f"server answered 200 but not JSON: {resp.text[:80]!r}", "http", 200) from None
    usage = data.get("usage") or {}
    choice = (data.get("choices") or [{}])[0]
    return RequestResult(mode="plain", wall_s=wall, e2e_s=wall, text=event_text(data),
                         prompt_tokens=usage.get("prompt_tokens"),
                         completion_tokens=usage.get("completion_tokens"),
                         finish_reason=choice.get("finish_reason"))


def stream_request(client: httpx.Client, base_url: str, model: str, prompt: str, max_tokens: int,
                   extra: dict[str, Any] | None = None) -> RequestResult:
    """One streamed completion: TTFT, inter-token latencies, TPOT, E2E and the server's usage."""
    body = completion_body(model, prompt, max_tokens, stream=True, extra=extra)
    t0 = time.perf_counter()
    times: list[float] = []
    texts: list[str] = []
    usage: dict[str, Any] = {}
    finish = None
    try:
        with client.stream("POST", base_url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                resp.read()
                _raise_for_status(resp, model)
            ctype = resp.headers.get("content-type", "")
            if "text/event-stream" not in ctype:
                resp.read()
                raise RequestError(f"server does not stream: asked for stream=true, got {ctype or 'no'} "
                                   "content type (use --request-mode plain for this server)", "not_streaming")
            for data in iter_sse_data(resp.iter_lines()):
                if data.strip() == "[DONE]":
                    break
                try:
                    event = json.loads(data)
                except json.JSONDecodeError:
                    continue
                error = stream_error(event)
                if error:
                    raise RequestError(f"the server reported an error after {len(times)} tokens: {error}",
                                       "server_error")
                text = event_text(event)
                if text:
                    times.append(time.perf_counter() - t0)
                    texts.append(text)
                for choice in event.get("choices") or []:
                    finish = choice.get("finish_reason") or finish
                if event.get("usage"):
                    usage = event["usage"]
    except httpx.TransportError as exc:
        raise RequestError(f"stream broke after {len(times)} tokens: {transport_reason(exc)}", "transport") from exc
    wall = time.perf_counter() - t0
    if not times:
        raise RequestError("stream ended without any text", "empty")
    return summarize_stream(times, wall, texts, usage, finish)


def summarize_stream(times: list[float], e2e: float, texts: list[str], usage: dict[str, Any],
                     finish: str | None) -> RequestResult:
    """TPOT = (E2E - TTFT) / (n - 1), n = completion tokens from usage (text events if absent)."""
    ttft = times[0]
    n = usage.get("completion_tokens") or len(times)
    tpot = (e2e - ttft) / (n - 1) if n > 1 else None
    return RequestResult(mode="stream", wall_s=e2e, ttft_s=ttft, e2e_s=e2e, tpot_s=tpot,
                         itl_s=[b - a for a, b in zip(times, times[1:], strict=False)], n_events=len(times),
                         prompt_tokens=usage.get("prompt_tokens"),
                         completion_tokens=usage.get("completion_tokens"),
                         finish_reason=finish, text="".join(texts))
