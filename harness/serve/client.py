"""OpenAI-compatible client: the seed's whole-request wall time, and streamed TTFT/ITL/TPOT/E2E.

The streamed figures follow vLLM's own benchmark client (`vllm bench serve`:
vllm/benchmarks/lib/endpoint_request_func.py and serve.py), so that the two compare:

- t0 is `time.perf_counter()` just before the request is built and JSON-encoded, as vLLM's client
  starts its clock before `session.post` builds and encodes it and as curl's wall time includes its
  own work (the connection, if a new one is needed, is inside every figure too). The client's own
  request building is therefore part of TTFT, on both clients alike: a lean client adds little.
- A token event is an SSE event whose `choices` carry a token: a completions chunk with a `text` field
  (also "", as for a special token), or a chat delta with content other than the role-only opener
  (vLLM's chat client counts that opener as the first token; it carries none). The trailing usage chunk
  (`choices: []`), a closing chunk that carries the usage with an empty text and a finish reason (transformers
  serve's), and `[DONE]` are not token events. An event is timed when the read that completes it
  returns, before the client buffers, splits and parses it: the client's own work is not server time.
- `ttft_s`: t0 to the first token event. `itl_s`: the gaps between consecutive token events.
- `e2e_s`: t0 to the last token event (vLLM's request latency, its E2EL).
- `tpot_s`: (E2E - TTFT) / (n - 1), n = the server's `usage.completion_tokens` (the number of token
  events when the server sends no usage); none when n <= 1.
- `wall_s`: t0 to the end of the response body, after the usage chunk, `[DONE]` and the chunked
  terminator: the whole request, as the seed's curl times it. For plain requests `e2e_s` is `wall_s`.
- A stream is measured only when every event other than `[DONE]` is a JSON object and the token events are
  as many as the server's `usage.completion_tokens` (where it sends usage): a dropped or uncounted event
  would shift TTFT, ITL and TPOT, so such a request is an error (recorded failed), never a figure.

The body is always read to its end, not left at `[DONE]`: httpx closes a connection whose response was
not read to the end, so the next request on the client paid a new TCP connection (and the server's
accept) inside its TTFT; vLLM's client (aiohttp) reads to the end and reuses its connection, as this
one now does. Events are split from the body's bytes as they arrive (httpx's `iter_bytes` returns what
the socket has, without waiting for more), as vLLM's client splits them: cheaper than httpx's text and
line iterators, and on a host where the client shares the server's cores, client CPU per event is taken
from the server.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from harness.errors import HarnessError


class RequestError(HarnessError):
    """A request that did not produce a measurement; `kind` says why."""

    def __init__(self, message: str, kind: str, status: int | None = None) -> None:
        super().__init__(message)
        # "http" | "wrong_model" | "not_streaming" | "transport" | "empty" | "server_error" | "malformed_stream"
        # | "token_count"
        self.kind = kind
        self.status = status


@dataclass
class RequestResult:
    mode: str  # "stream" | "plain"
    wall_s: float  # request handed to httpx -> end of the response body (whole request)
    ttft_s: float | None = None  # -> first token event
    e2e_s: float | None = None  # -> last token event (streamed); wall_s (plain)
    tpot_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    n_events: int = 0  # token events (SSE events whose choices carry a token)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    text: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def completion_body(model: str, prompt: str | list[int], max_tokens: int, stream: bool,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """`prompt` is text or token ids; `extra` carries engine-specific fields, e.g. vLLM's ignore_eos
    (random weights hit EOS early)."""
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


def iter_sse_events(chunks: Iterable[bytes]) -> Iterator[str]:
    """The `data:` payloads of each SSE event, as soon as the blank line that ends the event has arrived."""
    for _, payload in iter_timed_sse_events(chunks):
        yield payload


def iter_timed_sse_events(chunks: Iterable[bytes]) -> Iterator[tuple[float, str]]:
    """(arrival, payload) for each `data:` payload: `arrival` is `time.perf_counter()` when the chunk that ends
    its event was read, so the client's own work on it (buffering, splitting, decoding) is not the server's
    time. Each byte is scanned once: a line of many megabytes costs the client no more than reading it."""
    buffer = bytearray()
    scanned = 0  # bytes of `buffer` known to hold no event end
    carry = b""  # a CR at the end of a chunk, until the next chunk says whether an LF follows it
    for chunk in chunks:
        arrival = time.perf_counter()
        data = carry + chunk
        carry = b""
        if data.endswith(b"\r"):
            data, carry = data[:-1], b"\r"
        if b"\r" in data:  # CRLF line ends
            data = data.replace(b"\r\n", b"\n")
        buffer += data
        start = 0
        while (end := buffer.find(b"\n\n", max(scanned - 1, start))) >= 0:
            event = bytes(buffer[start:end])
            start = scanned = end + 2
            for payload in iter_sse_data(event.decode("utf-8", "replace").split("\n")):
                yield arrival, payload
        del buffer[:start]
        scanned = len(buffer)
    rest = (bytes(buffer) + carry).strip()
    if rest:  # a last event without its blank line
        arrival = time.perf_counter()
        for payload in iter_sse_data(rest.decode("utf-8", "replace").split("\n")):
            yield arrival, payload


def within(chunks: Iterable[bytes], deadline: float | None, deadline_s: float | None,
           tokens: Callable[[], int] | None = None) -> Iterator[bytes]:
    """`chunks` until `deadline` (a perf_counter time): then RequestError. A read timeout bounds each read;
    this bounds the whole request (a server that sends a comment every few seconds never trips the first)."""
    for chunk in chunks:
        if deadline is not None and time.perf_counter() > deadline:
            so_far = f": {tokens()} token{'' if tokens() == 1 else 's'} so far" if tokens is not None else ""
            raise RequestError(f"no end of the response {deadline_s:g} s after the request (--request-timeout)"
                               + so_far, "timeout")
        yield chunk


def one_line(text: str, limit: int = 200) -> str:
    """`text` on one line (every run of white space one space), shortened to `limit` characters with '…'."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


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
    """The error an answer carries, on one line: its message when it is JSON, else its content type and its
    body shortened (an HTML error page of a proxy)."""
    try:
        data = resp.json()
        err = data.get("error") or data.get("detail") or data
        return one_line(str(err.get("message", err) if isinstance(err, dict) else err), 300)
    except (json.JSONDecodeError, ValueError, AttributeError):
        ctype = resp.headers.get("content-type") or "no content type"
        return f"({ctype.split(';')[0]}): {one_line(resp.text) or 'an empty body'}"


def _raise_for_status(resp: httpx.Response, model: str) -> None:
    if resp.status_code == 200:
        return
    msg = _error_message(resp)
    sep = " " if msg.startswith("(") else ": "  # "HTTP 502 (text/html): <html>…" / "HTTP 400: bad request"
    if resp.status_code == 404 or (resp.status_code == 400 and "model" in msg.lower()):
        raise RequestError(f"server rejected model {model!r}:{sep}{msg}", "wrong_model", resp.status_code)
    raise RequestError(f"HTTP {resp.status_code}{sep}{msg}", "http", resp.status_code)


def _deadline(t0: float, deadline_s: float | None) -> float | None:
    return None if deadline_s is None else t0 + deadline_s


def plain_request(client: httpx.Client, base_url: str, model: str, prompt: str, max_tokens: int,
                  extra: dict[str, Any] | None = None, deadline_s: float | None = None) -> RequestResult:
    """One non-streamed completion, timed end to end as `/usr/bin/time curl` does; RequestError when its body
    has not ended `deadline_s` after the request."""
    body = completion_body(model, prompt, max_tokens, stream=False, extra=extra)
    t0 = time.perf_counter()
    try:
        with contextlib.closing(client.send(client.build_request("POST", base_url + "/v1/completions", json=body),
                                            stream=True)) as streamed:
            content = b"".join(within(streamed.iter_bytes(), _deadline(t0, deadline_s), deadline_s))
            wall = time.perf_counter() - t0
    except httpx.TransportError as exc:
        raise RequestError(f"request failed: {transport_reason(exc)}", "transport") from exc
    headers = [(k, v) for k, v in streamed.headers.multi_items()
               if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
    resp = httpx.Response(streamed.status_code, headers=headers, content=content)  # decoded already
    _raise_for_status(resp, model)
    try:
        data = resp.json()
    except ValueError:
        raise RequestError(f"server answered 200 but not JSON {_error_message(resp)}", "http", 200) from None
    usage = data.get("usage") or {}
    choice = (data.get("choices") or [{}])[0]
    return RequestResult(mode="plain", wall_s=wall, e2e_s=wall, text=event_text(data),
                         prompt_tokens=usage.get("prompt_tokens"),
                         completion_tokens=usage.get("completion_tokens"),
                         finish_reason=choice.get("finish_reason"))


def is_token_event(event: dict[str, Any]) -> bool:
    """Whether a chunk carries a token (see the module docstring); usage-only and role-only chunks do not."""
    for choice in event.get("choices") or []:
        if "text" in choice:
            return True
        delta = choice.get("delta") or {}
        content = delta.get("content")
        if content or (content is not None and "role" not in delta):
            return True
    return False


@dataclass
class _StreamState:
    """What a stream has delivered so far: token event times (s since t0), texts, usage, finish."""

    times: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    finish: str | None = None
    events: int = 0  # `data:` events other than [DONE]
    unparseable: list[str] = field(default_factory=list)  # the payloads that are not a JSON object

    def add(self, data: str, t0: float, arrival: float) -> None:
        self.events += 1
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            event = None
        if not isinstance(event, dict):
            self.unparseable.append(data)
            return
        error = stream_error(event)
        if error:
            raise RequestError(f"the server reported an error after {len(self.times)} tokens: {error}",
                               "server_error")
        if is_token_event(event) and not is_closing_chunk(event):
            self.times.append(arrival - t0)
            self.texts.append(event_text(event))
        for choice in event.get("choices") or []:
            self.finish = choice.get("finish_reason") or self.finish
        if event.get("usage"):
            self.usage = event["usage"]


def is_closing_chunk(event: dict[str, Any]) -> bool:
    """A chunk that ends the stream and carries the usage, with an empty text and a finish reason (transformers
    serve sends one after its last token): no token of its own, so not timed as one."""
    choices = event.get("choices") or []
    return bool(event.get("usage")) and bool(choices) and all(
        c.get("text") == "" and c.get("finish_reason") for c in choices)


def stream_request(client: httpx.Client, base_url: str, model: str, prompt: str | list[int], max_tokens: int,
                   extra: dict[str, Any] | None = None, deadline_s: float | None = None) -> RequestResult:
    """One streamed completion: TTFT, inter-token latencies, TPOT, E2E, wall time and the server's usage;
    RequestError when the response has not ended `deadline_s` after the request (each read has the client's
    timeout too)."""
    state = _StreamState()
    t0 = time.perf_counter()  # before the request is built, as vLLM's client starts its clock
    body = completion_body(model, prompt, max_tokens, stream=True, extra=extra)
    request = client.build_request("POST", base_url + "/v1/completions", json=body)
    try:
        with contextlib.closing(client.send(request, stream=True)) as resp:
            if resp.status_code != 200:
                resp.read()
                _raise_for_status(resp, model)
            ctype = resp.headers.get("content-type", "")
            if "text/event-stream" not in ctype:
                resp.read()
                raise RequestError(f"server does not stream: asked for stream=true, got {ctype or 'no'} "
                                   "content type (use --request-mode plain for this server)", "not_streaming")
            chunks = within(resp.iter_bytes(), _deadline(t0, deadline_s), deadline_s, lambda: len(state.times))
            for arrival, data in iter_timed_sse_events(chunks):
                if data.strip() != "[DONE]":  # read on to the end of the body: the connection stays open
                    state.add(data, t0, arrival)
    except httpx.TransportError as exc:
        raise RequestError(f"stream broke after {len(state.times)} tokens: {transport_reason(exc)}",
                           "transport") from exc
    wall = time.perf_counter() - t0
    check_stream(state)
    return summarize_stream(state.times, wall, state.texts, state.usage, state.finish)


def check_stream(state: _StreamState) -> None:
    """Raises RequestError unless the stream can be measured: it carried tokens, every event was JSON (a
    dropped event is a token missing from TTFT, ITL and TPOT), and as many token events as the server's
    usage counts completion tokens, where it sends usage."""
    if state.unparseable:
        head = " ".join(state.unparseable[0].split())[:60]
        raise RequestError(f"{len(state.unparseable)} of {state.events} stream events were not JSON (the first: "
                           f"{head!r}): the stream cannot be timed", "malformed_stream")
    if not state.times:
        raise RequestError("stream ended without any token", "empty")
    counted = state.usage.get("completion_tokens")
    if isinstance(counted, int) and counted != len(state.times):
        raise RequestError(f"the stream carried {len(state.times)} token events but the server's usage counts "
                           f"{counted} completion tokens: TTFT, ITL and TPOT would not be the tokens'",
                           "token_count")


def summarize_stream(times: list[float], wall: float, texts: list[str], usage: dict[str, Any],
                     finish: str | None) -> RequestResult:
    """`times`: token events (s since t0). E2E ends at the last one; TPOT = (E2E - TTFT) / (n - 1), n =
    completion tokens from usage (token events if absent); `wall` is the whole request."""
    ttft, e2e = times[0], times[-1]
    n = usage.get("completion_tokens") or len(times)
    tpot = (e2e - ttft) / (n - 1) if n > 1 else None
    return RequestResult(mode="stream", wall_s=wall, ttft_s=ttft, e2e_s=e2e, tpot_s=tpot,
                         itl_s=[b - a for a, b in zip(times, times[1:], strict=False)], n_events=len(times),
                         prompt_tokens=usage.get("prompt_tokens"),
                         completion_tokens=usage.get("completion_tokens"),
                         finish_reason=finish, text="".join(texts))
