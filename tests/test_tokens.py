"""API tokens (tm.tokens) and the event feed (tm.watch): what the web door stands on."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from imagetask import GenerationRequest, TaskStatus, ValidationError
from imagetask.testing import Faults

from conftest import sql


async def test_a_token_acts_as_its_owner_and_only_its_digest_is_stored(make_manager, caplog):
    """create() returns a token that owner_of() maps to its owner; the database and the log
    hold neither the token nor its secret, only the id and a digest."""
    caplog.set_level(logging.DEBUG, logger="imagetask")
    tm = await make_manager(workers=False)
    token = await tm.tokens.create("alice", label="laptop")
    assert token.startswith("itk_")
    assert await tm.tokens.owner_of(token) == "alice"
    secret = token.split("_", 2)[2]  # itk_<id>_<secret>: the secret itself may hold "_"
    dump = "\n".join(line for line in sql(tm.path, "SELECT * FROM tokens")[0] if isinstance(line, str))
    assert secret not in dump and token not in dump
    assert secret not in caplog.text
    (info,) = await tm.tokens.list("alice")
    assert (
        info.owner == "alice"
        and info.label == "laptop"
        and info.valid
        and token.startswith(f"itk_{info.id}_")
    )


async def test_wrong_malformed_and_revoked_tokens_act_as_nobody(make_manager):
    """A token with one changed secret character, a malformed one, and a revoked one all map
    to None; revoking by id works, and revoking again says there was nothing to revoke."""
    tm = await make_manager(workers=False)
    token = await tm.tokens.create("alice")
    last = token[-1]
    forged = token[:-1] + ("A" if last != "A" else "B")
    assert await tm.tokens.owner_of(forged) is None
    for bad in ("", "Bearer x", "itk_short_x", token + "x"):
        assert await tm.tokens.owner_of(bad) is None
    token_id = token.split("_")[1]
    assert await tm.tokens.revoke(token_id) is True
    assert await tm.tokens.owner_of(token) is None
    assert await tm.tokens.revoke(token) is False
    (info,) = await tm.tokens.list()
    assert not info.valid and info.revoked_at is not None


async def test_revoking_in_one_manager_stops_the_token_in_another(make_manager):
    """Two managers on one file: a token revoked through one stops working through the
    other at once (nothing is cached)."""
    a = await make_manager(workers=False)
    b = await make_manager(workers=False)
    token = await a.tokens.create("alice")
    assert await b.tokens.owner_of(token) == "alice"
    assert await a.tokens.revoke_owner("alice") == 1
    assert await b.tokens.owner_of(token) is None


async def test_bad_revoke_input_names_the_field(make_manager):
    """revoke() of something that is neither a token nor an id is a ValidationError."""
    tm = await make_manager(workers=False)
    with pytest.raises(ValidationError) as caught:
        await tm.tokens.revoke("not a token")
    assert caught.value.field == "token"


async def test_watch_yields_each_event_with_a_growing_seq_and_resumes_after_one(make_manager):
    """watch(owner=...) yields the owner's task events as they commit, seq growing; a new
    watch(after=seq) starts exactly after that event; other owners' events never show."""
    faults, started = Faults(), threading.Event()
    # The feed starts "from now": its first read (the latest seq) sets that point.
    faults.call("feed", started.set, after_commit=True)
    tm = await make_manager(faults=faults)
    seen = []

    async def collect() -> None:
        async for event in tm.feed.watch(owner="alice"):
            seen.append(event)
            if event.kind == "succeeded":
                return

    watching = asyncio.create_task(collect())
    assert await asyncio.to_thread(started.wait, 10)  # "now" is read: later commits reach it
    await tm.submit("bob's", owner="bob")
    task = await tm.submit("alice's", owner="alice")
    await asyncio.wait_for(watching, 10)
    assert [e.kind for e in seen] == ["claimed", "succeeded"]
    assert all(e.task_id == task.id and e.owner == "alice" for e in seen)
    assert seen[0].seq < seen[1].seq and seen[1].status is TaskStatus.SUCCEEDED
    resumed = tm.feed.watch(after=seen[0].seq, owner="alice")
    assert (await anext(resumed)).seq == seen[1].seq
    await resumed.aclose()


async def test_watch_sees_another_managers_commits(make_manager):
    """Events committed through another manager on the same file reach the feed."""
    runner = await make_manager()
    watcher = await make_manager(workers=False)
    feed = watcher.feed.watch(after=0)
    task = await runner.submit("p")
    kinds = []
    async with asyncio.timeout(10):
        async for event in feed:
            kinds.append(event.kind)
            if event.kind == "succeeded":
                break
    assert kinds == ["claimed", "succeeded"] and event.task_id == task.id


async def test_feed_read_pages_past_the_inline_read_of_200(make_manager):
    """feed.read(after, limit=500) answers every event when there are more than 200 (the
    inline read stops at 200; the rest comes from the reader), in seq order."""
    tm = await make_manager(concurrency=16, per_owner=16)
    tasks = await tm.submit_many([GenerationRequest(f"p{i}") for i in range(130)])
    async for _ in tm.as_completed([t.id for t in tasks]):
        pass
    found = await tm.feed.read(0, limit=500)
    assert len(found) == 260 and [e.seq for e in found] == sorted(e.seq for e in found)
    assert found[-1].seq == await tm.feed.last_seq()
    assert len(await tm.feed.read(0, limit=100)) == 100
    with pytest.raises(ValidationError):
        await tm.feed.read(-1)
