"""Property-based fuzzing of the web door against its own OpenAPI description (schemathesis,
in-process over ASGI): no 5xx, every answer matches the description, every refusal is a JSON
error, and a refused request leaves the database exactly as it was; then the requests the
fuzzer cannot make (lone surrogates, non-ASCII digits, deep nesting), one by one."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python import asgi

from imagetask import TaskManager
from imagetask.providers import FakeProvider
from imagetask.web import create_app
from imagetask.web._openapi import openapi
from test_manager import png

from conftest import check_ledger

#: What every response must pass: no 5xx, a documented status (schemathesis exempts its own
#: probes with a method the path lacks, answered 405), and a body and content type matching the
#: description. Left out on purpose: positive_data_acceptance and negative_data_rejection (the
#: description is looser than the server: a model, a size, a task id are any string there).
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance, content_type_conformance]
#: Examples per operation in the fuzzing phase; the coverage phase adds its own boundary cases.
MAX_EXAMPLES = 60
#: Alice's cap of unfinished tasks, and her credits: the seeded tasks cost 3 of them, and the
#: fuzzing of submits spends the rest, so 402 refusals are checked to write nothing too (the
#: 429 of max_pending is test_web's test_an_owner_at_max_pending_gets_429_with_retry_after).
MAX_PENDING = 4
CREDITS = 5


def snapshot(db: Path) -> list[tuple[str, list[Any]]]:
    """Every row of every table, read with plain sqlite3 (the test's independent view)."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        tables = [
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        ]
        return [(t, sorted(conn.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr)) for t in tables]
    finally:
        conn.close()


@attrs.frozen
class Seeded:
    """The fuzzed app's database, alice's token, and the ids of the seeded tasks."""

    db: Path
    token: str
    task_ids: tuple[str, ...]

    @property
    def succeeded(self) -> str:
        """The id of alice's task with two images."""
        return self.task_ids[1]


async def _seed(db: Path) -> Seeded:
    """Alice's token and credits, and tasks of every kind: a failed one, a succeeded one (two
    images), a queued one (with a reference image), a cancelled one, and one of bob's."""
    provider = FakeProvider(outcomes=["refusal"])
    async with TaskManager(db, provider=provider, credits=True, poll_interval=0.05, retry_delay=0.01) as tm:
        token = await tm.tokens.create("alice")
        await tm.credits.grant("alice", CREDITS)
        await tm.credits.grant("bob", 5)
        failed = await tm.submit("a refused prompt", owner="alice")
        await tm.wait(failed.id, timeout=10)
        done = await tm.submit("a lighthouse", n=2, owner="alice")
        await tm.wait(done.id, timeout=10)
    async with TaskManager(db, provider=FakeProvider(), credits=True, workers=False) as tm:
        queued = await tm.submit("a queued one", owner="alice", images=[png()])
        cancelled = await tm.submit("a cancelled one", owner="alice")
        await tm.cancel(cancelled.id)
        bobs = await tm.submit("bob's", owner="bob")
    return Seeded(db, token, (failed.id, done.id, queued.id, cancelled.id, bobs.id))


@pytest.fixture
def seeded(tmp_path: Path) -> Iterator[Seeded]:
    """A seeded database for one operation's fuzzing; its ledger is checked afterwards."""
    seeded = asyncio.run(_seed(tmp_path / "fuzz.db"))
    yield seeded
    check_ledger(seeded.db)


@pytest.fixture
def app(seeded: Seeded) -> Iterator[Any]:
    """The app on a manager of its own without workers (nothing changes the database behind
    the test's back), opened by the app's lifespan: schemathesis starts the lifespan on its
    event-loop thread at the first call, where every later call runs too, and ends it here."""
    manager = TaskManager(seeded.db, provider=FakeProvider(), credits=True, workers=False)
    app = create_app(manager, max_pending=MAX_PENDING)
    yield app
    asgi.shutdown_lifespans()
    assert not manager.is_open


def _config(*, security: bool) -> Any:
    return schemathesis.Config.from_dict(
        {
            "seed": 20240601,
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,  # Hypothesis' derandomize: the same cases on every run
                "database": "none",  # no .hypothesis/ folder, no replay of earlier runs
                "with-security-parameters": security,
            },
            "phases": {"stateful": {"enabled": False}},
            "warnings": False,
        }
    )


#: The fixtures keep the app and its database for all of an operation's examples, on purpose:
#: the database grows as the fuzzing goes (into max_pending and the end of the credits).
SETTINGS = settings(
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ]
)

# The description the app serves (test_the_fuzzed_description_is_the_one_the_app_serves),
# loaded eagerly so that each operation is a test item of its own (schemathesis' lazy
# from_fixture does not run on pytest 9.2). Signed in, no Authorization header is generated
# (the test sends alice's); signed out, schemathesis generates them: all of them wrong.
# The event stream never ends by itself: it has its own tests (test_web.py), not the fuzzer's.
signed_in = schemathesis.openapi.from_dict(openapi(), config=_config(security=False)).exclude(
    path="/api/stream"
)
signed_out = schemathesis.openapi.from_dict(openapi(), config=_config(security=True)).exclude(
    path="/api/stream"
)


def _real_task(case: Any, seeded: Seeded) -> None:
    """For about half the generated requests with a task id, one of the seeded tasks instead,
    and for the succeeded one an image index of 0, 1 or 2 (one past the end): a pure function
    of the generated values, so Hypothesis replays and shrinks it like any other input."""
    params = case.path_parameters
    if not params or "task_id" not in params:
        return
    generated = repr(sorted(params.items())) + repr(sorted((case.query or {}).items()))
    pick = zlib.crc32(generated.encode()) % (2 * len(seeded.task_ids))
    if pick >= len(seeded.task_ids):
        return
    params["task_id"] = seeded.task_ids[pick]
    index = params.get("index")
    if params["task_id"] != seeded.succeeded:
        return
    if isinstance(index, int) and not isinstance(index, bool):
        params["index"] = index % 3
    elif isinstance(index, str) and index.isascii() and index.isdigit():  # the coverage phase's
        params["index"] = str(int(index) % 3)


def _unlisted_method(case: Any) -> bool:
    """Whether the coverage phase sent a method the description does not list for the path."""
    return bool(case.method.upper() != case.operation.method.upper())


def test_the_fuzzed_description_is_the_one_the_app_serves(app: Any) -> None:
    """GET /openapi.json answers exactly the description the fuzz tests are generated from."""
    with asgi.get_client(app) as client:
        served = client.get("/openapi.json")
    assert served.status_code == 200
    assert served.json() == json.loads(json.dumps(openapi()))


@signed_in.parametrize()
@SETTINGS
def test_every_operation_signed_in(case: Any, seeded: Seeded, app: Any) -> None:
    """Signed in as alice, every generated request (valid or not) on every operation gets no
    5xx and an answer matching the description (status, body, content type); never a 401; a 405
    for a method the path does not have; a JSON error body for every other refusal; and a
    refused request, or any GET, leaves every row of every table as it was."""
    _real_task(case, seeded)
    before = snapshot(seeded.db)
    response = case.call(app=app, headers={"Authorization": f"Bearer {seeded.token}"})
    case.validate_response(response, checks=CHECKS)
    assert response.status_code != 401, response.text
    if _unlisted_method(case):
        assert response.status_code == 405
    elif response.status_code >= 400:
        assert set(response.json()["error"]) >= {"code", "message", "field"}
    if response.status_code >= 400 or case.method.upper() == "GET":
        assert snapshot(seeded.db) == before, f"{case.method} {case.formatted_path} -> {response.status_code}"


@signed_out.parametrize()
@SETTINGS
def test_every_operation_signed_out(case: Any, seeded: Seeded, app: Any) -> None:
    """With no Authorization header, or a wrong one, every operation answers 401 with a JSON
    error matching the description (a 405 for a method the path does not have, a 404 for a
    path whose task id is not one, which names no route), never a 5xx, and the database is
    untouched."""
    _real_task(case, seeded)
    before = snapshot(seeded.db)
    response = case.call(app=app)
    case.validate_response(response, checks=CHECKS)
    if _unlisted_method(case):
        assert response.status_code == 405
    elif not _TASK_ID.fullmatch(str((case.path_parameters or {}).get("task_id", "0" * 26))):
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    else:
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "unauthorized"
    assert snapshot(seeded.db) == before


_TASK_ID = re.compile(r"[0-9A-Za-z]{26}")


# --- what the fuzzer cannot send, one request each ------------------------------------------
# Each of the first ten answered a 500 at fd637d1 (fixed in 558db2c): a lone surrogate in
# metadata was stored and charged, then broke every answer carrying the task; str.isdigit()
# let '²' and '①' through to int(); json.loads raised RecursionError on deep nesting.


def _json(text: str) -> dict[str, Any]:
    return {"content": text.encode(), "headers": {"Content-Type": "application/json"}}


def _nested(depth: int) -> dict[str, Any]:
    return _json('{"prompt": "x", "metadata": {"a": ' + "[" * depth + "]" * depth + "}}")


def _case(name: str, method: str, url: str, status: int, **options: Any) -> Any:
    return pytest.param(method, url, options, status, id=name)


@pytest.fixture
async def client(seeded: Seeded) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the app, its manager open in the test's own event loop."""
    async with TaskManager(seeded.db, provider=FakeProvider(), credits=True, workers=False) as tm:
        transport = httpx.ASGITransport(app=create_app(tm), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


IMAGE = "/api/tasks/{succeeded}/images"


@pytest.mark.parametrize(
    ("method", "url", "options", "status"),
    [
        _case("metadata-value-lone-surrogate", "POST", "/api/tasks", 422,
              **_json('{"prompt": "x", "metadata": {"a": "\\ud800"}}')),
        _case("metadata-key-lone-surrogate", "POST", "/api/tasks", 422,
              **_json('{"prompt": "x", "metadata": {"\\udfff": 1}}')),
        _case("multipart-metadata-lone-surrogate", "POST", "/api/tasks", 422,
              files={"prompt": (None, "x"), "metadata": (None, '{"a": "\\ud800"}')}),
        _case("limit-superscript-two", "GET", "/api/tasks?limit=%C2%B2", 422),
        _case("image-index-circled-one", "GET", f"{IMAGE}/%E2%91%A0", 422),
        _case("thumbnail-width-superscript-two", "GET", f"{IMAGE}/0?w=%C2%B2", 422),
        _case("multipart-n-superscript-two", "POST", "/api/tasks", 422,
              files={"prompt": (None, "x"), "n": (None, "²")}),
        _case("last-event-id-superscript-two", "GET", "/api/stream", 422, headers={"Last-Event-ID": b"\xb2"}),
        _case("stream-ticket-superscript-two", "GET", "/api/stream?ticket=a.%C2%B2.b", 401, signed_out=True),
        _case("deeply-nested-json", "POST", "/api/tasks", 400, **_nested(100_000)),
        # Their neighbours, refused as they should be all along.
        _case("prompt-lone-surrogate", "POST", "/api/tasks", 422, **_json('{"prompt": "\\ud800"}')),
        _case("limit-not-a-number", "GET", "/api/tasks?limit=x", 422),
        _case("thumbnail-width-not-a-number", "GET", f"{IMAGE}/0?w=x", 422),
        _case("stream-ticket-bad", "GET", "/api/stream?ticket=a.b.c", 401, signed_out=True),
        _case("metadata-too-deep", "POST", "/api/tasks", 422, **_nested(40)),
    ],
)  # fmt: skip
async def test_requests_the_fuzzer_cannot_make_are_refused_cleanly(
    client: httpx.AsyncClient, seeded: Seeded, method: str, url: str, options: dict[str, Any], status: int
) -> None:
    """Each request (valid JSON or HTTP that schemathesis never generates: its strings are
    UTF-8-encodable and its integers ASCII) is refused with the given status and a JSON error,
    and leaves the database as it was; afterwards alice's task list still renders."""
    options = dict(options)
    headers = {} if options.pop("signed_out", False) else {"Authorization": f"Bearer {seeded.token}"}
    headers.update(options.pop("headers", {}))
    before = snapshot(seeded.db)
    url = url.format(succeeded=seeded.succeeded)
    response = await client.request(method, url, headers=headers, **options)
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) >= {"code", "message", "field"}
    assert snapshot(seeded.db) == before
    listed = await client.get("/api/tasks", headers={"Authorization": f"Bearer {seeded.token}"})
    assert listed.status_code == 200, listed.text
