"""A fake Gemini REST server on 127.0.0.1 for tests: real HTTP, scriptable per request.

It speaks ``POST /{version}/models/{model}:generateContent`` as Google documents it, accepts
both ``mimeType`` and ``mime_type`` in requests, and answers from a script: one `Reply` per
request, in order (then a default image answer).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import attrs
from PIL import Image


def picture(color: str = "purple", fmt: str = "PNG", size: tuple[int, int] = (32, 18)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


@attrs.define
class Reply:
    """One scripted answer."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    delay: float = 0.0
    drop: bool = False  # close the connection without answering
    headers: dict[str, str] = attrs.Factory(dict)

    @classmethod
    def json(cls, status: int, payload: Any, **kw: Any) -> Reply:
        return cls(status=status, body=json.dumps(payload).encode(), **kw)


def image_reply(
    data: bytes | None = None,
    mime: str = "image/png",
    *,
    thoughts: list[bytes] = (),  # type: ignore[assignment]
    text: str | None = None,
    finish: str = "STOP",
    **kw: Any,
) -> Reply:
    """A 200 answer with optional text, thought drafts, then the final image."""
    data = picture() if data is None else data
    parts: list[dict[str, Any]] = []
    if text:
        parts.append({"text": text})
    for draft in thoughts:
        parts.append(
            {"inlineData": {"mimeType": mime, "data": base64.b64encode(draft).decode()}, "thought": True}
        )
    parts.append(
        {
            "inlineData": {"mimeType": mime, "data": base64.b64encode(data).decode()},
            "thoughtSignature": "c2ln",
        }
    )
    return Reply.json(
        200,
        {
            "candidates": [
                {"content": {"role": "model", "parts": parts}, "finishReason": finish, "index": 0}
            ],
            "usageMetadata": {"promptTokenCount": 6, "candidatesTokenCount": 1290, "totalTokenCount": 1296},
            "modelVersion": "gemini-fake-version",
            "responseId": "resp-123",
        },
        **kw,
    )


def finish_reply(reason: str, text: str | None = None) -> Reply:
    """A 200 answer whose candidate ends with ``reason`` and carries no image."""
    candidate: dict[str, Any] = {"finishReason": reason, "index": 0}
    if text:
        candidate["content"] = {"role": "model", "parts": [{"text": text}]}
    return Reply.json(200, {"candidates": [candidate], "modelVersion": "gemini-fake-version"})


def blocked_reply(reason: str = "PROHIBITED_CONTENT") -> Reply:
    """A 200 answer with no candidates and a prompt block reason."""
    return Reply.json(200, {"promptFeedback": {"blockReason": reason}, "modelVersion": "gemini-fake-version"})


def error_reply(code: int, status: str, message: str, details: list[dict[str, Any]] = ()) -> Reply:  # type: ignore[assignment]
    """An HTTP error with Google's error body."""
    return Reply.json(
        code, {"error": {"code": code, "message": message, "status": status, "details": list(details)}}
    )


def rate_limit_reply(retry_delay: str | None = "0.3s", quota_id: str = "GenerateRequestsPerMinute") -> Reply:
    details: list[dict[str, Any]] = [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [{"quotaMetric": "generate_requests", "quotaId": quota_id}],
        }
    ]
    if retry_delay is not None:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay})
    return error_reply(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota.", details)


HTML_502 = Reply(
    status=502, body=b"<html><body><h1>502 Bad Gateway</h1></body></html>", content_type="text/html"
)


@attrs.define
class Received:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float


class FakeGemini:
    """The server. Use as a context manager; ``url`` is its base URL."""

    def __init__(self) -> None:
        self.script: list[Reply] = []
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                with fake._lock:
                    fake.requests.append(
                        Received(
                            "POST",
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            json.loads(raw or b"{}"),
                            time.monotonic(),
                        )
                    )
                    reply = fake.script.pop(0) if fake.script else image_reply()
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.drop:
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", reply.content_type)
                    self.send_header("Content-Length", str(len(reply.body)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(reply.body)
                except OSError:
                    pass  # the client gave up (a timeout test)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> FakeGemini:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def add(self, *replies: Reply) -> None:
        with self._lock:
            self.script.extend(replies)
