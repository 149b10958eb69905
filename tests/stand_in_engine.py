"""A stand-in for the inference engine: a tiny OpenAI-compatible streaming server for fast tests.

It is not vLLM. It answers /health, /v1/completions and /v1/chat/completions, streaming a fixed
reply, and injects faults chosen by the prompt text:
  "stand-in:status=NNN"  answer with HTTP status NNN and an OpenAI-style error body
  "stand-in:sleep=S"     wait S seconds before the first token
  "stand-in:drop"        send one chunk, then close the connection without finishing
  "stand-in:fail-first=N"  answer 503 to the first N requests with this text, then stream normally
  "stand-in:slow=S"      stream 40 tokens, one every S seconds; `aborted` records texts whose client hung up
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REPLY = ["Hello", ",", " world", "!"]
CONTEXT_ERROR = "This model's maximum context length is 2048 tokens. However, you requested 5000 tokens."


class StandInEngine:
    """Run the stand-in on 127.0.0.1:`port` in a background thread; `requests` keeps every body received."""

    def __init__(self, port: int):
        self.requests: list[dict[str, Any]] = []
        self.healthy = True
        self.aborted: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> StandInEngine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _text_of(body: dict[str, Any]) -> str:
    if "messages" in body:
        return body["messages"][-1]["content"]
    return body.get("prompt", "")


def _handler_for(engine: StandInEngine) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == "/health":
                self._json(200 if engine.healthy else 503, {})
            else:
                self._json(404, {})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            engine.requests.append(body)
            text = _text_of(body)
            seen = sum(1 for earlier in engine.requests if _text_of(earlier) == text)
            if (match := re.search(r"stand-in:fail-first=(\d+)", text)) and seen <= int(match.group(1)):
                self._json(503, {"error": {"message": "stand-in engine overloaded", "code": 503}})
                return
            if match := re.search(r"stand-in:status=(\d+)", text):
                status = int(match.group(1))
                message = CONTEXT_ERROR if status == 400 else "stand-in engine failure"
                self._json(status, {"error": {"message": message, "type": "BadRequestError", "code": status}})
                return
            if match := re.search(r"stand-in:sleep=([\d.]+)", text):
                time.sleep(float(match.group(1)))
            if match := re.search(r"stand-in:slow=([\d.]+)", text):
                self._stream_slowly(body, float(match.group(1)), text)
                return
            self._stream(body, drop="stand-in:drop" in text)

        def _json(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, body: dict[str, Any], drop: bool) -> None:
            chat = "messages" in body
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            pieces = REPLY[:1] if drop else REPLY
            for index, piece in enumerate(pieces):
                finish = "stop" if index == len(REPLY) - 1 else None
                choice = {"index": 0, "finish_reason": finish}
                choice.update({"delta": {"content": piece}} if chat else {"text": piece})
                self._event({"choices": [choice]})
            if drop:
                self.close_connection = True
                return
            usage = {"prompt_tokens": len(_text_of(body).split()), "completion_tokens": len(REPLY)}
            self._event({"choices": [], "usage": usage})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True

        def _stream_slowly(self, body: dict[str, Any], delay: float, text: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                for _ in range(40):
                    self._event({"choices": [{"index": 0, "text": " tick", "finish_reason": None}]})
                    time.sleep(delay)
                self._event({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                engine.aborted.append(text)

        def _event(self, payload: dict[str, Any]) -> None:
            self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
            self.wfile.flush()

    return Handler
