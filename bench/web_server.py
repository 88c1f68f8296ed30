"""A server for the web benchmarks, run in its own process: ``python web_server.py KIND DB FD``.

KIND is ``bare`` (a plain Starlette route doing imagetask's one-statement task read with the
stdlib, the floor), ``imagetask`` (``create_app`` without workers) or ``sse`` (``create_app``
with FakeProvider workers, for the stream case). FD is a listening socket inherited from the
benchmark, so there is no port race.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import sys
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from imagetask import TaskManager
from imagetask._store.reads import _GET_ONE
from imagetask.providers import FakeProvider
from imagetask.web import create_app


def bare(db: str) -> Starlette:
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row

    async def poll(request: Request) -> Response:
        rows = conn.execute(_GET_ONE, (request.path_params["task_id"],)).fetchall()
        if not rows:
            return JSONResponse({"error": "not found"}, 404)
        task: dict[str, Any] = {k: rows[0][k] for k in rows[0].keys()}  # noqa: SIM118
        task["params"] = json.loads(task["params"])
        return JSONResponse(task)

    return Starlette(routes=[Route("/api/tasks/{task_id}", poll)])


def main() -> None:
    kind, db, fd = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if kind == "bare":
        app: Any = bare(db)
    elif kind == "imagetask":
        app = create_app(TaskManager(db, provider=FakeProvider(), workers=False), max_pending=None)
    else:
        latency = float(sys.argv[4])
        tm = TaskManager(db, provider=FakeProvider(latency=latency), concurrency=1000, per_owner=1)
        app = create_app(tm, max_pending=None)
    # socket(fileno=) reads the family off the socket (uvicorn's own fd= assumes AF_UNIX, and
    # then asyncio leaves Nagle on: 40 ms a request).
    sock = socket.socket(fileno=fd)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)).run(sockets=[sock])


if __name__ == "__main__":
    main()
