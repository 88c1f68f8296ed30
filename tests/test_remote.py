"""RemoteTaskManager: what only the HTTP door does (the shared scenarios run in test_sync.py)."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from imagetask import (
    ConfigError,
    RemoteTaskManager,
    StoreError,
    SyncRemoteTaskManager,
    TaskManager,
    TaskNotFound,
    TooManyPending,
    ValidationError,
)
from imagetask.providers import FakeProvider
from imagetask.web import create_app
from test_manager import png

from conftest import uvicorn_serving


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[TaskManager, str, str]]:
    """A real server in front of a manager with workers; alice's token."""
    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(latency=0.1), poll_interval=0.05) as tm:
        token = await tm.tokens.create("alice")
        async with uvicorn_serving(create_app(tm, max_pending=2)) as base:
            yield tm, base, token


async def test_images_are_downloaded_once_and_checked(server, tmp_path):
    """wait() returns the task with each image downloaded into `images` under its sha256
    (the bytes match the server's file), and `url` pointing at the server."""
    tm, base, token = server
    async with RemoteTaskManager(base, token=token, images=tmp_path / "dl") as remote:
        task = await remote.submit("a boat", n=2)
        done = await remote.wait(task.id, timeout=10)
    local = await tm.poll(task.id)
    for mine, theirs in zip(done.images, local.images, strict=True):
        assert (
            mine.path.parent.parent == tmp_path / "dl" and mine.path.read_bytes() == theirs.path.read_bytes()
        )
        assert hashlib.sha256(mine.path.read_bytes()).hexdigest() == theirs.sha256
        assert mine.url is not None and mine.url.startswith(base + "/api/tasks/")


async def test_without_download_only_urls_are_given(server, tmp_path):
    """download=False writes no file; each image still has its url."""
    _, base, token = server
    async with RemoteTaskManager(base, token=token, images=tmp_path / "dl", download=False) as remote:
        done = await remote.wait((await remote.submit("x")).id, timeout=10)
    assert done.images[0].url and not (tmp_path / "dl").exists()


async def test_wait_polls_when_the_stream_is_down(tmp_path):
    """With the event stream answering 503, wait() still returns the finished task, by
    polling every poll_interval."""
    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(latency=0.2), poll_interval=0.05) as tm:
        token = await tm.tokens.create("alice")

        async def down(request: Any) -> JSONResponse:
            return JSONResponse({"error": {"code": "down", "message": "no stream", "field": None}}, 503)

        app = Starlette(routes=[Route("/api/stream", down), Mount("/", create_app(tm))])
        async with (
            uvicorn_serving(app) as base,
            RemoteTaskManager(base, token=token, poll_interval=0.1, images=tmp_path / "dl") as remote,
        ):
            task = await remote.submit("p")
            done = await remote.wait(task.id, timeout=10)
            assert done.ok and done.images[0].path.is_file()


async def test_errors_over_http_are_the_local_ones(server, tmp_path):
    """An unknown id is TaskNotFound naming the id as a local manager does (in upper case,
    also for poll, events and cancel given it in lower case; also in as_completed, before
    anything is yielded), another owner is a ValidationError naming owner, max_pending is
    TooManyPending with its numbers, a bad token fails at open with ConfigError, no server is
    a StoreError."""
    tm, base, token = server
    async with RemoteTaskManager(base, token=token, images=tmp_path / "dl") as remote:
        unknown = "01arz3ndektsv4rrffq69g5fav"
        with pytest.raises(TaskNotFound) as local:
            await tm.poll(unknown)
        for call in (remote.poll, remote.events, remote.cancel):
            with pytest.raises(TaskNotFound) as caught:
                await call(unknown)
            assert caught.value.task_id == local.value.task_id == unknown.upper()
            assert str(caught.value) == str(local.value)
        with pytest.raises(TaskNotFound):
            async for _ in remote.as_completed(["01ARZ3NDEKTSV4RRFFQ69G5FAV"], timeout=5):
                pass
        with pytest.raises(ValidationError) as caught:
            await remote.submit("p", owner="bob")
        assert caught.value.field == "owner"
        await tm.aclose()  # keep the tasks queued: workers no longer run them
    async with TaskManager(tm.path, provider=FakeProvider(), workers=False) as quiet:
        token = await quiet.tokens.create("carol")
        async with uvicorn_serving(create_app(quiet, max_pending=2)) as quiet_base:
            async with RemoteTaskManager(quiet_base, token=token) as remote:
                await remote.submit("1")
                await remote.submit("2")
                with pytest.raises(TooManyPending) as full:
                    await remote.submit("3")
                assert (full.value.owner, full.value.pending, full.value.limit) == ("carol", 2, 2)
            with pytest.raises(ConfigError):
                await RemoteTaskManager(quiet_base, token="itk_aaaaaaaaaaaa_" + "x" * 43).open()
    with pytest.raises(StoreError):
        await RemoteTaskManager(base, token=token).open()  # that server has stopped


async def test_the_sync_remote_door_blocks_and_says_what_it_cannot_do(server):
    """SyncRemoteTaskManager submits and waits blocking (from a thread, as a script would);
    health and prune, which need the database itself, raise ConfigError."""
    _, base, token = server

    def blocking() -> None:
        with SyncRemoteTaskManager(base, token=token) as remote:
            assert remote.wait(remote.submit("p").id, timeout=10).ok
            with pytest.raises(ConfigError):
                remote.health()
            with pytest.raises(ConfigError):
                remote.prune(0)

    await asyncio.to_thread(blocking)


def _evil_task(sha: str, url: str, images: int = 1) -> dict[str, Any]:
    image = {"index": 0, "url": url, "mime": "image/png", "width": 8, "height": 8, "sha256": sha, "size": 10}
    return {
        "id": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "owner": "alice", "prompt": "p", "model": "fake", "params": {},
        "status": "succeeded", "images": [dict(image, index=i) for i in range(images)], "references": [],
        "error": None, "attempts": 1, "max_attempts": 3, "cost": 1, "metadata": {},
        "idempotency_key": None, "created_at": None, "started_at": None, "finished_at": None,
    }  # fmt: skip


async def test_a_lying_server_cannot_steer_the_client(tmp_path):
    """A server answering with image URLs on another host and a sha256 that is a path: the
    client never requests another host (it builds image URLs itself), refuses the bad digest
    with StoreError, writes nothing outside its images folder, and does not send a task id
    that is not one (poll('../../credits') is TaskNotFound without a request)."""
    seen: list[str] = []
    png_bytes = png()
    sha = hashlib.sha256(png_bytes).hexdigest()

    async def me(request: Any) -> JSONResponse:
        return JSONResponse({"owner": "alice"})

    async def task(request: Any) -> JSONResponse:
        seen.append(str(request.url))
        if request.query_params.get("bad") or "BADSHA" in request.path_params["task_id"]:
            return JSONResponse(_evil_task("../../outside", "https://evil.example/steal"))
        return JSONResponse(_evil_task(sha, ".evil.example/steal", images=2))

    async def image(request: Any) -> Any:
        seen.append(str(request.url))
        from starlette.responses import Response

        return Response(png_bytes, media_type="image/png")

    app = Starlette(
        routes=[
            Route("/api/me", me),
            Route("/api/tasks/{task_id}", task),
            Route("/api/tasks/{task_id}/images/{index}", image),
        ]
    )
    async with (
        uvicorn_serving(app) as base,
        RemoteTaskManager(base, token="itk_x", images=tmp_path / "dl") as remote,
    ):
        done = await remote.poll("01ARZ3NDEKTSV4RRFFQ69G5FAV")  # two images, one sha: one download
        assert [im.path.read_bytes() for im in done.images] == [png_bytes, png_bytes]
        assert all(im.url and im.url.startswith(base + "/api/tasks/") for im in done.images)
        with pytest.raises(StoreError):
            await remote.poll("01ARZ3NDEKTSV4RRFFQ69GBADSHA")
        with pytest.raises(TaskNotFound):
            await remote.poll("../../credits")
    assert all(url.startswith(base) for url in seen)
    assert not (tmp_path / "outside").exists() and [p.name for p in (tmp_path / "dl").rglob("*.png")] == [
        f"{sha}.png"
    ]


async def test_wait_outlives_a_server_restart(tmp_path):
    """The server goes away while a task is waited for (no workers yet, so it is queued), and
    comes back on the same port with workers: wait() keeps polling through the outage and
    returns the finished task."""
    db = tmp_path / "t.db"
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()

    async def serve(tm: TaskManager) -> tuple[uvicorn.Server, asyncio.Task[None]]:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        server = uvicorn.Server(
            uvicorn.Config(create_app(tm), log_level="warning", timeout_graceful_shutdown=0.5)
        )
        task = asyncio.create_task(server.serve(sockets=[s]))
        while not server.started:
            await asyncio.sleep(0.01)
        return server, task

    async with TaskManager(db, provider=FakeProvider(), workers=False) as first:
        token = await first.tokens.create("alice")
        server, serving = await serve(first)
        remote = await RemoteTaskManager(
            f"http://127.0.0.1:{port}", token=token, poll_interval=0.1, images=tmp_path / "dl"
        ).open()
        task = await remote.submit("p")
        waiting = asyncio.create_task(remote.wait(task.id, timeout=30))
        await asyncio.sleep(0.3)
        server.should_exit = True
        await serving
    await asyncio.sleep(0.5)  # down: the client polls into a closed port
    assert not waiting.done()
    async with TaskManager(db, provider=FakeProvider(), poll_interval=0.05) as second:
        server, serving = await serve(second)
        try:
            done = await waiting
            assert done.ok and done.images[0].path.is_file()
        finally:
            await remote.aclose()
            server.should_exit = True
            await serving


async def test_a_manager_without_workers_validates_against_gemini_without_a_key(tmp_path, monkeypatch):
    """TaskManager(workers=False) with no provider and no key validates and prices against
    Gemini's model table, and its tasks are Gemini's (a FakeProvider worker leaves them)."""
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    async with TaskManager(tmp_path / "t.db", workers=False) as tm:
        task = await tm.submit("x", model="gemini-3-pro-image-preview", size="4K")
        assert task.cost == 6 and tm.provider is not None and tm.provider.name == "gemini"
        with pytest.raises(ValidationError):
            await tm.submit("x", model="fake")
