"""A minimal OpenAI-compatible server that never streams (answers JSON even for stream=true).

Used by the tests for the "server does not stream" fault: `python tests/fake_openai_server.py PORT`.
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "fake-model"


class Handler(BaseHTTPRequestHandler):
    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        n = int(body.get("max_tokens", 4))
        self._json(200, {"object": "text_completion", "model": MODEL,
                         "choices": [{"index": 0, "text": " x" * n, "finish_reason": "length"}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}})

    def log_message(self, fmt: str, *args: object) -> None:
        print(fmt % args, flush=True)


if __name__ == "__main__":
    print("fake server starting", flush=True)
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    print("Application startup complete.", flush=True)
    server.serve_forever()
