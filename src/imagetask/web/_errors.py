"""The web door's errors as JSON (``{"error": {"code", "message", "field"}}``), and reading a
request body within its size cap."""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from .. import InsufficientCredits, TaskNotFound, TooManyPending, ValidationError
from .._exceptions import ConfigError, StoreError

__all__ = ["ApiError", "AsciiJSON", "digits", "error_response", "read_body", "read_json"]

log = logging.getLogger("imagetask.web")


class ApiError(Exception):
    """An answer other than success: HTTP status, a stable code, a message, the field at fault."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}
        #: Machine-readable particulars (a balance and a cost, a limit), for clients.
        self.details = details

    @classmethod
    def of(cls, exc: Exception, retry_after: float) -> ApiError:
        """The answer for an error the manager raised."""
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, ValidationError):
            return cls(422, "invalid", str(exc).split(": ", 1)[-1], exc.field)
        if isinstance(exc, TaskNotFound):
            return not_found()
        if isinstance(exc, InsufficientCredits):
            details = {"owner": exc.owner, "cost": exc.cost, "balance": exc.balance}
            message = f"owner {exc.owner!r} has {exc.balance} credit(s) but the task costs {exc.cost}"
            return cls(402, "insufficient_credits", message, details=details)
        if isinstance(exc, TooManyPending):
            return cls(
                429,
                "too_many_pending",
                str(exc),
                headers={"Retry-After": str(max(1, round(retry_after)))},
                details={"owner": exc.owner, "pending": exc.pending, "limit": exc.limit},
            )
        if isinstance(exc, StoreError | ConfigError):
            # The reason names files and folders of the server: it goes to the log, not out.
            log.warning("answered 503: %s: %s", type(exc).__name__, exc)
            return cls(
                503,
                "unavailable",
                "the task database is unavailable for the moment; try again shortly",
                headers={"Retry-After": "5"},
            )
        raise exc


def not_found() -> ApiError:
    """The same answer for "no such task" and "another owner's task": never tell them apart."""
    return ApiError(404, "not_found", "no such task")


class AsciiJSON(JSONResponse):
    """JSON with non-ASCII characters escaped: an answer that echoes odd input (a lone
    surrogate in a field name) is still valid UTF-8. Answers are one owner's and change
    as tasks run: ``Cache-Control: private, no-store`` unless the caller says otherwise."""

    def __init__(self, content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> None:
        headers = dict(headers or {})
        if not any(name.lower() == "cache-control" for name in headers):
            headers["Cache-Control"] = "private, no-store"
        super().__init__(content, status_code=status_code, headers=headers)

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def digits(value: str, field: str, low: int, high: int) -> int:
    """An integer parameter from ASCII digits (not "²", not 5,000 of them), in range, or 422."""
    if not (0 < len(value) <= 19 and value.isascii() and value.isdigit()) or not low <= int(value) <= high:
        raise ApiError(422, "invalid", f"must be an integer from {low} to {high}, got {value[:40]!r}", field)
    return int(value)


def error_response(error: ApiError) -> JSONResponse:
    body: dict[str, Any] = {"code": error.code, "message": error.message, "field": error.field}
    if error.details is not None:
        body["details"] = error.details
    return AsciiJSON({"error": body}, status_code=error.status, headers=error.headers)


async def read_body(request: Request, limit: int, name: str = "max_body") -> bytes:
    """The whole body, refusing (413) one over ``limit`` bytes before reading it when its
    length is declared, and as soon as it passes the limit when it is not."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise ApiError(400, "bad_request", "Content-Length is not a number") from None
        if length > limit:
            raise too_large(limit, name)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit, name)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(limit: int, name: str = "max_body") -> ApiError:
    return ApiError(413, "too_large", f"the request body is over {limit} bytes ({name})")


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, whatever its Content-Type says (the seed's page sends
    ``text/plain``): 400 naming the problem when it is not one."""
    body = await read_body(request, limit)
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "the body is nested too deeply") from None
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_json", f"the body must be a JSON object, not {type(value).__name__}")
    return value
