"""The OpenAPI 3.1 description of the JSON API (served at ``/openapi.json``)."""

# ruff: noqa: E501  (a table of data, laid out by hand: one property per line would triple it)

from __future__ import annotations

from typing import Any

__all__ = ["openapi"]

_MIMES = ["image/png", "image/jpeg", "image/webp"]
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
                "details": {"type": "object"},
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
        "prompt": {"type": "string", "minLength": 1, "maxLength": 10000, "pattern": "\\S"},
        "n": {"type": "integer", "minimum": 1, "maximum": 8},
        "model": {"type": ["string", "null"]},
        "aspect_ratio": {"type": ["string", "null"]},
        "size": {"type": ["string", "null"]},
        "metadata": {"type": ["object", "null"]},
        "idempotency_key": {"type": ["string", "null"], "minLength": 1, "maxLength": 200, "pattern": "\\S"},
    },
}


def _json(schema: Any) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    names = {
        400: "Not JSON", 401: "Not signed in", 404: "No such task (or another owner's)",
        403: "A cookie-signed write from another site", 410: "The image file is missing",
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


def _file_op(summary: str, image: Any, cached: Any, params: Any) -> Any:
    op = _op(summary, None, 404, 422, params=params)
    op["responses"]["200"] = image
    op["responses"].update(cached)
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
    task_id = _path_param("task_id", {"type": "string", "pattern": "^[0-9A-Za-z]{26}$"})
    index = _path_param("index", {"type": "integer", "minimum": 0, "maximum": 1000})
    width = _query("w", {"type": "integer", "minimum": 16, "maximum": 2048})
    image = {
        "description": "The file (a thumbnail is WebP)",
        "content": {m: {"schema": {"type": "string", "format": "binary"}} for m in _MIMES},
    }
    cached = {"304": {"description": "Not modified (If-None-Match)"}, "410": _errors(410)["410"]}
    seed_body = {
        "type": "object",
        "required": ["prompt"],
        "properties": {
            "prompt": {"type": "string"},
            "model": {"type": "string"},
            "aspectRatio": {"type": "string"},
            "numberOfImages": {"type": "integer"},
            "n": {"type": "integer"},
            "size": {"type": "string"},
            "idempotencyKey": {"type": "string"},
            "aspect_ratio": {"type": "string"},
        },
        "additionalProperties": False,
    }
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
                )
                | {"requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Submit"}},
                    "multipart/form-data": {"schema": {"type": "object", "required": ["prompt"], "properties": {
                        "prompt": {"type": "string"}, "n": {"type": "string"}, "model": {"type": "string"},
                        "aspect_ratio": {"type": "string"}, "size": {"type": "string"},
                        "metadata": {"type": "string", "description": "a JSON object"},
                        "idempotency_key": {"type": "string"},
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    }}},
                }}},
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
                        _query("status", {"type": "string", "enum": ["", *_STATUSES]}),
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
                "get": _file_op("An image file (`?w=` for a WebP thumbnail)", image, cached, [task_id, index, width])
            },
            "/api/tasks/{task_id}/references/{index}": {
                "get": _file_op("A reference image file (`?w=` for a thumbnail)", image, cached, [task_id, index, width])
            },
            "/api/tasks/batch": {
                "post": _op(
                    "Submit up to 100 tasks: all are written, or none", tasks, 400, 402, 413, 422, 429,
                    body={"type": "object", "required": ["requests"], "additionalProperties": False, "properties": {
                        "requests": {"type": "array", "minItems": 1, "maxItems": 100,
                                     "items": {"$ref": "#/components/schemas/Submit"}}}},
                    status=202,
                )
            },
            "/api/me": {
                "get": _op(
                    "Who the credentials act as",
                    {"type": "object", "required": ["owner"], "properties": {
                        "owner": {"type": "string"}, "charging": {"type": "boolean"},
                        "max_pending": {"type": ["integer", "null"]}}},
                )
            },
            "/api/stream": {
                "get": {
                    "summary": "Server-Sent Events of the caller's task changes (Last-Event-ID resumes)",
                    "security": [{"bearer": []}],
                    "parameters": [_query("ticket", {"type": "string"}),
                                   _query("last_event_id", {"type": "integer", "minimum": 0})],
                    "responses": {"200": {"description": "An event stream",
                                          "content": {"text/event-stream": {"schema": {"type": "object", "properties": {
                                              "event": {"const": "task"}, "id": {"type": "string"}, "data": {"type": "string"}}}}}}}
                    | _errors(401, 422, 503),
                }
            },
            "/api/generate-image": {
                "post": _op(
                    "Submit, for front ends of the earlier /api/generate-image design (a JSON body, any Content-Type)",
                    {"type": "object", "required": ["status", "taskId"], "properties": {
                        "status": {"const": "processing"}, "taskId": {"type": "string"}}},
                    400, 402, 413, 422, 429, body=seed_body,
                )
            },
            "/api/generate-image/polling": {
                "post": _op(
                    "Poll, for front ends of the earlier /api/generate-image design",
                    {"type": "object", "required": ["status"], "properties": {
                        "status": {"enum": ["processing", "completed", "failed"]},
                        "images": {"type": "array", "items": {"type": "string"}}, "error": {"type": "object"}}},
                    400, 404, 413, 422,
                    body={"type": "object", "required": ["taskId"], "additionalProperties": False,
                          "properties": {"taskId": {"type": "string"}}},
                )
            },
            "/api/generate-image/pending": {
                "get": _op(
                    "The pending list, for front ends of the earlier /api/generate-image design",
                    {"type": "object", "required": ["pendingTasks"],
                     "properties": {"pendingTasks": {"type": "array", "items": {"type": "object"}}}},
                )
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
