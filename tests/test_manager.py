"""TaskManager: submit, poll, wait, cancel, limits, retries, credits, idempotency."""

from __future__ import annotations

import asyncio
import io
import sqlite3
import threading
from pathlib import Path

import pytest
from PIL import Image

from imagetask import (
    ConfigError,
    GenerationRequest,
    ImageTaskError,
    InsufficientCredits,
    ProviderError,
    Task,
    TaskManager,
    TaskNotFound,
    TaskStatus,
    ValidationError,
    WaitTimeout,
)
from imagetask.providers import GEMINI_MODELS, FakeProvider
from imagetask.testing import Faults

from conftest import check_attempts_exclusive, max_overlap, sql


def png(width: int = 8, height: int = 8, color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


# --- submit and the happy path ------------------------------------------------------------------


async def test_submit_answers_queued_before_any_provider_call(make_manager):
    """submit() returns a queued, durable task and the provider has not been called yet."""
    provider = FakeProvider(latency=0.05)
    tm = await make_manager(provider=provider)
    task = await tm.submit("a lighthouse at dusk", n=2, aspect_ratio="16:9", owner="alice")
    assert task.status is TaskStatus.QUEUED
    assert provider.calls == 0
    assert len(sql(tm.path, "SELECT status FROM tasks WHERE id = ?", task.id)) == 1  # durable
    assert task.params == {"n": 2, "aspect_ratio": "16:9", "size": None}
    assert task.cost == 2 and task.owner == "alice" and task.created_at is not None


async def test_changing_a_returned_task_never_changes_later_reads(make_manager):
    """A task's metadata and params are the caller's own, nested values included: changing
    what submit, poll or list returned never changes what the next read returns."""
    tm = await make_manager(workers=False)
    metadata = {"job": {"step": 1, "tags": ["a"]}, "user": "u1"}
    first = await tm.submit("a lighthouse", metadata=metadata)
    second = await tm.submit("a harbour", metadata=metadata)
    first.metadata["job"]["step"] = 99
    first.metadata["job"]["tags"].append("changed")
    first.params["n"] = 7
    polled = await tm.poll(first.id)
    assert polled.metadata == metadata and polled.params["n"] == 1
    polled.metadata["job"]["step"] = 42
    polled.metadata["user"] = "someone else"
    listed = {t.id: t for t in await tm.list()}
    assert listed[first.id].metadata == metadata and listed[second.id].metadata == metadata
    listed[second.id].metadata["job"]["tags"].clear()
    pending = {t.id: t for t in await tm.pending()}
    assert pending[first.id].metadata == metadata and pending[second.id].metadata == metadata
    assert (await tm.poll(second.id)).metadata == metadata


@pytest.mark.parametrize("ending", ["success", "cancel"])
async def test_waiters_of_one_task_each_get_their_own_task(make_manager, ending):
    """Several callers waiting for one task (two waits, an as_completed, and cancel's own
    answer) each get a task of their own: changing one's metadata, params or image provenance
    changes no other's."""
    tm = await make_manager(provider=FakeProvider(latency=0.2), workers=ending == "success")
    metadata = {"job": {"step": 1}, "tags": ["a"]}
    task = await tm.submit("a lighthouse", metadata=metadata)

    async def first_of_as_completed() -> Task:
        async for done in tm.as_completed([task.id]):
            return done
        raise AssertionError("as_completed yielded nothing")

    waiters = [
        asyncio.ensure_future(tm.wait(task.id, timeout=30)),
        asyncio.ensure_future(tm.wait(task.id, timeout=30)),
        asyncio.ensure_future(first_of_as_completed()),
    ]
    await asyncio.sleep(0.05)  # all three are waiting
    answers = [await tm.cancel(task.id)] if ending == "cancel" else []
    answers += await asyncio.gather(*waiters)
    assert len({id(t) for t in answers}) == len(answers)
    fresh = await tm.poll(task.id)
    for i, mine in enumerate(answers):
        mine.metadata["job"]["step"] = i + 10
        mine.metadata["tags"].append(str(i))
        mine.params["n"] = i + 10
        for image in mine.images:
            image.provenance["finish_reason"] = f"changed by {i}"
    for i, mine in enumerate(answers):
        assert mine.metadata == {"job": {"step": i + 10}, "tags": ["a", str(i)]}
        assert mine.params["n"] == i + 10
        assert all(im.provenance["finish_reason"] == f"changed by {i}" for im in mine.images)
    assert fresh.metadata == metadata and (await tm.poll(task.id)).metadata == metadata
    assert len(fresh.images) == (1 if ending == "success" else 0)


async def test_task_runs_to_success_with_whole_validated_images(make_manager):
    """A task ends succeeded with n stored images whose size, hash and dimensions match the files."""
    tm = await make_manager()
    task = await tm.submit("a nano banana", n=3, aspect_ratio="16:9")
    done = await tm.wait(task.id, timeout=10)
    assert done.ok and done.done and done.error is None
    assert done.attempts == 1 and done.finished_at is not None and done.started_at is not None
    assert [im.index for im in done.images] == [0, 1, 2]
    import hashlib

    for im in done.images:
        data = im.path.read_bytes()
        assert im.size == len(data) and im.sha256 == hashlib.sha256(data).hexdigest()
        with Image.open(im.path) as opened:
            assert (im.width, im.height) == opened.size
        assert im.width > im.height  # 16:9
        assert im.mime == "image/png"
        assert tm.images_root in im.path.parents
        assert im.provenance["finish_reason"] == "STOP"


async def test_same_prompt_gives_the_same_picture(make_manager):
    """FakeProvider is deterministic: the same prompt draws the same bytes."""
    tm = await make_manager()
    a = await tm.wait((await tm.submit("same")).id, timeout=10)
    b = await tm.wait((await tm.submit("same")).id, timeout=10)
    c = await tm.wait((await tm.submit("different")).id, timeout=10)
    assert a.images[0].sha256 == b.images[0].sha256 != c.images[0].sha256


async def test_submit_many_is_all_or_nothing(make_manager):
    """submit_many writes every task in order, or (one bad request) none at all."""
    tm = await make_manager(workers=False)
    tasks = await tm.submit_many([{"prompt": "one"}, GenerationRequest("two", n=2), {"prompt": "three"}])
    assert [t.prompt for t in tasks] == ["one", "two", "three"]
    with pytest.raises(ValidationError) as err:
        await tm.submit_many([{"prompt": "fine"}, {"prompt": "   "}])
    assert err.value.field == "requests[1].prompt"
    with pytest.raises(ValidationError, match=r"requests\[0\]\.colour"):
        await tm.submit_many([{"prompt": "x", "colour": "red"}])
    assert sql(tm.path, "SELECT count(*) FROM tasks") == [(3,)]


async def test_reference_images_are_copied_and_sent(make_manager, tmp_path):
    """Reference images given as a path, bytes and a PIL image are stored and reach the provider."""
    provider = FakeProvider()
    tm = await make_manager(provider=provider)
    path = tmp_path / "ref.png"
    path.write_bytes(png(color="blue"))
    task = await tm.submit("edit it", images=[path, png(color="green"), Image.new("RGB", (4, 4))])
    assert len(task.references) == 3
    path.unlink()  # the store holds its own copy
    done = await tm.wait(task.id, timeout=10)
    assert done.ok
    assert [r.mime for r in provider.requests[0].references] == ["image/png"] * 3
    assert all(r.path.exists() for r in done.references)


# --- wait, poll, pending, list ------------------------------------------------------------------


async def test_reads_never_call_the_provider(make_manager):
    """poll, pending, list, wait and as_completed read only the database."""
    provider = FakeProvider()
    tm = await make_manager(provider=provider)
    task = await tm.submit("count my calls", n=2)
    await tm.wait(task.id, timeout=10)
    calls = provider.calls
    assert calls == 2
    for _ in range(20):
        await tm.poll(task.id)
        await tm.pending()
        await tm.list()
        await tm.wait(task.id)
    async for _ in tm.as_completed([task.id]):
        pass
    assert provider.calls == calls


async def test_reads_on_a_submit_only_manager_never_call_the_provider(make_manager):
    """A workers=False manager can submit, poll, list and wait without any provider call."""
    provider = FakeProvider()
    tm = await make_manager(provider=provider, workers=False)
    task = await tm.submit("queued forever")
    assert (await tm.poll(task.id)).status is TaskStatus.QUEUED
    assert [t.id for t in await tm.pending()] == [task.id]
    with pytest.raises(WaitTimeout):
        await tm.wait(task.id, timeout=0.1)
    assert provider.calls == 0


async def test_wait_in_the_working_process_wakes_on_a_signal_not_a_timer(make_manager):
    """With a one-hour poll interval, wait() still returns as soon as the local worker finishes."""
    tm = await make_manager(provider=FakeProvider(latency=0.05), poll_interval=3600)
    task = await tm.submit("signal me")
    async with asyncio.timeout(10):  # a timer-driven wait would need an hour
        done = await tm.wait(task.id)
    assert done.ok


async def test_waiters_get_the_task_a_local_end_committed_without_reading_it(make_manager):
    """A task that ends in this process reaches wait() and as_completed() as its own terminal
    transition committed it (no read of the task after the first), and equal, field for
    field, to what a poll reads from the database: a success with its images, a failure with
    its error."""
    faults = Faults()
    provider = FakeProvider(latency=0.05, outcomes=["ok", "ok", "permanent", "ok"])
    tm = await make_manager(provider=provider, poll_interval=3600, faults=faults)
    task = await tm.submit("wait for me", metadata={"k": [1, 2]})
    done = await tm.wait(task.id, timeout=10)
    assert faults.hits["get"] == 1  # wait's own first read; the end came with the task
    assert done.ok and len(done.images) == 1
    assert done == await tm.poll(task.id)
    ids = [(await tm.submit(f"t{i}", n=2 if i == 0 else 1)).id for i in range(3)]
    faults.hits.clear()
    seen = [t async for t in tm.as_completed(ids, timeout=10)]
    assert faults.hits["get"] == 0
    assert {t.id for t in seen} == set(ids)
    assert {t.status for t in seen} == {TaskStatus.SUCCEEDED, TaskStatus.FAILED}
    for t in seen:
        assert t == await tm.poll(t.id)


async def test_cancel_answers_and_wakes_waiters_with_the_committed_task(make_manager):
    """cancel() answers with the task its transaction cancelled and hands the same record to
    the task's waiters, with no read of the task; a finished task comes back unchanged."""
    faults = Faults()
    tm = await make_manager(provider=FakeProvider(outcomes=["hang"]), faults=faults)
    task = await tm.submit("hang")
    async with asyncio.timeout(10):
        while (await tm.poll(task.id)).status is not TaskStatus.RUNNING:
            await asyncio.sleep(0.01)
    waiter = asyncio.ensure_future(tm.wait(task.id, timeout=10))
    while tm.waiting == 0:
        await asyncio.sleep(0.01)
    faults.hits.clear()
    cancelled = await tm.cancel(task.id)
    waited = await waiter
    assert faults.hits["get"] == 0
    assert cancelled.status is TaskStatus.CANCELLED and waited == cancelled == await tm.poll(task.id)
    assert await tm.cancel(task.id) == cancelled


async def test_a_waiter_gets_the_provenance_a_poll_reads_back(make_manager):
    """An image's provenance is kept as JSON: the record a waiter gets from the local end holds
    the same values a poll reads back (tuples as lists, dates as text, keys as text), and is
    not the provider's own dict."""
    import datetime

    from imagetask.providers import ImageRequest, ImageResult

    given = {"seeds": (1, 2), "at": datetime.date(2025, 1, 2), 7: "seven", "finish_reason": "STOP"}

    class Annotating(FakeProvider):
        async def generate(self, request: ImageRequest) -> ImageResult:
            result = await super().generate(request)
            return ImageResult(result.data, result.mime, given)

    tm = await make_manager(provider=Annotating())
    task = await tm.submit("annotated")
    waited = await tm.wait(task.id, timeout=10)
    polled = await tm.poll(task.id)
    expected = {"seeds": [1, 2], "at": "2025-01-02", "7": "seven", "finish_reason": "STOP"}
    assert dict(waited.images[0].provenance) == dict(polled.images[0].provenance) == expected
    assert waited.images[0].provenance is not given


async def test_wait_timeout_leaves_the_task_running(make_manager):
    """wait(timeout) raises WaitTimeout (a TimeoutError) and the task keeps running."""
    tm = await make_manager(provider=FakeProvider(outcomes=["hang"]))
    task = await tm.submit("slow")
    with pytest.raises(WaitTimeout) as err:
        await tm.wait(task.id, timeout=0.2)
    assert isinstance(err.value, TimeoutError)
    assert (await tm.poll(task.id)).status is TaskStatus.RUNNING


async def test_wait_with_timeout_zero_looks_once_and_times_out(make_manager):
    """wait(timeout=0) is a valid timeout, not "no timeout": on a task still running it raises
    WaitTimeout at once instead of waiting for the end."""
    tm = await make_manager(provider=FakeProvider(outcomes=["hang"]))
    task = await tm.submit("never ends")
    with pytest.raises(WaitTimeout):
        await asyncio.wait_for(tm.wait(task.id, timeout=0), 5)


async def test_pending_is_newest_first_per_owner_and_list_pages(make_manager):
    """pending(owner) lists that owner's queued and running tasks newest first; list pages by id."""
    tm = await make_manager(workers=False)
    alice = [await tm.submit(f"a{i}", owner="alice") for i in range(3)]
    await tm.submit("b", owner="bob")
    assert [t.id for t in await tm.pending("alice")] == [t.id for t in reversed(alice)]
    await tm.cancel(alice[1].id)
    assert [t.id for t in await tm.pending("alice")] == [alice[2].id, alice[0].id]
    page1 = await tm.list(limit=2)
    page2 = await tm.list(limit=2, before=page1[-1].id)
    assert len(page1) == 2 and len(page2) == 2
    assert [t.id for t in page1 + page2] == sorted((t.id for t in page1 + page2), reverse=True)
    assert [t.id for t in await tm.list(status="cancelled")] == [alice[1].id]
    assert [t.owner for t in await tm.list(owner="bob")] == ["bob"]


async def test_as_completed_yields_in_finishing_order(make_manager):
    """as_completed yields each task once, as it finishes: the task submitted first but ended
    last (it hangs until cancelled) comes last."""
    provider = FakeProvider(outcomes=["hang"])
    tm = await make_manager(provider=provider, concurrency=3)
    last = (await tm.submit("ends last")).id
    while provider.active < 1:
        await asyncio.sleep(0.01)
    ids = [last, *[(await tm.submit(f"t{i}")).id for i in range(3)]]
    seen = []
    async for task in tm.as_completed(ids, timeout=10):
        seen.append(task.id)
        if len(seen) == 3:
            await tm.cancel(last)
    assert sorted(seen) == sorted(ids) and seen[-1] == last


async def test_a_task_id_in_lower_case_names_the_same_task(make_manager):
    """Ids are Crockford base 32, which reads letters in either case: poll, wait, events,
    as_completed, cancel and list(before=) take an id typed in lower case, and answer with
    the id as it was issued."""
    tm = await make_manager(provider=FakeProvider(latency=0.02))
    done, queued = await tm.submit("first"), await tm.submit("second")
    low = done.id.lower()
    assert low != done.id
    assert (await tm.poll(low)).id == done.id
    assert (await tm.wait(low, timeout=10)).ok
    assert [e.kind for e in await tm.events(low)][-1] == "succeeded"
    assert [t.id async for t in tm.as_completed([low, done.id], timeout=10)] == [done.id]
    assert [t.id for t in await tm.list(before=queued.id.lower())] == [done.id]
    await tm.wait(queued.id, timeout=10)
    assert (await tm.cancel(queued.id.lower())).id == queued.id


async def test_unknown_ids_raise_task_not_found(make_manager):
    """poll, wait, cancel and as_completed of an unknown id raise TaskNotFound (a LookupError)."""
    tm = await make_manager()
    for call in (tm.poll("nope"), tm.wait("nope"), tm.cancel("nope")):
        with pytest.raises(TaskNotFound) as err:
            await call
        assert isinstance(err.value, LookupError)
    with pytest.raises(TaskNotFound):
        async for _ in tm.as_completed(["nope"]):
            pass


async def test_as_completed_checks_every_id_before_yielding(make_manager):
    """An unknown id among finished ones raises TaskNotFound before anything is yielded, naming
    it, and leaves no waiter behind."""
    tm = await make_manager()
    done = await tm.wait((await tm.submit("done")).id, timeout=10)
    seen: list[Task] = []

    async def consume() -> None:
        async for task in tm.as_completed([done.id, "nope"]):
            seen.append(task)

    with pytest.raises(TaskNotFound, match="nope"):
        await consume()
    assert seen == []
    assert tm.waiting == 0


async def test_as_completed_handles_more_ids_than_one_statement_holds(make_manager):
    """as_completed over 1,200 ids (more than one IN (...) chunk) yields every one exactly once."""
    tm = await make_manager(workers=False)
    tasks = await tm.submit_many([{"prompt": f"t{i}"} for i in range(1200)])
    await asyncio.gather(*(tm.cancel(t.id) for t in tasks[:700]))

    async def cancel_rest() -> None:
        await asyncio.gather(*(tm.cancel(t.id) for t in tasks[700:]))

    canceller = asyncio.create_task(cancel_rest())
    seen = [t.id async for t in tm.as_completed([t.id for t in tasks] + [tasks[0].id], timeout=30)]
    await canceller
    assert sorted(seen) == sorted(t.id for t in tasks)
    assert tm.waiting == 0


async def test_submit_many_ids_follow_the_request_order(make_manager):
    """Ids sort in the order of the requests, with or without reference images among them."""
    tm = await make_manager(workers=False)
    tasks = await tm.submit_many(
        [
            {"prompt": "a"},
            {"prompt": "b", "images": [png()]},
            {"prompt": "c"},
            {"prompt": "d", "images": [png()]},
        ]
    )
    assert [t.prompt for t in tasks] == ["a", "b", "c", "d"]
    assert [t.id for t in tasks] == sorted(t.id for t in tasks)
    assert [t.prompt for t in await tm.list()] == ["d", "c", "b", "a"]


async def test_as_completed_survives_a_task_ending_while_it_reads_the_statuses(make_manager):
    """A task that ends (and signals) while as_completed reads the statuses is yielded once,
    and the stale signal does not break the wait for the others."""
    import threading

    faults = Faults()
    tm = await make_manager(workers=False, faults=faults)
    first, second = await tm.submit("first"), await tm.submit("second")
    reading, gate = threading.Event(), threading.Event()
    # The status read starts, then waits (on the reader's thread) until the cancel is done.
    faults.call("statuses", lambda: (reading.set(), gate.wait(10)))

    async def consume() -> list[str]:
        return [t.id async for t in tm.as_completed([first.id, second.id], timeout=10)]

    consumer = asyncio.create_task(consume())
    assert await asyncio.to_thread(reading.wait, 10)  # listening, and now reading the statuses
    await tm.cancel(first.id)  # ends and signals before that read answers
    gate.set()
    await asyncio.sleep(0.05)
    await tm.cancel(second.id)
    assert await consumer == [first.id, second.id]


async def test_as_completed_raises_when_the_manager_closes(make_manager):
    """A consumer of as_completed gets an ImageTaskError, not a hang, when the manager closes."""
    tm = await make_manager(provider=FakeProvider(outcomes=["hang"]))
    task = await tm.submit("forever")

    async def consume() -> list[Task]:
        return [t async for t in tm.as_completed([task.id])]

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    await tm.aclose()
    with pytest.raises(ImageTaskError, match="closed"):
        await asyncio.wait_for(consumer, 10)


@pytest.mark.parametrize("many", [False, True], ids=["submit", "submit_many"])
async def test_a_cancelled_submit_keeps_the_references_of_a_row_it_wrote(make_manager, many):
    """A caller cancelled while its write waits for the lock still sees that write to its end:
    the row commits, its reference files stay, and the cancellation reaches the caller."""
    tm = await make_manager(workers=False)
    blocker = sqlite3.connect(tm.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock: the submit must wait
    try:
        if many:
            call = tm.submit_many([{"prompt": "with a reference", "images": [png()]}])
        else:
            call = tm.submit("with a reference", images=[png()])
        submitting = asyncio.ensure_future(call)
        await asyncio.sleep(0.3)
        assert not submitting.done()
        submitting.cancel()
        await asyncio.sleep(0.1)
        assert not submitting.done()  # still waiting for its commit, not abandoned
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    with pytest.raises(asyncio.CancelledError):
        await submitting
    (task,) = await tm.list()
    assert task.prompt == "with a reference"
    assert [im.path.exists() for im in task.references] == [True]


@pytest.mark.parametrize("many", [False, True], ids=["submit", "submit_many"])
async def test_a_submit_cancelled_while_its_references_are_copied_leaves_no_file(make_manager, many):
    """A caller cancelled while its reference images are being copied (on a worker thread)
    waits for the copy, deletes it and gets the cancellation: no row, no file left behind."""
    faults = Faults()
    copying, release = threading.Event(), threading.Event()
    faults.call("write_image", lambda: copying.set() or release.wait(10))
    tm = await make_manager(workers=False, faults=faults)
    if many:
        call = tm.submit_many([{"prompt": "with a reference", "images": [png()]}])
    else:
        call = tm.submit("with a reference", images=[png()])
    submitting = asyncio.ensure_future(call)
    while not copying.is_set():
        await asyncio.sleep(0.005)
    submitting.cancel()
    await asyncio.sleep(0.05)
    assert not submitting.done()  # waits for the copy in flight
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await submitting
    assert await tm.list() == []
    assert [p for p in tm.images_root.rglob("*") if p.is_file()] == []


async def test_a_submit_whose_manager_closes_during_its_copy_leaves_no_file(tmp_path):
    """A submit whose manager closes while its reference images are being copied is refused
    with a StoreError (the store is closed: nothing written) and deletes its copies."""
    from imagetask import StoreError

    faults = Faults()
    copying, release = threading.Event(), threading.Event()
    faults.call("write_image", lambda: copying.set() or release.wait(10))
    tm = TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False, faults=faults)
    await tm.open()
    submitting = asyncio.ensure_future(tm.submit("with a reference", images=[png()]))
    while not copying.is_set():
        await asyncio.sleep(0.005)
    await tm.aclose()
    release.set()
    with pytest.raises(StoreError, match="closed"):
        await submitting
    assert [p for p in tm.images_root.rglob("*") if p.is_file()] == []
    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False) as again:
        assert await again.list() == []


async def test_a_submit_cancelled_as_its_commit_is_answered_still_gets_the_cancellation(make_manager):
    """A caller whose cancellation lands after its write is done but before the caller runs
    again (the result and the cancellation arrive together) gets its cancellation, not the
    result, and the row it wrote keeps its references."""
    faults = Faults()
    tm = await make_manager(workers=False, faults=faults)
    submitting: list[asyncio.Future[object]] = []
    loop = asyncio.get_running_loop()

    def cancel_two_turns_later() -> None:
        # Run once the submit committed, before its caller is answered: the cancel lands two
        # turns of the loop later, when the write is done but its caller has not yet run.
        loop.call_soon_threadsafe(loop.call_soon, submitting[0].cancel)

    faults.call("submit", cancel_two_turns_later, after_commit=True)
    submitting.append(asyncio.ensure_future(tm.submit("cancelled as it lands", images=[png()])))
    with pytest.raises(asyncio.CancelledError):
        await submitting[0]
    (task,) = await tm.list()
    assert task.prompt == "cancelled as it lands"
    assert [im.path.exists() for im in task.references] == [True]


# --- limits -----------------------------------------------------------------------------------


async def test_concurrency_caps_one_process(make_manager):
    """Never more than `concurrency` generations run at once in one process, and the cap is reached;
    a finished generation's slot is reused while its images are stored."""
    provider = FakeProvider(latency=0.1)
    tm = await make_manager(provider=provider, concurrency=2, per_owner=10)
    ids = [(await tm.submit(f"t{i}", owner=f"o{i}")).id for i in range(6)]
    for task_id in ids:
        await tm.wait(task_id, timeout=10)
    assert provider.max_active == 2
    # Rows may also show running while storing (up to `concurrency` more) or while claimed
    # ahead of a free slot (max(1, concurrency // 4) more).
    assert max_overlap(tm.path) <= 2 * 2 + 1


async def test_per_owner_caps_one_owner_not_others(make_manager):
    """One owner never has more than `per_owner` running; another owner still gets a slot."""
    provider = FakeProvider(latency=0.1)
    tm = await make_manager(provider=provider, concurrency=8, per_owner=3)
    ids = [(await tm.submit(f"a{i}", owner="alice")).id for i in range(7)]
    ids.append((await tm.submit("b", owner="bob")).id)
    for task_id in ids:
        await tm.wait(task_id, timeout=10)
    assert max_overlap(tm.path, "alice") == 3
    assert max_overlap(tm.path) == 4  # bob ran beside alice's three


# --- retries and failures ---------------------------------------------------------------------


async def test_transient_error_retries_then_succeeds(make_manager):
    """A retryable error re-queues the task with backoff; the next attempt succeeds."""
    tm = await make_manager(provider=FakeProvider(outcomes=["transient", "rate_limited"]))
    done = await tm.wait((await tm.submit("retry me")).id, timeout=10)
    assert done.ok and done.attempts == 3
    events = [e.kind for e in await tm.events(done.id)]
    assert events == ["claimed", "retry", "claimed", "retry", "claimed", "succeeded"]


async def test_permanent_error_fails_at_once(make_manager):
    """A non-retryable error fails the task on the first attempt with the provider's code."""
    tm = await make_manager(provider=FakeProvider(outcomes=["permanent"]))
    done = await tm.wait((await tm.submit("bad")).id, timeout=10)
    assert done.status is TaskStatus.FAILED and done.attempts == 1
    assert done.error is not None and done.error.code == "invalid_request"
    assert "400" in done.error.message and not done.images


async def test_refusal_is_a_failure_never_a_success(make_manager):
    """A safety refusal ends failed with safety_blocked, with no images."""
    tm = await make_manager(provider=FakeProvider(outcomes=["refusal"]))
    done = await tm.wait((await tm.submit("something refused")).id, timeout=10)
    assert not done.ok and done.error is not None and done.error.code == "safety_blocked"
    assert "IMAGE_SAFETY" in done.error.message


async def test_retries_stop_at_max_attempts(make_manager):
    """A task that keeps failing transiently fails after max_attempts with the last error."""
    provider = FakeProvider(outcomes=["transient"] * 5)
    tm = await make_manager(provider=provider, max_attempts=2)
    done = await tm.wait((await tm.submit("never")).id, timeout=10)
    assert done.status is TaskStatus.FAILED and done.attempts == 2 and provider.calls == 2
    assert done.error is not None and done.error.code == "server_error" and done.error.retryable


async def test_hung_attempt_times_out_and_retries(make_manager):
    """An attempt over attempt_timeout is cut off and counted as a retryable timeout."""
    tm = await make_manager(provider=FakeProvider(outcomes=["hang"]), attempt_timeout=0.2)
    done = await tm.wait((await tm.submit("hang once")).id, timeout=10)
    assert done.ok and done.attempts == 2
    events = await tm.events(done.id)
    assert "timeout" in events[1].detail


async def test_rate_limit_honours_retry_after(make_manager):
    """A provider's retry_after delays the next attempt by at least that long."""
    err = ProviderError("rate_limited", "429", retryable=True, retry_after=0.5)
    tm = await make_manager(provider=FakeProvider(outcomes=[err]))
    done = await tm.wait((await tm.submit("slow down")).id, timeout=10)
    events = await tm.events(done.id)
    retry_at = next(e.at for e in events if e.kind == "retry")
    second_claim = [e.at for e in events if e.kind == "claimed"][1]
    assert (second_claim - retry_at).total_seconds() >= 0.5


async def test_retry_delays_double_with_each_attempt(make_manager):
    """The pause before the attempt after attempt k is retry_delay * 2**(k-1), jittered down
    to half at most: with retry_delay=0.25, at least 0.125, 0.25 and 0.5 s before attempts
    2, 3 and 4 (a delay that did not double would be at most 0.25 s each time)."""
    tm = await make_manager(
        provider=FakeProvider(outcomes=["transient"] * 3), retry_delay=0.25, max_attempts=4
    )
    done = await tm.wait((await tm.submit("try, try again")).id, timeout=20)
    assert done.ok and done.attempts == 4
    events = await tm.events(done.id)
    retries = [e.at for e in events if e.kind == "retry"]
    claims = [e.at for e in events if e.kind == "claimed"][1:]
    gaps = [(claim - retry).total_seconds() for retry, claim in zip(retries, claims, strict=True)]
    assert [gap >= 0.5 * 0.25 * 2**k for k, gap in enumerate(gaps)] == [True] * 3, gaps


async def test_one_failing_image_fails_the_whole_task(make_manager):
    """With n=3, one permanent failure fails the task and no image is kept."""
    tm = await make_manager(provider=FakeProvider(outcomes=["ok", "permanent", "ok"]))
    done = await tm.wait((await tm.submit("three", n=3)).id, timeout=10)
    assert done.status is TaskStatus.FAILED and done.images == ()
    assert sql(tm.path, "SELECT count(*) FROM task_images WHERE role = 'output'") == [(0,)]
    assert [p for p in tm.images_root.rglob("a*-*")] == []


async def test_undecodable_provider_answer_is_bad_image(make_manager):
    """Bytes Pillow cannot decode fail the task with bad_image and leave no file or row."""
    tm = await make_manager(provider=FakeProvider(outcomes=["bad_image"]))
    done = await tm.wait((await tm.submit("garbage")).id, timeout=10)
    assert done.status is TaskStatus.FAILED
    assert done.error is not None and done.error.code == "bad_image"
    assert sql(tm.path, "SELECT count(*) FROM task_images") == [(0,)]
    assert list(tm.images_root.rglob("*.png*")) == []


async def test_provider_bug_fails_the_task_instead_of_hanging(make_manager):
    """An unexpected exception from a provider fails the task with internal_error."""

    class Broken(FakeProvider):
        async def generate(self, request):  # type: ignore[no-untyped-def]
            raise KeyError("oops")

    tm = await make_manager(provider=Broken())
    done = await tm.wait((await tm.submit("x")).id, timeout=10)
    assert done.error is not None and done.error.code == "internal_error" and "KeyError" in done.error.message


# --- cancel -----------------------------------------------------------------------------------


async def test_cancel_queued_is_immediate(make_manager):
    """Cancelling a queued task ends it at once; it never reaches the provider."""
    provider = FakeProvider()
    tm = await make_manager(provider=provider, workers=False)
    task = await tm.submit("never mind")
    cancelled = await tm.cancel(task.id)
    assert cancelled.status is TaskStatus.CANCELLED and cancelled.error is not None
    assert cancelled.error.code == "cancelled"
    assert (await tm.cancel(task.id)).status is TaskStatus.CANCELLED  # idempotent


async def test_cancel_running_stops_the_attempt_and_wakes_waiters(make_manager):
    """Cancelling a running task stops its coroutine and every waiter returns the cancelled task."""
    provider = FakeProvider(outcomes=["hang"])
    tm = await make_manager(provider=provider)
    task = await tm.submit("stop me")
    while (await tm.poll(task.id)).status is not TaskStatus.RUNNING:
        await asyncio.sleep(0.01)
    waiters = [asyncio.ensure_future(tm.wait(task.id, timeout=10)) for _ in range(3)]
    await asyncio.sleep(0.05)
    await tm.cancel(task.id)
    results = await asyncio.gather(*waiters)
    assert {t.status for t in results} == {TaskStatus.CANCELLED}
    for _ in range(100):
        if provider.active == 0:
            break
        await asyncio.sleep(0.01)
    assert provider.active == 0


async def test_cancel_of_a_finished_task_changes_nothing(make_manager):
    """A succeeded task stays succeeded when cancelled."""
    tm = await make_manager()
    done = await tm.wait((await tm.submit("done")).id, timeout=10)
    assert (await tm.cancel(done.id)).status is TaskStatus.SUCCEEDED


async def test_cancel_racing_completion_ends_in_one_state(make_manager):
    """Cancels fired around the moment of completion leave each task in exactly one terminal state."""
    tm = await make_manager(provider=FakeProvider(latency=0.03), concurrency=8, per_owner=8, credits=True)
    await tm.credits.grant("default", 100)
    ids = [(await tm.submit(f"race {i}")).id for i in range(24)]
    await asyncio.sleep(0.01)
    for i, task_id in enumerate(ids):
        await asyncio.sleep(0.003 * (i % 8))
        await tm.cancel(task_id)
    tasks = [await tm.wait(task_id, timeout=10) for task_id in ids]
    assert all(t.status in (TaskStatus.SUCCEEDED, TaskStatus.CANCELLED) for t in tasks)
    for t in tasks:
        terminal = sql(
            tm.path,
            "SELECT event FROM task_events WHERE task_id = ? AND event IN ('succeeded','cancelled','failed')",
            t.id,
        )
        assert len(terminal) == 1
        outputs = sql(tm.path, "SELECT count(*) FROM task_images WHERE task_id = ? AND role='output'", t.id)
        assert outputs == [(1 if t.ok else 0,)]
    check_attempts_exclusive(tm.path)
    await asyncio.sleep(0.1)  # let any dropped attempt delete its files
    kept = {p for t in tasks for p in (im.path for im in t.images)}
    on_disk = {p for p in tm.images_root.rglob("a*-*.png")}
    assert on_disk == kept


# --- idempotency ------------------------------------------------------------------------------


async def test_fifty_concurrent_submits_with_one_key_make_one_task_and_one_charge(make_manager):
    """50 concurrent submits with the same owner and key create one task and charge once."""
    tm = await make_manager(credits=True, workers=False)
    await tm.credits.grant("alice", 10)
    tasks = await asyncio.gather(
        *[tm.submit("click", owner="alice", idempotency_key="click-123") for _ in range(50)]
    )
    assert len({t.id for t in tasks}) == 1
    assert sql(tm.path, "SELECT count(*) FROM tasks") == [(1,)]
    assert sql(tm.path, "SELECT count(*) FROM ledger WHERE kind = 'charge'") == [(1,)]
    assert await tm.credits.balance("alice") == 9


async def test_idempotency_holds_across_two_managers(make_manager):
    """Two managers (two writer connections) on one file still make one task for one key."""
    a = await make_manager(workers=False, credits=True)
    b = await make_manager(workers=False, credits=True)
    await a.credits.grant("alice", 5)
    results = await asyncio.gather(
        *[m.submit("dbl", owner="alice", idempotency_key="k") for m in (a, b) * 10]
    )
    assert len({t.id for t in results}) == 1
    assert await a.credits.balance("alice") == 4


async def test_same_key_different_request_is_a_validation_error(make_manager):
    """Reusing a key for a different prompt is a ValidationError naming idempotency_key."""
    tm = await make_manager(workers=False)
    await tm.submit("first", idempotency_key="k1")
    with pytest.raises(ValidationError) as err:
        await tm.submit("second", idempotency_key="k1")
    assert err.value.field == "idempotency_key"
    other_owner = await tm.submit("second", idempotency_key="k1", owner="bob")  # keys are per owner
    assert other_owner.prompt == "second"
    assert sql(tm.path, "SELECT count(*) FROM tasks") == [(2,)]


_FIRST = {"n": 1, "model": "gemini-3-pro-image-preview", "aspect_ratio": "1:1", "size": "1K"}


@pytest.mark.parametrize(
    "change",
    [
        {"n": 2},
        {"model": "gemini-3-pro-image"},
        {"aspect_ratio": "16:9"},
        {"size": "2K"},
        {"images": [png(color="blue")]},
        {"images": [png(color="red"), png(color="blue")]},
        {"images": []},
    ],
    ids=["n", "model", "aspect_ratio", "size", "other-reference", "one-more-reference", "no-reference"],
)
async def test_same_key_with_any_other_part_of_the_work_is_a_validation_error(make_manager, change):
    """The same key with the same prompt but another n, model, aspect ratio, size or other
    reference images is a different request: a ValidationError naming idempotency_key, and
    nothing written; the identical request returns the first task."""
    tm = await make_manager(workers=False, provider=FakeProvider(models=GEMINI_MODELS))
    first = await tm.submit("same prompt", images=[png(color="red")], idempotency_key="k", **_FIRST)
    other = {"images": [png(color="red")], **_FIRST, **change}
    with pytest.raises(ValidationError) as err:
        await tm.submit("same prompt", idempotency_key="k", **other)
    assert err.value.field == "idempotency_key"
    again = await tm.submit("same prompt", images=[png(color="red")], idempotency_key="k", **_FIRST)
    assert again.id == first.id
    assert sql(tm.path, "SELECT count(*) FROM tasks") == [(1,)]


async def test_a_batch_that_reuses_a_key_for_another_request_is_refused_by_position(make_manager):
    """submit_many with two different requests under one key is a ValidationError naming the
    second request's idempotency_key (not a task the refused batch never wrote), and nothing
    is written; the same request twice under one key is one task."""
    tm = await make_manager(workers=False)
    with pytest.raises(ValidationError) as err:
        await tm.submit_many(
            [{"prompt": "a", "idempotency_key": "k"}, {"prompt": "b", "idempotency_key": "k"}]
        )
    assert err.value.field == "requests[1].idempotency_key" and "requests[0]" in str(err.value)
    assert sql(tm.path, "SELECT count(*) FROM tasks") == [(0,)]
    twice = await tm.submit_many([{"prompt": "a", "idempotency_key": "k"}] * 2)
    assert twice[0].id == twice[1].id and sql(tm.path, "SELECT count(*) FROM tasks") == [(1,)]


async def test_idempotent_resubmit_does_not_leave_reference_copies(make_manager):
    """A re-submit that returns the first task deletes the reference copies it made."""
    tm = await make_manager(workers=False)
    first = await tm.submit("edit", images=[png()], idempotency_key="k")
    again = await tm.submit("edit", images=[png()], idempotency_key="k")
    assert again.id == first.id
    assert len(list(tm.images_root.rglob("ref-*"))) == 1


# --- credits ----------------------------------------------------------------------------------


async def test_submit_charges_in_the_insert_transaction(make_manager):
    """With credits on, the task row and its charge appear together."""
    tm = await make_manager(credits=True, workers=False)
    await tm.credits.grant("alice", 10)
    task = await tm.submit("pay", n=3, owner="alice")
    assert await tm.credits.balance("alice") == 7
    assert sql(tm.path, "SELECT task_id, amount FROM ledger WHERE kind = 'charge'") == [(task.id, -3)]


async def test_insufficient_credits_writes_nothing(make_manager):
    """A short balance raises InsufficientCredits and writes no task, charge or file."""
    tm = await make_manager(credits=True, workers=False)
    await tm.credits.grant("alice", 2)
    with pytest.raises(InsufficientCredits, match="grant"):
        await tm.submit("too dear", n=3, owner="alice", images=[png()])
    with pytest.raises(InsufficientCredits):
        await tm.submit("never granted", owner="nobody")
    assert sql(tm.path, "SELECT count(*) FROM tasks") == [(0,)]
    assert sql(tm.path, "SELECT kind FROM ledger") == [("grant",)]
    assert list(tm.images_root.rglob("*.*")) == []
    assert await tm.credits.balance("alice") == 2


async def test_failure_refunds_exactly_once(make_manager):
    """A failed task's charge is refunded once."""
    tm = await make_manager(credits=True, provider=FakeProvider(outcomes=["permanent"]))
    await tm.credits.grant("alice", 5)
    done = await tm.wait((await tm.submit("fail", n=2, owner="alice")).id, timeout=10)
    assert done.status is TaskStatus.FAILED
    assert await tm.credits.balance("alice") == 5
    await tm.cancel(done.id)  # no second refund
    assert sql(tm.path, "SELECT kind, amount FROM ledger WHERE task_id = ?", done.id) == [
        ("charge", -2),
        ("refund", 2),
    ]


async def test_cancel_refunds_once_and_retries_are_not_charged_again(make_manager):
    """Cancel refunds once; a task that retried twice was charged once and not refunded."""
    tm = await make_manager(credits=True, provider=FakeProvider(outcomes=["transient", "transient"]))
    await tm.credits.grant("alice", 10)
    retried = await tm.wait((await tm.submit("retry", owner="alice")).id, timeout=10)
    assert retried.ok and retried.attempts == 3
    assert await tm.credits.balance("alice") == 9
    task = await tm.submit("cancel me", owner="alice", n=4)
    await tm.cancel(task.id)
    await tm.cancel(task.id)
    assert await tm.credits.balance("alice") == 9


async def test_credits_off_charges_nothing_but_prices_the_task(make_manager):
    """With credits off, Task.cost is still computed and nothing enters the ledger."""
    tm = await make_manager(workers=False)
    task = await tm.submit("free", n=4)
    assert task.cost == 4
    assert sql(tm.path, "SELECT count(*) FROM ledger") == [(0,)]


async def test_grant_validates(make_manager):
    """grant() rejects a zero or non-integer amount and a balance that would go negative."""
    tm = await make_manager(workers=False)
    for amount in (0, 1.5, True):
        with pytest.raises(ValidationError, match="amount"):
            await tm.credits.grant("alice", amount)
    await tm.credits.grant("alice", 3)
    with pytest.raises(ValidationError, match="negative"):
        await tm.credits.grant("alice", -4)
    assert await tm.credits.balance("alice") == 3


# --- configuration and lifecycle --------------------------------------------------------------


async def test_no_provider_and_workers_fails_at_open_saying_how(tmp_path):
    """With no key and no provider, a worker manager refuses to open and says what to do."""
    tm = TaskManager(tmp_path / "t.db")
    with pytest.raises(ConfigError, match="GEMINI_API_KEY") as err:
        await tm.open()
    assert "FakeProvider" in str(err.value)


async def test_without_workers_or_a_key_it_reads_and_submits_for_gemini(make_manager, monkeypatch):
    """A manager with no workers, no provider and no key polls, lists and cancels, and its
    submits are validated and priced against Gemini's model table (for an `imagetask worker`
    with a key to run); a model only FakeProvider serves is refused by name."""
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    writer = await make_manager(workers=False)
    task = await writer.submit("made elsewhere")
    reader = TaskManager(writer.path, workers=False)
    assert reader.provider is not None and reader.provider.name == "gemini"
    async with reader:
        assert (await reader.poll(task.id)).id == task.id
        assert (await reader.submit("x")).model.startswith("gemini-")
        with pytest.raises(ValidationError) as caught:
            await reader.submit("x", model="fake")
        assert caught.value.field == "model"
        assert (await reader.cancel(task.id)).status is TaskStatus.CANCELLED


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("concurrency", 0),
        ("per_owner", -1),
        ("max_attempts", 0),
        ("lease", 0),
        ("attempt_timeout", -1),
        ("retry_delay", "soon"),
        ("durability", "extreme"),
        ("path", ":memory:"),
    ],
)
def test_bad_options_name_the_option(option, value, tmp_path):
    """A bad manager option raises ConfigError naming it."""
    kwargs = {"path": tmp_path / "t.db", option: value}
    with pytest.raises(ConfigError, match=option):
        TaskManager(**kwargs)


async def test_closed_manager_refuses_use(make_manager):
    """After aclose(), calls raise a clear error instead of touching a closed database."""
    tm = await make_manager()
    await tm.aclose()
    with pytest.raises(ConfigError, match="closed"):
        await tm.submit("x")
    with pytest.raises(ConfigError, match="create a new one"):
        await tm.open()


async def test_close_releases_running_tasks_and_fails_waiters(make_manager):
    """Closing gives running tasks back to the queue and ends pending waits with an error."""
    tm = await make_manager(provider=FakeProvider(outcomes=["hang"]))
    task = await tm.submit("interrupted by close")
    while (await tm.poll(task.id)).status is not TaskStatus.RUNNING:
        await asyncio.sleep(0.01)
    waiter = asyncio.ensure_future(tm.wait(task.id))
    await asyncio.sleep(0.02)
    await tm.aclose()
    with pytest.raises(ImageTaskError, match="closed"):
        await waiter
    assert sql(tm.path, "SELECT status, attempt FROM tasks") == [("queued", 1)]
    tm2 = await make_manager()
    assert (await tm2.wait(task.id, timeout=10)).ok


async def test_unclosed_manager_warns(tmp_path):
    """A manager dropped while open emits a ResourceWarning."""
    tm = TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False)
    await tm.open()
    with pytest.warns(ResourceWarning, match="never closed"):
        tm.__del__()
    await tm.aclose()


async def test_default_path_comes_from_imagetask_home(tmp_path, monkeypatch):
    """Without a path, the database is tasks.db in $IMAGETASK_HOME with images/ beside it."""
    monkeypatch.setenv("IMAGETASK_HOME", str(tmp_path / "custom"))
    tm = TaskManager(provider=FakeProvider(), workers=False)
    assert tm.path == tmp_path / "custom" / "tasks.db"
    assert tm.images_root == tmp_path / "custom" / "images"
    async with tm:
        await tm.submit("here")
    assert Path(tmp_path / "custom" / "tasks.db").exists()


async def test_tasks_show_themselves_in_jupyter(make_manager):
    """Task renders HTML with its status and images (prompt escaped); StoredImage renders an
    inline preview."""
    tm = await make_manager()
    done = await tm.wait((await tm.submit("<b>bold</b> lighthouse", n=2)).id, timeout=10)
    html_text = done._repr_html_()
    assert "succeeded" in html_text and html_text.count("<img ") == 2
    assert "&lt;b&gt;bold" in html_text and "<b>bold</b>" not in html_text
    assert done.images[0]._repr_html_().startswith('<img src="data:image/jpeg;base64,')
    failed_tm = await make_manager(provider=FakeProvider(outcomes=["refusal"]))
    failed = await failed_tm.wait((await failed_tm.submit("no")).id, timeout=10)
    assert "safety_blocked" in failed._repr_html_()


async def test_as_completed_timeout_yields_the_finished_then_raises(make_manager):
    """as_completed(timeout) yields what finished, then raises WaitTimeout; the rest keep running."""
    tm = await make_manager(provider=FakeProvider(outcomes=["ok", "hang"]), concurrency=2)
    quick = await tm.submit("quick")
    await tm.wait(quick.id, timeout=10)
    stuck = await tm.submit("stuck")
    seen: list[str] = []

    async def consume() -> None:
        async for task in tm.as_completed([quick.id, stuck.id], timeout=0.3):
            seen.append(task.id)

    with pytest.raises(WaitTimeout):
        await consume()
    assert seen == [quick.id]
    assert (await tm.poll(stuck.id)).status is TaskStatus.RUNNING


class _ProviderFailingToClose(FakeProvider):
    async def aclose(self) -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("the provider's client would not close")


def _no_connection_open(db: Path) -> bool:
    """Leaving WAL mode needs the only connection to the file: it is refused while another
    is open (the manager's, if its close left one behind)."""
    con = sqlite3.connect(db, timeout=0)
    try:
        return con.execute("PRAGMA journal_mode=DELETE").fetchone()[0] == "delete"
    except sqlite3.OperationalError:  # "database is locked"
        return False
    finally:
        con.close()


async def test_a_provider_failing_to_close_still_closes_the_database(tmp_path):
    """aclose() raises the provider's own error, and the database is closed all the same:
    no connection (nor its thread) outlives the manager."""
    db = tmp_path / "t.db"
    tm = TaskManager(db, provider=_ProviderFailingToClose())
    await tm.open()
    await tm.submit("a task")
    with pytest.raises(RuntimeError, match="would not close"):
        await tm.aclose()
    assert _no_connection_open(db)


async def test_a_cancelled_close_still_closes_and_logs_its_error(tmp_path, caplog):
    """A close whose caller is cancelled (Ctrl-C) goes on to the end: the database is closed,
    and the provider's error is logged instead of lost to "exception was never retrieved"."""
    db = tmp_path / "t.db"
    tm = TaskManager(db, provider=_ProviderFailingToClose())
    await tm.open()
    closing = asyncio.ensure_future(tm.aclose())
    await asyncio.sleep(0.01)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    for _ in range(200):
        if "closing" in caplog.text:
            break
        await asyncio.sleep(0.01)
    assert f"closing {db} failed: RuntimeError: the provider's client would not close" in caplog.text
    assert _no_connection_open(db)


@pytest.mark.parametrize("n", [1, 2])
async def test_a_waiting_close_awaited_inside_a_generation_raises_instead_of_hanging(tmp_path, n):
    """aclose(cancel_running=False) awaited by the provider's own code (n=2: from the task of
    one of the attempt's calls) raises ConfigError at once, naming the fix, instead of
    waiting forever for the attempt that awaits it; the attempt goes on and succeeds, and
    the manager still closes."""
    errors: list[ConfigError] = []

    class ClosingFromInside(FakeProvider):
        async def generate(self, request):  # type: ignore[no-untyped-def]
            try:
                await tm.aclose(cancel_running=False)
            except ConfigError as exc:
                errors.append(exc)
            return await super().generate(request)

    tm = TaskManager(tmp_path / "t.db", provider=ClosingFromInside())
    async with tm:
        task = await tm.wait((await tm.submit("closes itself", n=n)).id, timeout=20)
    assert task.ok and len(task.images) == n
    assert len(errors) == n and "would wait for itself" in str(errors[0]) and "grace=" in str(errors[0])


async def test_a_waiting_close_started_in_a_task_of_the_provider_closes(tmp_path):
    """A provider that starts aclose(cancel_running=False) in a task of its own and does not
    await it (closing "from outside" its generation) gets a real close: no ConfigError, the
    attempt finishes first, and the manager ends closed."""
    closes: list[asyncio.Task[None]] = []

    class ClosingLater(FakeProvider):
        async def generate(self, request):  # type: ignore[no-untyped-def]
            if not closes:
                closes.append(asyncio.create_task(tm.aclose(cancel_running=False)))
            return await super().generate(request)

    tm = TaskManager(tmp_path / "t.db", provider=ClosingLater())
    await tm.open()
    task = await tm.submit("closes the manager")
    await asyncio.wait_for(asyncio.shield(_first(closes)), 20)
    assert closes[0].exception() is None and not tm.is_open
    async with TaskManager(tmp_path / "t.db", workers=False) as reader:
        assert (await reader.poll(task.id)).ok


async def _first(tasks: list[asyncio.Task[None]]) -> None:
    while not tasks:
        await asyncio.sleep(0.01)
    await asyncio.wait([tasks[0]])
