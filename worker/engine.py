"""HTTP client for an OpenAI-compatible engine (vLLM), streaming every request."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from worker.exceptions import (
    EngineInterrupted,
    EngineProtocolError,
    EngineRejected,
    EngineServerError,
    EngineTimeout,
    EngineUnavailable,
)

COMPLETIONS_PATH = "/v1/completions"
CHAT_COMPLETIONS_PATH = "/v1/chat/completions"
_OPTIONAL_FIELDS = ("stop", "seed")


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    time_to_first_token: float | None  # seconds


def build_request(payload: Mapping[str, Any], model: str) -> tuple[str, dict[str, Any]]:
    """Turn a job payload into the engine path and JSON body (chat if it has `messages`)."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": payload["max_tokens"],
        "temperature": payload["temperature"],
        "top_p": payload["top_p"],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body.update({key: payload[key] for key in _OPTIONAL_FIELDS if payload.get(key) is not None})
    if payload.get("user_id"):
        body["user"] = payload["user_id"]
    if payload.get("ignore_eos"):
        body["ignore_eos"] = True
    if payload.get("messages"):
        return CHAT_COMPLETIONS_PATH, {**body, "messages": payload["messages"]}
    return COMPLETIONS_PATH, {**body, "prompt": payload["prompt"]}


class EngineClient:
    """One keep-alive connection to the engine, reused by every job of a worker process.

    A worker process runs one job at a time, so one connection is all it needs; `interrupt` (called
    from another thread when the job is cancelled) shuts that connection down, which ends the read
    at once even while the engine has sent nothing yet, and the engine aborts the request.
    """

    def __init__(self, base_url: str, model: str, connect_timeout: float, read_timeout: float):
        self.model = model
        timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self._http = httpx.Client(base_url=base_url, timeout=timeout, limits=httpx.Limits(max_connections=1))
        self._network_stream: Any = None
        self._interrupted = False

    def generate(self, payload: Mapping[str, Any], on_text: Callable[[str], None] | None = None) -> Completion:
        """Send one generation request and read its stream to the end, passing each text piece to `on_text`.

        Raises:
            EngineUnavailable, EngineServerError, EngineRejected, EngineTimeout, EngineProtocolError,
            EngineInterrupted (after `interrupt`).
        """
        path, body = build_request(payload, self.model)
        self._interrupted = False
        sent_at = time.monotonic()
        try:
            with self._http.stream("POST", path, json=body, extensions={"trace": self._trace}) as response:
                self._network_stream = response.extensions.get("network_stream", self._network_stream)
                if response.status_code >= 400:
                    response.read()
                    raise _status_error(response)
                return _read_stream(_events(response), sent_at, on_text)
        except Exception as exc:
            if self._interrupted:  # whatever the cut-off read raised
                raise EngineInterrupted("the request was interrupted") from exc
            if isinstance(exc, httpx.TransportError):
                raise self._transport_error(exc) from exc
            raise

    def _transport_error(self, exc: httpx.TransportError) -> Exception:
        if isinstance(exc, httpx.ConnectTimeout):
            return EngineUnavailable(f"could not connect to the engine: {exc}")
        if isinstance(exc, httpx.TimeoutException):
            return EngineTimeout(f"the engine sent nothing for {self._http.timeout.read} s")
        return EngineUnavailable(f"engine connection failed: {exc!r}")

    def _trace(self, event: str, info: dict[str, Any]) -> None:
        """Remember the connection this client opened last (httpcore's trace extension).

        Every request of this client passes it, so a kept-alive connection reused by the next
        generation is known before the engine answers.
        """
        if event == "connection.connect_tcp.complete":
            self._network_stream = info["return_value"]

    def interrupt(self) -> None:
        """End the request being read, from another thread; `generate` then raises EngineInterrupted."""
        self._interrupted = True
        stream = self._network_stream
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed

    def is_ready(self, health_path: str) -> bool:
        """Tell whether the engine answers its health check with 200."""
        try:
            return self._http.get(health_path, timeout=2.0, extensions={"trace": self._trace}).status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self._http.close()


def _status_error(response: httpx.Response) -> Exception:
    """Build the exception for an engine error status, keeping the engine's own message."""
    message = _error_message(response)
    if response.status_code >= 500:
        return EngineServerError(f"engine answered {response.status_code}: {message}")
    return EngineRejected(message)


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Yield the JSON payloads of a server-sent-events stream until `[DONE]`."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        try:
            yield json.loads(data)
        except ValueError as exc:
            raise EngineProtocolError(f"engine sent a line that is not JSON: {data[:200]!r}") from exc
    raise EngineUnavailable("engine closed the stream before it finished")


def _read_stream(
    events: Iterator[dict[str, Any]], sent_at: float, on_text: Callable[[str], None] | None = None
) -> Completion:
    """Collect text, finish reason, usage and time to first token from the stream's chunks."""
    parts: list[str] = []
    first_token_at = finish_reason = usage = None
    for chunk in events:
        if "error" in chunk:
            raise EngineServerError(f"engine failed mid-stream: {_chunk_error(chunk)}")
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            piece = choice.get("text")
            if piece is None:
                piece = (choice.get("delta") or {}).get("content")
            if piece:
                if first_token_at is None:
                    first_token_at = time.monotonic()
                parts.append(piece)
                if on_text is not None:
                    on_text(piece)
            finish_reason = choice.get("finish_reason") or finish_reason
    usage = usage or {}
    return Completion(
        text="".join(parts),
        finish_reason=finish_reason,
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        time_to_first_token=None if first_token_at is None else first_token_at - sent_at,
    )


def _chunk_error(chunk: dict[str, Any]) -> str:
    error = chunk["error"]
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)
