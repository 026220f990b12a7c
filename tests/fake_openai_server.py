"""A minimal OpenAI-compatible server with the faults the tests need, as a real process on a real port.

`python tests/fake_openai_server.py PORT [options]`. By default it never streams (answers JSON even for
stream=true), for the "server does not stream" fault. Options:

--stream             answer stream=true with server-sent events, one token each
--crash-after N      the "engine" dies after N completions, as vLLM's engine core does: it logs the error,
                     the next stream carries only an error event, /health answers 503 from then on
--models-not-json    /v1/models answers 200 with an HTML page
--startup-delay S    listen only after S seconds (a server still starting)
--ignore-sigterm     SIGTERM is logged and ignored (a server slow to stop); SIGKILL still works
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "fake-model"
ENGINE_ERROR = "RuntimeError: fake engine core died: CUDA error: an illegal memory access was encountered"


class State:
    options = argparse.Namespace(stream=False, crash_after=None, models_not_json=False)
    completions = 0
    dead = False
    lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

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
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        n = int(body.get("max_tokens", 4))
        with State.lock:
            State.completions += 1
            crash = State.options.crash_after is not None and State.completions > State.options.crash_after
            if crash and not State.dead:
                State.dead = True
                print("ERROR 11-28 07:00:00 [core.py:700] EngineCore encountered a fatal error.", flush=True)
                print(f"ERROR 11-28 07:00:00 [core.py:700] {ENGINE_ERROR}", flush=True)
        if body.get("stream") and State.options.stream:
            self._stream(n, crash)
            return
        self._json(200, {"object": "text_completion", "model": MODEL,
                         "choices": [{"index": 0, "text": " x" * n, "finish_reason": "length"}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}})

    def _stream(self, n: int, crash: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        if crash:  # what vLLM's server streams when the engine core is dead
            error = {"error": {"message": "EngineCore encountered an issue. See stack trace (above) for the "
                                          "root cause.", "type": "InternalServerError", "code": 500}}
            events = [error]
        else:
            events = [{"choices": [{"index": 0, "text": " x", "finish_reason": None}]} for _ in range(n)]
            events.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n}})
        for event in events:
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True

    def log_message(self, fmt: str, *args: object) -> None:
        print(fmt % args, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--crash-after", type=int, default=None)
    p.add_argument("--models-not-json", action="store_true")
    p.add_argument("--startup-delay", type=float, default=0.0)
    p.add_argument("--ignore-sigterm", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    State.options = options = parse_args(argv)
    if options.ignore_sigterm:
        signal.signal(signal.SIGTERM, lambda signum, frame: print("SIGTERM received: ignored", flush=True))
    print("fake server starting", flush=True)
    time.sleep(options.startup_delay)
    server = ThreadingHTTPServer(("127.0.0.1", options.port), Handler)
    print("Application startup complete.", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
