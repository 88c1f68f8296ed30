"""The web door: the JSON API, the seed's endpoints, auth and isolation, limits, the stream,
through httpx against the ASGI app in-process and against a real uvicorn server."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from imagetask import TaskManager, TaskStatus
from imagetask._images import thumbnail_folder, thumbnail_path
from imagetask.providers import FakeProvider
from imagetask.testing import Faults
from imagetask.web import create_app
from test_manager import png

from conftest import uvicorn_serving


def snapshot(db: Path) -> list[Any]:
    """Every row of every table (the test's independent view: a refused request changes none)."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        tables = [
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        ]
        return [(t, conn.execute(f"SELECT * FROM {t}").fetchall()) for t in tables]
    finally:
        conn.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Web:
    """An app on an open manager, tokens for alice and bob, and an httpx client."""

    def __init__(self, tm: TaskManager, client: httpx.AsyncClient, alice: str, bob: str) -> None:
        self.tm, self.client = tm, client
        self.alice = {"Authorization": f"Bearer {alice}"}
        self.bob = {"Authorization": f"Bearer {bob}"}


@pytest.fixture(params=["asgi", "uvicorn"])
async def web(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Web]:
    """The app on an open manager, called in-process (ASGI) or over a real uvicorn server."""
    async with TaskManager(
        tmp_path / "t.db", provider=FakeProvider(latency=0.05), poll_interval=0.05, retry_delay=0.01
    ) as tm:
        alice, bob = await tm.tokens.create("alice"), await tm.tokens.create("bob")
        app = create_app(tm, max_pending=5, max_body=64 * 1024, max_upload=512 * 1024)
        if request.param == "asgi":
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                yield Web(tm, client, alice, bob)
            return
        async with uvicorn_serving(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as client:
            yield Web(tm, client, alice, bob)


# --- the JSON API ---------------------------------------------------------------------------


async def test_submit_answers_202_with_the_queued_task_and_poll_shows_it_end(web):
    """POST /api/tasks answers 202 with the task (queued, owner from the token); GET of it
    later shows it succeeded with image URLs by index, and no file paths anywhere."""
    r = await web.client.post("/api/tasks", json={"prompt": "a lighthouse", "n": 2}, headers=web.alice)
    assert r.status_code == 202
    task = r.json()
    assert task["status"] == "queued" and task["owner"] == "alice" and task["prompt"] == "a lighthouse"
    await web.tm.wait(task["id"], timeout=10)
    r = await web.client.get(f"/api/tasks/{task['id']}", headers=web.alice)
    done = r.json()
    assert r.status_code == 200 and done["status"] == "succeeded"
    assert [im["url"] for im in done["images"]] == [f"/api/tasks/{task['id']}/images/{i}" for i in (0, 1)]
    assert "path" not in json.dumps(done)


async def test_json_answers_are_never_stored_by_a_cache(web):
    """JSON answers (a task, a list, events, errors) carry Cache-Control: private, no-store:
    they are one owner's and change as tasks run; images keep their own immutable caching."""
    task = (await web.client.post("/api/tasks", json={"prompt": "p"}, headers=web.alice)).json()
    for url in (
        f"/api/tasks/{task['id']}",
        "/api/tasks",
        f"/api/tasks/{task['id']}/events",
        "/api/tasks/pending",
    ):
        r = await web.client.get(url, headers=web.alice)
        assert r.status_code == 200 and r.headers["cache-control"] == "private, no-store", url
    refused = await web.client.get("/api/tasks/" + "01" + "0" * 24, headers=web.alice)
    assert refused.status_code == 404 and refused.headers["cache-control"] == "private, no-store"


async def test_the_page_may_be_framed_only_by_its_own_site(web):
    """The page at / (which keeps its token in the browser) tells browsers that only its own
    site may frame it, in both headers browsers read."""
    r = await web.client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert r.headers["content-security-policy"] == "frame-ancestors 'self'"
    assert r.headers["x-frame-options"] == "SAMEORIGIN"


async def test_images_have_a_strong_etag_immutable_caching_and_a_cached_thumbnail(web):
    """An image answers its bytes with ETag = its sha256 and immutable caching; If-None-Match
    gives 304; ?w=32 is a WebP 64 wide (the next of the fixed widths), written to the
    thumbnail cache once; a width past the image's own is the image's width."""
    task = (await web.client.post("/api/tasks", json={"prompt": "p"}, headers=web.alice)).json()
    done = await web.tm.wait(task["id"], timeout=10)
    r = await web.client.get(f"/api/tasks/{task['id']}/images/0", headers=web.alice)
    assert r.status_code == 200 and r.content == done.images[0].path.read_bytes()
    assert r.headers["etag"] == f'"{done.images[0].sha256}"'
    assert "immutable" in r.headers["cache-control"]
    again = await web.client.get(
        f"/api/tasks/{task['id']}/images/0", headers={**web.alice, "If-None-Match": r.headers["etag"]}
    )
    assert again.status_code == 304 and again.content == b""
    thumb = await web.client.get(f"/api/tasks/{task['id']}/images/0?w=32", headers=web.alice)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
    with Image.open(io.BytesIO(thumb.content)) as im:
        assert im.width == 64
    wide = await web.client.get(f"/api/tasks/{task['id']}/images/0?w=2000", headers=web.alice)
    with Image.open(io.BytesIO(wide.content)) as im:
        assert im.width == done.images[0].width
    cache = web.tm.images_root.with_name(web.tm.images_root.name + "-thumbnails")
    assert len(list(cache.rglob("*.webp"))) == 2
    bad = await web.client.get(f"/api/tasks/{task['id']}/images/0?w=5", headers=web.alice)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "w"
    missing = await web.client.get(f"/api/tasks/{task['id']}/images/7", headers=web.alice)
    assert missing.status_code == 404


async def test_list_pages_with_before_and_pending_lists_only_unfinished(web):
    """GET /api/tasks pages newest first with next_before; /api/tasks/pending lists the
    caller's queued and running tasks."""
    await web.tm.aclose()  # no workers: the tasks stay queued
    async with TaskManager(web.tm.path, provider=FakeProvider(), workers=False) as tm:
        app = create_app(tm)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            ids = [
                (await c.post("/api/tasks", json={"prompt": f"p{i}"}, headers=web.alice)).json()["id"]
                for i in range(3)
            ]
            first = (await c.get("/api/tasks?limit=2", headers=web.alice)).json()
            assert [t["id"] for t in first["tasks"]] == ids[::-1][:2] and first["next_before"] == ids[1]
            rest = (
                await c.get(f"/api/tasks?limit=2&before={first['next_before']}", headers=web.alice)
            ).json()
            assert [t["id"] for t in rest["tasks"]] == [ids[0]] and rest["next_before"] is None
            pending = (await c.get("/api/tasks/pending", headers=web.alice)).json()
            assert {t["id"] for t in pending["tasks"]} == set(ids)
            cancelled = (await c.post(f"/api/tasks/{ids[0]}/cancel", headers=web.alice)).json()
            assert cancelled["status"] == "cancelled"
            events = (await c.get(f"/api/tasks/{ids[0]}/events", headers=web.alice)).json()["events"]
            assert [e["kind"] for e in events] == ["cancelled"]


async def test_multipart_submit_stores_the_reference_images(web):
    """A multipart submit with two `images` files stores them as the task's references."""
    files = [
        ("images", ("a.png", png(color="red"), "image/png")),
        ("images", ("b.png", png(color="blue"), "image/png")),
    ]
    r = await web.client.post(
        "/api/tasks", data={"prompt": "mix these", "n": "1"}, files=files, headers=web.alice
    )
    assert r.status_code == 202, r.text
    assert len(r.json()["references"]) == 2
    task = await web.tm.poll(r.json()["id"])
    assert [im.path.read_bytes() for im in task.references] == [png(color="red"), png(color="blue")]


async def test_credits_answer_the_callers_balance(web):
    """GET /api/credits answers the caller's own balance."""
    await web.tm.credits.grant("alice", 7)
    r = await web.client.get("/api/credits", headers=web.alice)
    assert r.json() == {"owner": "alice", "balance": 7, "charging": False}


# --- the seed's endpoints -------------------------------------------------------------------


async def test_the_seeds_three_endpoints_with_its_field_names(web):
    """The seed page's calls, as it sends them (a JSON string body, text/plain): generate
    answers processing + taskId, pending lists it as pendingTasks, polling answers
    processing then completed with image URLs."""
    plain = {**web.alice, "Content-Type": "text/plain;charset=UTF-8"}
    r = await web.client.post("/api/generate-image", content=json.dumps({"prompt": "a cat"}), headers=plain)
    assert r.status_code == 200 and r.json()["status"] == "processing"
    task_id = r.json()["taskId"]
    pending = (await web.client.get("/api/generate-image/pending", headers=web.alice)).json()
    assert [p["task_id"] for p in pending["pendingTasks"]] == [task_id]
    assert (
        pending["pendingTasks"][0]["prompt"] == "a cat"
        and pending["pendingTasks"][0]["status"] == "processing"
    )
    await web.tm.wait(task_id, timeout=10)
    poll = await web.client.post(
        "/api/generate-image/polling", content=json.dumps({"taskId": task_id}), headers=plain
    )
    assert poll.json() == {"status": "completed", "images": [f"/api/tasks/{task_id}/images/0"]}


async def test_the_seeds_polling_reports_a_failure_with_its_reason(tmp_path):
    """A refused generation polls as failed with the error's code and message."""
    async with TaskManager(
        tmp_path / "t.db", provider=FakeProvider(outcomes=["refusal"]), poll_interval=0.05
    ) as tm:
        token = await tm.tokens.create("alice")
        app = create_app(tm)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            h = {"Authorization": f"Bearer {token}"}
            task_id = (await c.post("/api/generate-image", content='{"prompt": "x"}', headers=h)).json()[
                "taskId"
            ]
            await tm.wait(task_id, timeout=10)
            poll = (
                await c.post(
                    "/api/generate-image/polling", content=json.dumps({"taskId": task_id}), headers=h
                )
            ).json()
    assert poll["status"] == "failed" and poll["error"]["code"] and poll["error"]["message"]


# --- auth and isolation ---------------------------------------------------------------------


async def test_missing_or_wrong_credentials_are_401_on_every_api_route(web):
    """No header, a wrong token, a revoked token, another scheme: 401 with a JSON error."""
    bad_token = {"Authorization": "Bearer itk_aaaaaaaaaaaa_" + "x" * 43}
    revoked = await web.tm.tokens.create("carol")
    await web.tm.tokens.revoke(revoked)
    for headers in ({}, bad_token, {"Authorization": f"Bearer {revoked}"}, {"Authorization": "Basic abc"}):
        for method, url in [("GET", "/api/tasks"), ("POST", "/api/tasks"), ("GET", "/api/tasks/pending"),
                            ("GET", "/api/credits"), ("GET", "/api/stream"), ("POST", "/api/generate-image"),
                            ("GET", "/api/generate-image/pending")]:  # fmt: skip
            r = await web.client.request(method, url, headers=headers, json={"prompt": "x"})
            assert r.status_code == 401, (method, url, headers)
            assert r.json()["error"]["code"] == "unauthorized"


async def asgi_client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_another_owner_cannot_cancel_a_queued_task(tmp_path):
    """Bob's cancel of alice's queued task is a 404 that changes nothing: the task stays
    queued and alice keeps her charge (nothing refunded, nothing cancelled)."""
    async with TaskManager(tmp_path / "t.db", workers=False, credits=True) as tm:
        alice, bob = await tm.tokens.create("alice"), await tm.tokens.create("bob")
        await tm.credits.grant("alice", 5)
        async with await asgi_client(create_app(tm)) as c:
            task = (await c.post("/api/tasks", json={"prompt": "mine"}, headers=bearer(alice))).json()
            r = await c.post(f"/api/tasks/{task['id']}/cancel", headers=bearer(bob))
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert (await tm.poll(task["id"])).status is TaskStatus.QUEUED
        assert await tm.credits.balance("alice") == 5 - task["cost"]


async def test_a_thumbnail_has_an_etag_of_its_own(tmp_path):
    """A thumbnail (?w=) is another representation: the full image's ETag does not make it a
    304, and its own ETag differs (and does)."""
    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), poll_interval=0.05) as tm:
        alice = await tm.tokens.create("alice")
        async with await asgi_client(create_app(tm)) as c:
            task = (await c.post("/api/tasks", json={"prompt": "p"}, headers=bearer(alice))).json()
            await tm.wait(task["id"], timeout=10)
            url = f"/api/tasks/{task['id']}/images/0"
            full = await c.get(url, headers=bearer(alice))
            thumb = await c.get(
                f"{url}?w=64", headers={**bearer(alice), "If-None-Match": full.headers["etag"]}
            )
            assert thumb.status_code == 200 and thumb.headers["etag"] != full.headers["etag"]
            again = await c.get(
                f"{url}?w=64", headers={**bearer(alice), "If-None-Match": thumb.headers["etag"]}
            )
            assert again.status_code == 304


async def test_a_stream_ticket_relabelled_to_another_owner_is_refused(tmp_path):
    """With auth= (a session: no API token behind the ticket), a ticket whose owner part is
    swapped for another owner's name is a 401: the signature covers the owner."""
    async with TaskManager(tmp_path / "t.db", workers=False) as tm:
        app = create_app(tm, auth=lambda r: r.headers.get("x-user"))
        client = await asgi_client(app)
        async with client as c:
            ticket = (await c.post("/api/stream/ticket", headers={"x-user": "dana"})).json()["ticket"]
            _, rest = ticket.split(".", 1)
            erin = base64.urlsafe_b64encode(b"erin").decode().rstrip("=")
            relabelled = await asyncio.wait_for(c.get(f"/api/stream?ticket={erin}.{rest}"), 10)
            assert relabelled.status_code == 401


async def test_a_batch_with_one_bad_request_writes_none(tmp_path):
    """A batch whose second request is invalid is a 422 naming it, and none of the batch is
    written: all or none."""
    async with TaskManager(tmp_path / "t.db", workers=False) as tm:
        alice = await tm.tokens.create("alice")
        async with await asgi_client(create_app(tm)) as c:
            body = {"requests": [{"prompt": "ok"}, {"prompt": "x", "n": 99}]}
            r = await c.post("/api/tasks/batch", json=body, headers=bearer(alice))
        assert r.status_code == 422 and "n" in r.json()["error"]["field"]
        assert await tm.list() == []


async def test_another_owners_task_is_404_on_every_route(web):
    """Bob's token gets 404 for alice's finished task, image, thumbnail, events, cancel and
    seed poll, exactly as for a task that does not exist; alice's task is untouched. (A
    queued one: `test_another_owner_cannot_cancel_a_queued_task`; streams:
    `test_the_stream_tells_each_owner_of_their_own_tasks_only_and_resumes`.)"""
    files = [("images", ("a.png", png(), "image/png"))]
    task = (
        await web.client.post("/api/tasks", data={"prompt": "mine"}, files=files, headers=web.alice)
    ).json()
    await web.tm.wait(task["id"], timeout=10)
    tid = task["id"]
    assert (await web.client.get(f"/api/tasks/{tid}/references/0", headers=web.alice)).status_code == 200
    for method, url in [("GET", f"/api/tasks/{tid}"), ("GET", f"/api/tasks/{tid}/images/0"),
                        ("GET", f"/api/tasks/{tid}/images/0?w=64"), ("GET", f"/api/tasks/{tid}/events"),
                        ("GET", f"/api/tasks/{tid}/references/0"),
                        ("POST", f"/api/tasks/{tid}/cancel")]:  # fmt: skip
        theirs = await web.client.request(method, url, headers=web.bob)
        nothing = await web.client.request(method, url.replace(tid, "01" + "0" * 24), headers=web.bob)
        assert theirs.status_code == nothing.status_code == 404, url
        assert theirs.json() == nothing.json()
    seed = await web.client.post("/api/generate-image/polling", json={"taskId": tid}, headers=web.bob)
    assert seed.status_code == 404
    assert (await web.client.get("/api/tasks", headers=web.bob)).json()["tasks"] == []
    assert (await web.tm.poll(tid)).status.value == "succeeded"


# --- limits: refused requests write nothing -------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ('{"prompt": ', 400, None),
        ("[1, 2]", 400, None),
        ('{"prompt": "x", "colour": "red"}', 422, "colour"),
        ('{"prompt": 5}', 422, "prompt"),
        ('{"prompt": "x", "n": "2"}', 422, "n"),
        ('{"prompt": "x", "n": 99}', 422, "n"),
        ('{"n": 1}', 422, "prompt"),
        ('{"prompt": "x", "aspect_ratio": "7:3"}', 422, "aspect_ratio"),
        ('{"prompt": "x", "metadata": [1]}', 422, "metadata"),
    ],
)
async def test_bad_submits_name_the_field_and_write_nothing(web, body, status, field):
    """Bad JSON is 400; wrong types, unknown fields, out-of-range values are 422 naming the
    field; the database is unchanged."""
    before = snapshot(web.tm.path)
    r = await web.client.post(
        "/api/tasks", content=body, headers={**web.alice, "Content-Type": "application/json"}
    )
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field
    assert snapshot(web.tm.path) == before


@pytest.mark.parametrize("n", ["abc", "0", "9", "-1"])
async def test_a_multipart_n_out_of_range_names_the_real_range(web, n):
    """A multipart form's n that is not an integer from 1 to 8 is a 422 on field n that says
    so (the range a submit really takes), and writes nothing."""
    before = snapshot(web.tm.path)
    files = [("images", ("a.png", png(), "image/png"))]
    r = await web.client.post("/api/tasks", data={"prompt": "x", "n": n}, files=files, headers=web.alice)
    assert r.status_code == 422 and r.json()["error"]["field"] == "n"
    assert "from 1 to 8" in r.json()["error"]["message"]
    assert snapshot(web.tm.path) == before


async def test_bodies_over_the_caps_are_413_and_write_nothing(web):
    """A JSON body over max_body and an upload over max_upload are refused with 413."""
    before = snapshot(web.tm.path)
    big = json.dumps({"prompt": "x" * (70 * 1024)})
    assert (await web.client.post("/api/tasks", content=big, headers=web.alice)).status_code == 413
    files = [("images", ("a.png", b"\0" * (600 * 1024), "image/png"))]
    r = await web.client.post("/api/tasks", data={"prompt": "x"}, files=files, headers=web.alice)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    assert snapshot(web.tm.path) == before


async def test_an_owner_at_max_pending_gets_429_with_retry_after(tmp_path):
    """With max_pending=2 and no workers, alice's third submit is 429 with Retry-After and no
    row; bob may still submit."""
    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False) as tm:
        alice, bob = await tm.tokens.create("alice"), await tm.tokens.create("bob")
        app = create_app(tm, max_pending=2)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            for i in range(2):
                r = await c.post(
                    "/api/tasks", json={"prompt": f"p{i}"}, headers={"Authorization": f"Bearer {alice}"}
                )
                assert r.status_code == 202
            before = snapshot(tm.path)
            r = await c.post(
                "/api/tasks", json={"prompt": "p3"}, headers={"Authorization": f"Bearer {alice}"}
            )
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "too_many_pending"
            assert snapshot(tm.path) == before
            r = await c.post("/api/tasks", json={"prompt": "b"}, headers={"Authorization": f"Bearer {bob}"})
            assert r.status_code == 202


async def test_a_database_that_cannot_answer_is_a_503_that_names_no_server_path(tmp_path, caplog):
    """A write the database refused (here: its lock held elsewhere past the busy timeout) is a
    503 with Retry-After and a message that names no file of the server; the log has the
    reason, path included. Nothing is written."""
    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode = sqlite3.SQLITE_BUSY  # as SQLite's own error carries it
    faults = Faults()
    async with TaskManager(tmp_path / "t.db", workers=False, faults=faults) as tm:
        alice = await tm.tokens.create("alice")
        faults.fail("submit", locked, times=2)  # the loop's small write, then the writer's
        transport = httpx.ASGITransport(app=create_app(tm))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            with caplog.at_level("WARNING", logger="imagetask.web"):
                r = await c.post("/api/tasks", json={"prompt": "refused"}, headers=bearer(alice))
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "unavailable" and str(tmp_path) not in r.text
        assert any(str(tmp_path) in rec.getMessage() for rec in caplog.records)
        assert await tm.list() == []


async def _stalled_upload(base: str, token: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A multipart submit that sends its headers and the first line of its body, then nothing."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /api/tasks HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer " + token.encode() + b"\r\n"
        b"Content-Type: multipart/form-data; boundary=XX\r\nContent-Length: 100000\r\n\r\n--XX\r\n"
    )
    await writer.drain()
    return reader, writer


async def _status_of(reader: asyncio.StreamReader) -> int:
    return int((await reader.readline()).split()[1])


async def test_stalled_uploads_of_one_owner_never_block_another_owners(tmp_path):
    """Over a real server: alice's four uploads that stall mid-body take two upload slots at
    most (the other two get 429 at once), bob's multipart submit goes through meanwhile, and
    the stalled ones get 408 once upload_timeout (1 s) has passed. Nothing of theirs is written."""
    async with TaskManager(tmp_path / "t.db", workers=False) as tm:
        alice, bob = await tm.tokens.create("alice"), await tm.tokens.create("bob")
        async with uvicorn_serving(create_app(tm, upload_timeout=1.0)) as base:
            stalled = [await _stalled_upload(base, alice) for _ in range(4)]
            answers = [asyncio.ensure_future(_status_of(reader)) for reader, _ in stalled]
            # Once one is refused (429), two others hold their slots.
            await asyncio.wait(answers, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            async with httpx.AsyncClient(base_url=base, timeout=10) as c:
                files = {"images": ("ref.png", png(), "image/png")}
                r = await c.post("/api/tasks", data={"prompt": "bob's"}, files=files, headers=bearer(bob))
            assert r.status_code == 202, r.text
            statuses = sorted(await asyncio.wait_for(asyncio.gather(*answers), 10))
            for _, writer in stalled:
                writer.close()
        assert statuses == [408, 408, 429, 429]
        assert [t.owner for t in await tm.list()] == ["bob"]


# --- the stream -----------------------------------------------------------------------------


async def _read_events(lines: AsyncIterator[str], count: int) -> list[dict[str, Any]]:
    """The next ``count`` task messages of an open SSE response's lines, with their ids."""
    found: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    async for line in lines:
        if line.startswith("id: "):
            current["id"] = int(line[4:])
        elif line.startswith("data: "):
            current["data"] = json.loads(line[6:])
        elif line == "" and "data" in current:
            found.append(current)
            current = {}
            if len(found) == count:
                return found
    return found


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[str, TaskManager, str, str]]:
    """The app on a real uvicorn server on 127.0.0.1 (in this test's loop)."""
    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(latency=0.2), poll_interval=0.05) as tm:
        alice, bob = await tm.tokens.create("alice"), await tm.tokens.create("bob")
        async with uvicorn_serving(create_app(tm), lifespan="on") as base:
            yield base, tm, alice, bob


async def test_the_stream_tells_each_owner_of_their_own_tasks_only_and_resumes(served):
    """Over a real server: alice's stream (opened with a ticket, as EventSource must) carries
    her task's claimed and succeeded events with the task, never bob's; reconnecting with
    Last-Event-ID replays exactly what came after it."""
    base, _, alice, bob = served
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        ticket = (await c.post("/api/stream/ticket", headers={"Authorization": f"Bearer {alice}"})).json()[
            "ticket"
        ]
        async with c.stream("GET", f"/api/stream?ticket={ticket}") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()
            # The stream's first line comes once it has joined the feed: every later event reaches it.
            assert await asyncio.wait_for(anext(lines), 10) == "retry: 3000"
            await c.post("/api/tasks", json={"prompt": "bob's"}, headers={"Authorization": f"Bearer {bob}"})
            mine = (
                await c.post("/api/tasks", json={"prompt": "a"}, headers={"Authorization": f"Bearer {alice}"})
            ).json()
            got = await asyncio.wait_for(_read_events(lines, 2), 10)
        assert [m["data"]["event"] for m in got] == ["claimed", "succeeded"]
        assert all(m["data"]["task_id"] == mine["id"] for m in got)
        assert got[1]["data"]["task"]["status"] == "succeeded" and got[1]["data"]["task"]["images"]
        headers = {"Authorization": f"Bearer {alice}", "Last-Event-ID": str(got[0]["id"])}
        async with c.stream("GET", "/api/stream", headers=headers) as again:
            (replayed,) = await asyncio.wait_for(_read_events(again.aiter_lines(), 1), 10)
        assert replayed["id"] == got[1]["id"]
        bad = await c.get("/api/stream?ticket=forged.1.x")
        assert bad.status_code == 401


async def test_openapi_describes_the_api(web):
    """/openapi.json is an OpenAPI 3.1 description listing the task routes."""
    spec = (await web.client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.1")
    assert {"/api/tasks", "/api/tasks/{task_id}", "/api/tasks/{task_id}/images/{index}"} <= set(spec["paths"])


async def test_the_app_mounts_under_a_prefix_with_urls_under_it(tmp_path):
    """Mounted at /gen in another Starlette app, the routes and the image URLs live under /gen."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), poll_interval=0.05) as tm:
        token = await tm.tokens.create("alice")
        outer = Starlette(routes=[Mount("/gen", app=create_app(tm))])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outer), base_url="http://t") as c:
            h = {"Authorization": f"Bearer {token}"}
            task = (await c.post("/gen/api/tasks", json={"prompt": "p"}, headers=h)).json()
            await tm.wait(task["id"], timeout=10)
            done = (await c.get(f"/gen/api/tasks/{task['id']}", headers=h)).json()
            assert done["images"][0]["url"] == f"/gen/api/tasks/{task['id']}/images/0"
            assert (await c.get(done["images"][0]["url"], headers=h)).status_code == 200


async def test_an_auth_callable_signs_requests_in(tmp_path):
    """With auth=callable (the embedding app's session), the owner it returns is used, and
    None is a 401."""
    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False) as tm:
        app = create_app(tm, auth=lambda request: request.cookies.get("user"))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert (await c.get("/api/credits")).status_code == 401
            c.cookies.set("user", "dana")
            assert (await c.get("/api/credits")).json()["owner"] == "dana"


def test_import_imagetask_never_imports_the_web_door():
    """`import imagetask` (and its CLI module) loads neither imagetask.web nor Starlette."""
    import subprocess
    import sys

    code = (
        "import sys, imagetask, imagetask._cli; "
        "assert 'imagetask.web' not in sys.modules and 'starlette' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_the_apps_lifespan_opens_and_closes_a_manager_it_was_given_closed(tmp_path):
    """Run on its own (no request at all), the app opens a manager that is not open at
    startup and closes it at shutdown; a manager opened by the caller stays open."""
    tm = TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False)
    app = create_app(tm)
    async with app.router.lifespan_context(app):
        assert tm.is_open
    assert not tm.is_open
    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False) as mine:
        app = create_app(mine)
        async with app.router.lifespan_context(app):
            pass
        assert mine.is_open


async def test_thumbnails_asked_at_once_are_made_once_and_whole(web):
    """Twenty requests at once for the same new thumbnail all answer the same whole WebP,
    and the cache holds one file and no temporary one."""
    task = (await web.client.post("/api/tasks", json={"prompt": "p"}, headers=web.alice)).json()
    await web.tm.wait(task["id"], timeout=10)
    url = f"/api/tasks/{task['id']}/images/0?w=100"
    answers = await asyncio.gather(*(web.client.get(url, headers=web.alice) for _ in range(20)))
    assert {r.status_code for r in answers} == {200} and len({r.content for r in answers}) == 1
    with Image.open(io.BytesIO(answers[0].content)) as im:
        im.load()
    cache = web.tm.images_root.with_name(web.tm.images_root.name + "-thumbnails")
    assert [p.name.endswith(".webp") for p in cache.rglob("*") if p.is_file()] == [True]


async def test_prune_deletes_the_cached_thumbnails_of_the_images_it_deletes(tmp_path):
    """prune deletes the cached thumbnails of the images it deletes, with their emptied
    folders, and keeps those of a task it keeps; it also clears WebP files of the older
    digest-named layout and its temporary files over an hour old (a newer one stays), and
    leaves other files alone."""
    provider = FakeProvider(outcomes=["ok", "hang"])
    async with TaskManager(tmp_path / "t.db", provider=provider, poll_interval=0.05) as tm:
        auth = {"Authorization": f"Bearer {await tm.tokens.create('alice')}"}
        transport = httpx.ASGITransport(app=create_app(tm))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            done = await tm.wait((await tm.submit("pruned soon", owner="alice")).id, timeout=10)
            kept = await tm.submit("kept: it runs", owner="alice", images=[png(80, 80)])
            while provider.active < 1:
                await asyncio.sleep(0.01)
            for url in (f"/api/tasks/{done.id}/images/0?w=64", f"/api/tasks/{done.id}/images/0?w=128",
                        f"/api/tasks/{kept.id}/references/0?w=64"):  # fmt: skip
                assert (await client.get(url, headers=auth)).status_code == 200
        cache = thumbnail_folder(tm.images_root)
        old_layout = cache / "ab" / ("ab" * 32 + "-w64.webp")
        stale, fresh, foreign = (
            cache / "2020" / ".a1-0.png.w64.webp.x1.tmp",
            cache / "2021" / ".a1-0.png.w64.webp.x2.tmp",
            cache / "notes.txt",
        )
        for path in (old_layout, stale, fresh, foreign):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
        os.utime(stale, (time.time() - 7200, time.time() - 7200))
        done_thumbs = thumbnail_path(cache, tm.images_root, done.images[0].path, 64).parent
        assert len(list(done_thumbs.iterdir())) == 2
        report = await tm.prune(older_than=0)
    assert report.tasks == 1 and report.thumbnails == 4  # two of its own, the old layout, the stale
    kept_thumb = thumbnail_path(cache, tm.images_root, kept.references[0].path, 64)
    left = sorted(p for p in cache.rglob("*") if p.is_file())
    assert left == sorted([kept_thumb, fresh, foreign])
    assert not done_thumbs.exists() and not old_layout.parent.exists() and not stale.parent.exists()


@pytest.mark.parametrize("option", ["keepalive", "upload_timeout"])
@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), True, "60"])
async def test_durations_of_create_app_that_are_not_positive_seconds_are_refused(tmp_path, option, value):
    """create_app's keepalive and upload_timeout must be a positive, finite number of seconds:
    anything else is a ConfigError naming the option."""
    from imagetask import ConfigError

    async with TaskManager(tmp_path / "t.db", workers=False) as tm:
        with pytest.raises(ConfigError, match=rf"^{option}: must be"):
            create_app(tm, **{option: value})


async def test_a_thumbnail_folder_inside_the_image_folder_is_refused(tmp_path):
    """create_app refuses a thumbnails folder that is the image folder or inside it (thumbnails
    in the task folders would outlive their images), naming the option and the default; a
    folder of the caller's own outside it gets the thumbnails."""
    from imagetask import ConfigError

    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), poll_interval=0.05) as tm:
        for inside in (tm.images_root, tm.images_root / "cache"):
            with pytest.raises(ConfigError, match=r"^thumbnails: .*inside the image folder") as info:
                create_app(tm, thumbnails=inside)
            assert str(thumbnail_folder(tm.images_root)) in str(info.value)
        own = tmp_path / "thumbs"
        app = create_app(tm, thumbnails=own)
        auth = {"Authorization": f"Bearer {await tm.tokens.create('alice')}"}
        done = await tm.wait((await tm.submit("a thumbnail", owner="alice")).id, timeout=10)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            got = await client.get(f"/api/tasks/{done.id}/images/0?w=64", headers=auth)
        assert got.status_code == 200
        assert thumbnail_path(own, tm.images_root, done.images[0].path, 64).is_file()
        assert not thumbnail_folder(tm.images_root).exists()


async def test_the_thumbnail_sweep_never_fails_a_prune_and_keeps_files_not_its_own(tmp_path):
    """A cache tree deeper than Python's recursion limit never makes prune fail: the
    old-layout file deep down is deleted with its emptied folders, and a WebP the cache did
    not write stays."""
    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False) as tm:
        cache = thumbnail_folder(tm.images_root)
        deep = cache
        for _ in range(1200):  # past the recursion limit; one at a time (pathlib recurses too)
            deep = deep / "d"
            deep.mkdir(parents=deep.parent == cache)
        (deep / ("ab" * 32 + "-w64.webp")).write_bytes(b"x")
        mine = cache / "userpic.webp"
        mine.write_bytes(b"x")
        try:
            report = await tm.prune(older_than=0)
            assert report.thumbnails == 1 and mine.exists() and not (cache / "d").exists()
        finally:  # pytest's own cleanup recurses: never leave it a tree this deep
            path = cache / "d"
            while path.is_dir():  # down the chain of folders, deleting their files
                for entry in path.iterdir():
                    if entry.is_file():
                        entry.unlink()
                path = path / "d"
            while path.parent != cache:  # then up, removing each emptied folder
                path = path.parent
                path.rmdir()


async def test_a_16_bit_reference_gets_a_thumbnail(web):
    """A 16-bit greyscale PNG reference is stored, and its thumbnail is a WebP, not a 500."""
    buf = io.BytesIO()
    Image.new("I;16", (40, 40), 1000).save(buf, format="PNG")
    files = [("images", ("deep.png", buf.getvalue(), "image/png"))]
    r = await web.client.post("/api/tasks", data={"prompt": "p"}, files=files, headers=web.alice)
    assert r.status_code == 202, r.text
    thumb = await web.client.get(f"/api/tasks/{r.json()['id']}/references/0?w=64", headers=web.alice)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"


@pytest.mark.parametrize(
    "url",
    ["/api/tasks?limit=%C2%B2", "/api/tasks?limit=" + "9" * 5000, "/api/tasks/{id}/images/%C2%B2",
     "/api/tasks/{id}/images/0?w=%C2%B2", "/api/stream?ticket=a.1.%C3%A9", "/api/stream?ticket=a.%C2%B2.b"],
)  # fmt: skip
async def test_odd_numbers_and_tickets_are_4xx_never_5xx(web, url):
    """Unicode digits, 5,000-digit numbers and non-ASCII tickets are refused (401/404/422), not 500."""
    task = (await web.client.post("/api/tasks", json={"prompt": "p"}, headers=web.alice)).json()
    headers = {} if "ticket" in url else web.alice
    r = await web.client.get(url.replace("{id}", task["id"]), headers=headers)
    assert 400 <= r.status_code < 500, (url, r.status_code, r.text[:200])


@pytest.mark.parametrize(
    "body",
    ['{"prompt": "x", "metadata": {"k": "\\ud800"}}', '{"prompt": "x", "\\ud800": 1}', "[" * 60000],
)
async def test_surrogates_and_deep_nesting_are_refused_and_write_nothing(web, body):
    """A lone surrogate in metadata or in a field name, and JSON nested 60,000 deep, are 4xx,
    nothing is written, and the owner's task list still answers."""
    before = snapshot(web.tm.path)
    r = await web.client.post(
        "/api/tasks", content=body, headers={**web.alice, "Content-Type": "application/json"}
    )
    assert 400 <= r.status_code < 500, r.text[:200]
    assert snapshot(web.tm.path) == before
    assert (await web.client.get("/api/tasks", headers=web.alice)).status_code == 200


async def _stream_ended(response: httpx.Response) -> bool:
    async for _ in response.aiter_lines():
        pass
    return True


async def test_revoking_a_token_ends_its_streams_and_its_tickets(served_fast):
    """A stream opened with a token ends at the next keepalive once the token is revoked, and
    a ticket minted with it no longer opens a stream."""
    base, tm, alice, _ = served_fast
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        ticket = (await c.post("/api/stream/ticket", headers=bearer(alice))).json()["ticket"]
        async with c.stream("GET", "/api/stream", headers=bearer(alice)) as stream:
            await tm.tokens.revoke(alice)
            assert await asyncio.wait_for(_stream_ended(stream), 5)
        assert (await c.get(f"/api/stream?ticket={ticket}")).status_code == 401


async def test_revoking_a_token_ends_a_stream_that_events_keep_flowing_to(served_fast):
    """A stream whose owner keeps submitting (an event every 0.05 s or so, more often than the
    0.2 s keepalive) still ends within a keepalive or two once its token is revoked."""
    base, tm, alice, _ = served_fast
    other = await tm.tokens.create("alice")  # alice keeps working with another token
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:

        async def busy() -> None:
            while True:
                await c.post("/api/tasks", json={"prompt": "busy"}, headers=bearer(other))
                await asyncio.sleep(0.05)

        async with c.stream("GET", "/api/stream", headers=bearer(alice)) as stream:
            lines = stream.aiter_lines()
            submitting = asyncio.create_task(busy())
            try:
                async with asyncio.timeout(10):
                    async for line in lines:
                        if line.startswith("data: "):
                            break  # events are flowing
                await tm.tokens.revoke(alice)
                async with asyncio.timeout(5):  # the stream ends: the loop runs out
                    async for _ in lines:
                        pass
            finally:
                submitting.cancel()
                await asyncio.gather(submitting, return_exceptions=True)


async def test_a_head_of_the_stream_answers_headers_and_leaves_nothing_running(served_fast):
    """HEAD /api/stream answers the stream's headers with no body, and leaves no stream
    running on the server once the client has gone (uvicorn drops a HEAD's body, so a stream
    started for it never noticed the client leave)."""
    base, _, alice, _ = served_fast

    async def head_then_get() -> httpx.Response:
        async with httpx.AsyncClient(base_url=base, timeout=10) as c:
            head = await c.head("/api/stream", headers=bearer(alice))
            assert (await c.get("/api/me", headers=bearer(alice))).status_code == 200  # same connection
            return head

    await head_then_get()  # the server's first connection starts what stays
    await asyncio.sleep(0.5)
    before = len(asyncio.all_tasks())
    heads = [await head_then_get() for _ in range(5)]
    assert [(h.status_code, h.headers["content-type"].split(";")[0], h.content) for h in heads] == [
        (200, "text/event-stream", b"")
    ] * 5
    await asyncio.sleep(1)  # a few keepalives (0.2 s)
    assert len(asyncio.all_tasks()) <= before


async def test_a_stream_ticket_works_beside_a_proxys_basic_auth_header(served_fast):
    """A browser behind a proxy with Basic auth sends that Authorization header with every
    request: a stream opened with a valid ticket is accepted anyway (the header is not an
    imagetask token), while the same header alone on an API route is still a 401."""
    base, _, alice, _ = served_fast
    basic = {"Authorization": "Basic dXNlcjpwYXNz"}
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        ticket = (await c.post("/api/stream/ticket", headers=bearer(alice))).json()["ticket"]
        async with c.stream("GET", f"/api/stream?ticket={ticket}", headers=basic) as stream:
            assert stream.status_code == 200
            assert await asyncio.wait_for(anext(stream.aiter_lines()), 10) == "retry: 3000"
        assert (await c.get("/api/tasks", headers=basic)).status_code == 401


async def test_streams_end_when_the_manager_closes(served_fast):
    """When the manager closes under a mounted app (its lifespan does not run), open streams
    end instead of hanging with nothing to say."""
    base, tm, alice, _ = served_fast
    async with (
        httpx.AsyncClient(base_url=base, timeout=10) as c,
        c.stream("GET", "/api/stream", headers=bearer(alice)) as stream,
    ):
        await tm.aclose()
        assert await asyncio.wait_for(_stream_ended(stream), 5)


@pytest.fixture
async def served_fast(tmp_path: Path) -> AsyncIterator[tuple[str, TaskManager, str, str]]:
    """A real server whose streams send a keepalive every 0.2 s."""
    tm = await TaskManager(tmp_path / "t.db", provider=FakeProvider(), poll_interval=0.05).open()
    alice, bob = await tm.tokens.create("alice"), await tm.tokens.create("bob")
    try:
        async with uvicorn_serving(create_app(tm, keepalive=0.2), lifespan="off") as base:
            yield base, tm, alice, bob
    finally:
        await tm.aclose()


async def test_cookie_signed_writes_from_another_site_are_refused(tmp_path):
    """With auth= reading a cookie, a POST the browser marks cross-site (Sec-Fetch-Site, or an
    Origin of another host) is 403 and writes nothing; the same POST from the app's own page
    is accepted; reads are not affected; a non-imagetask Authorization header reaches auth."""
    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False) as tm:
        app = create_app(
            tm, auth=lambda request: request.cookies.get("user") or request.headers.get("x-user")
        )
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app.test") as c:
            c.cookies.set("user", "dana")
            before = snapshot(tm.path)
            for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "https://evil.example"}):
                r = await c.post("/api/tasks", json={"prompt": "x"}, headers=headers)
                assert r.status_code == 403 and r.json()["error"]["code"] == "cross_site"
                r = await c.post("/api/generate-image", content='{"prompt": "x"}', headers=headers)
                assert r.status_code == 403
            assert snapshot(tm.path) == before
            ok = await c.post("/api/tasks", json={"prompt": "x"}, headers={"Sec-Fetch-Site": "same-origin"})
            assert ok.status_code == 202
            assert (await c.get("/api/tasks", headers={"Sec-Fetch-Site": "cross-site"})).status_code == 200
            c.cookies.clear()
            r = await c.get("/api/credits", headers={"Authorization": "Basic abc", "x-user": "erin"})
            assert r.json()["owner"] == "erin"


async def test_the_seeds_errors_name_the_field_as_the_page_sent_it(web):
    """A bad numberOfImages or aspectRatio on the original endpoint is a 422 naming that same
    field, not this library's name for it."""
    for body, field in (({"prompt": "x", "numberOfImages": 99}, "numberOfImages"),
                        ({"prompt": "x", "aspectRatio": "7:3"}, "aspectRatio")):  # fmt: skip
        r = await web.client.post("/api/generate-image", content=json.dumps(body), headers=web.alice)
        assert r.status_code == 422 and r.json()["error"]["field"] == field
