"""A minimal OpenAI-compatible server with the faults the tests need, as a real process on a real port.

`python tests/fake_openai_server.py PORT [options]`. By default it never streams (answers JSON even for
stream=true), for the "server does not stream" fault. Options:

--stream             answer stream=true as vLLM does (chunked server-sent events on a kept-alive
                     connection, each its own write, TCP_NODELAY): `max_tokens` token chunks, the usage
                     chunk, `[DONE]`, then the end of the body. Two optional request fields shape the
                     timing: `fake_token_delay_s` before each token chunk, `fake_tail_delay_s` between the
                     last token chunk and the usage chunk
--replay FILE        stream the events of a captured stream instead (`fake_token_delay_s` apart)
--crash-after N      the "engine" dies after N completions, as vLLM's engine core does: it logs the error,
                     the next stream carries only an error event, /health answers 503 from then on
--die-mid-request N  the whole server dies during completion N + 1: it logs an error line, streams half of
                     the tokens (or nothing, in plain mode), then kills itself (SIGKILL), as an OOM kill does
--models-not-json    /v1/models answers 200 with an HTML page
--malformed-every N  every Nth token chunk of a stream is broken JSON (a faulty proxy or server)
--usage-offset K     the usage chunk counts K completion tokens more than the stream carries
--trickle S          a stream sends its first token, then only an SSE comment every S seconds, never ending
--long-token N       the first token chunk carries N bytes of text, in one write (one very long line)
--html-errors        completions answer 502 with a multi-line HTML page, as a proxy in front of a dead server
--startup-delay S    listen only after S seconds (a server still starting)
--ignore-sigterm     SIGTERM is logged and ignored (a server slow to stop); SIGKILL still works

GET /stats answers how many connections were accepted; GET /metrics answers 200 without series.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MODEL = "fake-model"
ENGINE_ERROR = "RuntimeError: fake engine core died: CUDA error: an illegal memory access was encountered"
DEATH_ERROR = "MemoryError: fake server out of memory in the middle of a request"


class State:
    options = argparse.Namespace(stream=False, crash_after=None, die_mid_request=None, models_not_json=False,
                                 malformed_every=0, usage_offset=0, trickle=None, long_token=0, html_errors=False)
    replay: list[str] = []
    completions = 0
    connections = 0
    dead = False
    lock = threading.Lock()


def generated_events(n: int, token_delay: float, tail_delay: float) -> list[tuple[float, str]]:
    """(delay before it, SSE payload) for n token chunks, the usage chunk and [DONE]."""
    every = State.options.malformed_every
    tokens = [json.dumps({"id": "cmpl-fake", "object": "text_completion", "model": MODEL,
                          "choices": [{"index": 0, "text": f" w{i}",
                                       "finish_reason": "length" if i == n - 1 else None}]})
              for i in range(n)]
    if State.options.long_token and tokens:
        tokens[0] = tokens[0].replace('" w0"', json.dumps("x" * State.options.long_token))
    if every:
        tokens = [t[:-5] if (i + 1) % every == 0 else t for i, t in enumerate(tokens)]
    counted = n + State.options.usage_offset
    usage = json.dumps({"id": "cmpl-fake", "object": "text_completion", "model": MODEL, "choices": [],
                        "usage": {"prompt_tokens": 3, "completion_tokens": counted, "total_tokens": 3 + counted}})
    return [*((token_delay, t) for t in tokens), (tail_delay, usage), (0.0, "[DONE]")]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn
    disable_nagle_algorithm = True  # TCP_NODELAY, as uvicorn: each chunk leaves when written

    def setup(self) -> None:
        super().setup()
        with State.lock:
            State.connections += 1

    def _send(self, code: int, data: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _json(self, code: int, body: dict) -> None:
        self._send(code, json.dumps(body).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/health":
            self._send(503 if State.dead else 200, b"", "application/json")
        elif self.path == "/v1/models" and State.options.models_not_json:
            self._send(200, b"<html><body>Welcome to nginx!</body></html>", "text/html")
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        elif self.path == "/stats":
            self._json(200, {"connections": State.connections})
        elif self.path == "/metrics":  # as vLLM answers it, without series (vLLM's benchmark client reads it)
            self._send(200, b"", "text/plain; version=0.0.4")
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        if State.options.html_errors:
            page = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad " \
                   "Gateway</h1></center>\r\n<hr><center>nginx/1.24.0</center>\r\n" + "<!-- padding -->\r\n" * 6
            self._send(502, (page + "</body>\r\n</html>\r\n").encode(), "text/html")
            return
        n = int(body.get("max_tokens", 4))
        with State.lock:
            State.completions += 1
            crash = State.options.crash_after is not None and State.completions > State.options.crash_after
            if crash and not State.dead:
                State.dead = True
                print("ERROR 11-28 07:00:00 [core.py:700] EngineCore encountered a fatal error.", flush=True)
                print(f"ERROR 11-28 07:00:00 [core.py:700] {ENGINE_ERROR}", flush=True)
            die = State.options.die_mid_request is not None and State.completions > State.options.die_mid_request
        if die:
            print(f"ERROR 11-28 07:00:00 [server.py:99] {DEATH_ERROR}", flush=True)
        if body.get("stream") and State.options.stream:
            self._stream(body, n, crash, die)
            return
        if die:
            _die()
        self._json(200, {"object": "text_completion", "model": MODEL,
                         "choices": [{"index": 0, "text": " x" * n, "finish_reason": "length"}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}})

    def _stream(self, body: dict, n: int, crash: bool, die: bool = False) -> None:
        token_delay = float(body.get("fake_token_delay_s", 0.0))
        if crash:  # what vLLM's server streams when the engine core is dead
            error = {"error": {"message": "EngineCore encountered an issue. See stack trace (above) for the "
                                          "root cause.", "type": "InternalServerError", "code": 500}}
            events = [(0.0, json.dumps(error)), (0.0, "[DONE]")]
        elif State.replay:
            events = [(0.0 if e == "[DONE]" else token_delay, e) for e in State.replay]
        else:
            events = generated_events(n, token_delay, float(body.get("fake_tail_delay_s", 0.0)))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for i, (delay, payload) in enumerate(events):
                if die and i == n // 2:
                    _die()
                time.sleep(delay)
                self._chunk(f"data: {payload}\n\n".encode())
                while State.options.trickle is not None:  # never the next token: a comment now and then
                    time.sleep(State.options.trickle)
                    self._chunk(b": still here\n\n")
            time.sleep(0.02)  # the body's end in a later read than [DONE], as vLLM's often is
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):  # the client hung up (after an error event): as uvicorn
            self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def log_message(self, fmt: str, *args: object) -> None:
        print(fmt % args, flush=True)


def _die() -> None:
    """The whole process, at once: no response is finished, no socket closed cleanly."""
    os.kill(os.getpid(), signal.SIGKILL)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--replay", type=Path)
    p.add_argument("--crash-after", type=int, default=None)
    p.add_argument("--die-mid-request", type=int, default=None)
    p.add_argument("--models-not-json", action="store_true")
    p.add_argument("--malformed-every", type=int, default=0)
    p.add_argument("--usage-offset", type=int, default=0)
    p.add_argument("--trickle", type=float, default=None)
    p.add_argument("--long-token", type=int, default=0)
    p.add_argument("--html-errors", action="store_true")
    p.add_argument("--startup-delay", type=float, default=0.0)
    p.add_argument("--ignore-sigterm", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    State.options = options = parse_args(argv)
    if options.replay:
        options.stream = True
        State.replay = [b.removeprefix("data:").strip() for b in options.replay.read_text().split("\n\n")
                        if b.strip()]
    if options.ignore_sigterm:
        signal.signal(signal.SIGTERM, lambda signum, frame: print("SIGTERM received: ignored", flush=True))
    print("fake server starting", flush=True)
    time.sleep(options.startup_delay)
    server = ThreadingHTTPServer(("127.0.0.1", options.port), Handler)
    print("Application startup complete.", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
