"""A stand-in for the inference engine: a tiny OpenAI-compatible streaming server for fast tests.

It is not vLLM. It answers /health, /v1/completions and /v1/chat/completions, streaming a fixed
reply, and injects faults chosen by the prompt text:
  "stand-in:status=NNN"  answer with HTTP status NNN and an OpenAI-style error body
  "stand-in:sleep=S"     wait S seconds before the first token
  "stand-in:drop"        send one chunk, then close the connection without finishing
  "stand-in:fail-first=N"  answer 503 to the first N requests with this text, then stream normally
  "stand-in:slow=S"      stream 40 tokens, one every S seconds; `aborted` records texts whose client hung up
Like vLLM, it streams with chunked transfer encoding and keeps connections alive between requests,
closing one that stays idle for `idle_timeout` seconds (uvicorn's default is 5); `connections` counts
the connections it accepted.
Like vLLM, it sends one event per `stream_interval` tokens when a request asks (the first token alone),
each with the tokens so far when asked (`stream_options.continuous_usage_stats`), and answers 400 to a
`stream_interval` that is not an integer of at least 1.
With `ignore_eos` in the request it streams exactly `max_tokens` tokens, `token_delay` seconds apart,
as a fixed-latency engine of unlimited concurrency for the benchmark. Token k leaves k delays after the
request came, as an engine's steps keep their own clock: the time lost to waking up does not add up over
the stream (64 sleeps of 20 ms took 1,290-1,303 ms one after another, 1,281 ms on the schedule):
  python -m tests.stand_in_engine --port 8101 --token-delay 0.02
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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # the benchmark opens many connections at once


class StandInEngine:
    """Run the stand-in on 127.0.0.1:`port` in a background thread; `requests` keeps every body received."""

    def __init__(self, port: int, token_delay: float = 0.0, keep_requests: bool = True, idle_timeout: float = 5.0):
        self.token_delay = token_delay
        self.idle_timeout = idle_timeout
        self.connections = 0
        self.keep_requests = keep_requests
        self.requests: list[dict[str, Any]] = []
        self.healthy = True
        self.aborted: list[str] = []
        self.server = _Server(("127.0.0.1", port), _handler_for(self))
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
        timeout = engine.idle_timeout  # a kept-alive connection idle this long is closed
        # Each streamed piece leaves at once, as from vLLM's server (asyncio sets TCP_NODELAY); with Nagle's
        # algorithm a piece waited for the client's delayed ACK of the one before (~40 ms).
        disable_nagle_algorithm = True

        def setup(self) -> None:
            engine.connections += 1
            super().setup()

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == "/health":
                self._json(200 if engine.healthy else 503, {})
            else:
                self._json(404, {})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if engine.keep_requests:
                engine.requests.append(body)
            text = _text_of(body)
            seen = sum(1 for earlier in engine.requests if _text_of(earlier) == text)
            if (match := re.search(r"stand-in:fail-first=(\d+)", text)) and seen <= int(match.group(1)):
                self._json(503, {"error": {"message": "stand-in engine overloaded", "code": 503}})
                return
            if match := re.search(r"stand-in:status=(\d+)", text):
                status = int(match.group(1))
                message = CONTEXT_ERROR if status == 400 else "stand-in engine failure"
                self._error(status, message)
                return
            interval = body.get("stream_interval", 1)
            if not isinstance(interval, int) or interval < 1:  # as vLLM, which asks for an integer of at least 1
                message = f"stream_interval must be an integer >= 1, not {interval!r}"
                self._error(400, message)
                return
            if match := re.search(r"stand-in:sleep=([\d.]+)", text):
                time.sleep(float(match.group(1)))
            if match := re.search(r"stand-in:slow=([\d.]+)", text):
                self._stream_slowly(body, float(match.group(1)), text)
                return
            self._stream(body, interval, drop="stand-in:drop" in text)

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": {"message": message, "type": "BadRequestError", "code": status}})

        def _json(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, body: dict[str, Any], interval: int, drop: bool) -> None:
            chat = "messages" in body
            self._start_stream()
            reply = [" tok"] * body["max_tokens"] if body.get("ignore_eos") else REPLY
            pieces = reply[:1] if drop else reply
            started, held = time.monotonic(), []
            options = body.get("stream_options") or {}
            prompt_tokens = len(_text_of(body).split())
            for index, piece in enumerate(pieces):
                if engine.token_delay:  # token k leaves k delays after the start: a late wake-up does not add up
                    time.sleep(max(started + (index + 1) * engine.token_delay - time.monotonic(), 0))
                held.append(piece)
                last = index == len(reply) - 1
                if index % interval and not last:  # as vLLM: the first token alone, then `interval` at a time
                    continue
                finish = ("length" if body.get("ignore_eos") else "stop") if last else None
                choice = {"index": 0, "finish_reason": finish}
                text, held = "".join(held), []
                choice.update({"delta": {"content": text}} if chat else {"text": text})
                event: dict[str, Any] = {"choices": [choice]}
                if options.get("include_usage") and options.get("continuous_usage_stats"):
                    event["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": index + 1}
                self._event(event)
            if drop:
                self.close_connection = True
                return
            self._event({"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(reply)}})
            self._end_stream()

        def _stream_slowly(self, body: dict[str, Any], delay: float, text: str) -> None:
            self._start_stream()
            try:
                for _ in range(40):
                    self._event({"choices": [{"index": 0, "text": " tick", "finish_reason": None}]})
                    time.sleep(delay)
                self._event({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
                self._end_stream()
            except (BrokenPipeError, ConnectionResetError):
                engine.aborted.append(text)
                self.close_connection = True

        def _start_stream(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

        def _event(self, payload: dict[str, Any]) -> None:
            self._chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")

        def _end_stream(self) -> None:
            self._chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    return Handler


def main() -> None:
    """Serve the stand-in until interrupted."""
    import argparse

    parser = argparse.ArgumentParser(description="Stand-in OpenAI-compatible engine (not vLLM).")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between streamed tokens")
    args = parser.parse_args()
    engine = StandInEngine(args.port, token_delay=args.token_delay, keep_requests=False)
    print(f"stand-in engine on {engine.url}, {args.token_delay} s per token", flush=True)
    try:
        engine.server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
