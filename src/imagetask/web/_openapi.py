"""The OpenAPI 3.1 description of the JSON API (served at ``/openapi.json``)."""

from __future__ import annotations

from typing import Any

__all__ = ["openapi"]

_STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"]
_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "field"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "field": {"type": ["string", "null"]},
            },
        }
    },
}
_IMAGE = {
    "type": "object",
    "required": ["mime", "width", "height", "sha256", "size"],
    "properties": {
        "index": {"type": "integer"},
        "url": {"type": "string"},
        "thumbnail_url": {"type": "string"},
        "mime": {"type": "string"},
        "width": {"type": "integer"},
        "height": {"type": "integer"},
        "sha256": {"type": "string"},
        "size": {"type": "integer"},
    },
}
_TIME = {"type": ["string", "null"], "format": "date-time"}
_TASK = {
    "type": "object",
    "required": ["id", "owner", "prompt", "model", "status", "images", "error", "created_at"],
    "properties": {
        "id": {"type": "string"},
        "owner": {"type": "string"},
        "prompt": {"type": "string"},
        "model": {"type": "string"},
        "params": {"type": "object"},
        "status": {"type": "string", "enum": _STATUSES},
        "images": {"type": "array", "items": {"$ref": "#/components/schemas/Image"}},
        "references": {"type": "array", "items": {"$ref": "#/components/schemas/Image"}},
        "error": {
            "type": ["object", "null"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "retryable": {"type": "boolean"},
            },
        },
        "attempts": {"type": "integer"},
        "max_attempts": {"type": "integer"},
        "cost": {"type": "integer"},
        "metadata": {"type": "object"},
        "idempotency_key": {"type": ["string", "null"]},
        "created_at": _TIME,
        "started_at": _TIME,
        "finished_at": _TIME,
    },
}
_SUBMIT = {
    "type": "object",
    "required": ["prompt"],
    "additionalProperties": False,
    "properties": {
        "prompt": {"type": "string", "minLength": 1, "maxLength": 10000},
        "n": {"type": "integer", "minimum": 1, "maximum": 8},
        "model": {"type": "string"},
        "aspect_ratio": {"type": "string"},
        "size": {"type": "string"},
        "metadata": {"type": "object"},
        "idempotency_key": {"type": "string"},
    },
}


def _json(schema: Any) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    names = {
        400: "Not JSON", 401: "Not signed in", 404: "No such task (or another owner's)",
        402: "Not enough credits", 413: "Body too large", 422: "A field is invalid (named in error.field)",
        429: "Too many unfinished tasks (max_pending); see Retry-After", 503: "The database is unavailable",
    }  # fmt: skip
    return {str(c): {"description": names[c], **_json({"$ref": "#/components/schemas/Error"})} for c in codes}


def _op(summary: str, ok: Any, *errors: int, body: Any = None, params: Any = None, status: int = 200) -> Any:
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"bearer": []}],
        "responses": {str(status): {"description": "OK", **(_json(ok) if ok is not None else {})}}
        | _errors(401, 503, *errors),
    }
    if body is not None:
        op["requestBody"] = {"required": True, **_json(body)}
    if params:
        op["parameters"] = params
    return op


def _path_param(name: str, schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _query(name: str, schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def openapi(prefix: str = "") -> dict[str, Any]:
    """The description, with server URLs under ``prefix`` (where the app is mounted)."""
    task = {"$ref": "#/components/schemas/Task"}
    tasks = {
        "type": "object",
        "required": ["tasks"],
        "properties": {"tasks": {"type": "array", "items": task}},
    }
    task_id = _path_param("task_id", {"type": "string"})
    return {
        "openapi": "3.1.0",
        "info": {"title": "imagetask", "version": "1", "description": "Durable background image generation."},
        "servers": [{"url": prefix or "/"}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Task": _TASK, "Image": _IMAGE, "Error": _ERROR, "Submit": _SUBMIT},
        },
        "paths": {
            "/api/tasks": {
                "post": _op(
                    "Submit a task (JSON, or multipart with `images` files)", task, 400, 402, 413, 422, 429,
                    body={"$ref": "#/components/schemas/Submit"}, status=202,
                ),
                "get": _op(
                    "Recent tasks, newest first, a page at a time",
                    {
                        "type": "object",
                        "required": ["tasks", "next_before"],
                        "properties": {
                            "tasks": {"type": "array", "items": task},
                            "next_before": {"type": ["string", "null"]},
                        },
                    },
                    422,
                    params=[
                        _query("status", {"type": "string", "enum": _STATUSES}),
                        _query("limit", {"type": "integer", "minimum": 1, "maximum": 200}),
                        _query("before", {"type": "string"}),
                    ],
                ),
            },
            "/api/tasks/pending": {"get": _op("The caller's queued and running tasks", tasks)},
            "/api/tasks/{task_id}": {"get": _op("One task", task, 404, params=[task_id])},
            "/api/tasks/{task_id}/cancel": {"post": _op("Cancel a task", task, 404, params=[task_id])},
            "/api/tasks/{task_id}/events": {
                "get": _op(
                    "A task's transitions",
                    {"type": "object", "required": ["events"], "properties": {"events": {"type": "array"}}},
                    404,
                    params=[task_id],
                )
            },
            "/api/tasks/{task_id}/images/{index}": {
                "get": {
                    **_op(
                        "An image file (`?w=` for a WebP thumbnail)", None, 404, 422,
                        params=[task_id, _path_param("index", {"type": "integer", "minimum": 0}),
                                _query("w", {"type": "integer", "minimum": 16, "maximum": 2048})],
                    ),
                }
            },
            "/api/credits": {
                "get": _op(
                    "The caller's credit balance",
                    {"type": "object", "required": ["owner", "balance"], "properties": {
                        "owner": {"type": "string"}, "balance": {"type": "integer"},
                        "charging": {"type": "boolean"}}},
                )
            },
            "/api/stream/ticket": {
                "post": _op(
                    "A ticket for /api/stream?ticket= (EventSource cannot send headers)",
                    {"type": "object", "required": ["ticket"], "properties": {
                        "ticket": {"type": "string"}, "expires_in": {"type": "integer"}}},
                )
            },
        },
    }  # fmt: skip
