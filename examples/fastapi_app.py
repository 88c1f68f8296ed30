"""A FastAPI app that embeds a TaskManager: submit answers at once, polling reads the database.

The manager opens in the app's lifespan and closes with it. Run it with
`uvicorn examples.fastapi_app:app`; run this file to try it in-process (offline, on
FakeProvider with Gemini's model table). For production, pass `workers=False` here and run
`imagetask worker` beside it (see examples/web_and_worker.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request

from imagetask import InsufficientCredits, TaskManager, TaskNotFound, ValidationError, default_home
from imagetask.providers import GEMINI_MODELS, FakeProvider


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    provider = FakeProvider(latency=0.5, models=GEMINI_MODELS)  # drop it to use Gemini
    async with TaskManager(default_home() / "fastapi-example.db", provider=provider) as tm:
        app.state.tm = tm
        yield


app = FastAPI(lifespan=lifespan)


def user(request: Request) -> str:
    """Who is asking: your app's own sign-in goes here (a session, a token)."""
    return request.headers.get("x-user", "demo")


@app.post("/generate", status_code=202)
async def generate(request: Request, body: dict[str, Any]) -> dict[str, Any]:
    try:
        task = await request.app.state.tm.submit(body.get("prompt"), owner=user(request), n=body.get("n", 1))
    except ValidationError as exc:
        raise HTTPException(422, {"field": exc.field, "message": str(exc)}) from None
    except InsufficientCredits as exc:
        raise HTTPException(402, str(exc)) from None
    return {"status": "processing", "taskId": task.id}


@app.get("/tasks/{task_id}")
async def poll(request: Request, task_id: str) -> dict[str, Any]:
    try:
        task = await request.app.state.tm.poll(task_id)  # one database read
    except (TaskNotFound, ValidationError):
        raise HTTPException(404, "no such task") from None
    if task.owner != user(request):
        raise HTTPException(404, "no such task")  # never tell others' tasks apart from none
    if not task.done:
        return {"status": "processing"}
    if task.ok:
        return {"status": "completed", "images": [str(im.path) for im in task.images]}
    assert task.error is not None
    return {"status": "failed", "error": {"code": task.error.code, "message": task.error.message}}


@app.get("/pending")
async def pending(request: Request) -> dict[str, Any]:
    tasks = await request.app.state.tm.pending(owner=user(request))  # after a reload, too
    return {"pendingTasks": [{"task_id": t.id, "prompt": t.prompt, "status": t.status.value} for t in tasks]}


if __name__ == "__main__":
    from fastapi.testclient import TestClient

    with TestClient(app) as client:  # runs the lifespan: the manager opens and closes
        started = time.monotonic()
        answer = client.post("/generate", json={"prompt": "a lighthouse at dusk", "n": 2})
        print(
            "POST /generate ->", answer.status_code, answer.json(), f"in {time.monotonic() - started:.3f} s"
        )
        task_id = answer.json()["taskId"]
        print("GET /pending ->", client.get("/pending").json())
        while (state := client.get(f"/tasks/{task_id}").json())["status"] == "processing":
            time.sleep(0.1)
        print("GET /tasks/{id} ->", state)
        assert state["status"] == "completed", state
        assert client.get(f"/tasks/{task_id}", headers={"x-user": "mallory"}).status_code == 404
        assert client.post("/generate", json={"prompt": ""}).status_code == 422
