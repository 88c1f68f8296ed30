"""The worker's fencing: lost leases, late finishes and heartbeats (guarantee 3)."""

from __future__ import annotations

import asyncio
import sqlite3

from imagetask import TaskStatus
from imagetask.providers import FakeProvider, ImageRequest, ImageResult
from imagetask.testing import Faults

from conftest import RETAKEN_THEN_SUCCEEDED, check_attempts_exclusive, sql, trail


async def wait_for(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


class Held(FakeProvider):
    """A FakeProvider whose calls start at once and answer only once `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.started, self.release = asyncio.Event(), asyncio.Event()

    async def generate(self, request: ImageRequest) -> ImageResult:
        self.started.set()
        await self.release.wait()
        return await super().generate(request)


async def test_completion_racing_lease_expiry_keeps_the_new_attempt(make_manager):
    """A worker that finishes after its lease was taken and re-run elsewhere writes nothing."""
    slow, stalled = Held(), Faults()
    # Heartbeat every 10 s: none during the test.
    a = await make_manager(provider=slow, lease=30, faults=stalled)
    task = await a.submit("contested")
    await asyncio.wait_for(slow.started.wait(), 10)
    # A stalls: none of its writes get through (else its own claims would renew its lease),
    # and its lease runs out.
    stalled.fail("claim", sqlite3.OperationalError("database is locked"), times=10_000)
    sql(a.path, "UPDATE tasks SET lease_until = 0 WHERE id = ?", task.id)
    # B re-runs it and is still generating when A's stale attempt finishes (A's call answers
    # only once B has claimed, however slowly B opens).
    fresh = Held()
    b = await make_manager(provider=fresh, lease=30)
    await asyncio.wait_for(fresh.started.wait(), 10)
    stalled.clear()
    slow.release.set()
    # A's stale attempt wrote its image, was refused its success (fenced), and deleted it.
    await wait_for(lambda: stalled.hits["succeed"] >= 1 and not any(a.images_root.rglob("a1-*")))
    fresh.release.set()
    done = await b.wait(task.id, timeout=10)
    assert done.ok and done.attempts == 2
    final = await a.poll(task.id)
    assert final.status is TaskStatus.SUCCEEDED and final.images == done.images
    assert [im.path.name for im in final.images] == ["a2-0.png"]
    assert sorted(p.name for p in a.images_root.rglob("*.png")) == ["a2-0.png"]  # A's file deleted
    events = trail(await a.events(task.id))
    assert events == RETAKEN_THEN_SUCCEEDED
    check_attempts_exclusive(a.path)


async def test_heartbeat_after_lease_lost_stops_the_old_attempt(make_manager):
    """At its next heartbeat, a worker whose claim was taken stops its attempt and writes nothing."""
    first, a_faults = FakeProvider(outcomes=["hang"]), Faults()
    a = await make_manager(provider=first, lease=0.6, faults=a_faults)  # heartbeat every 0.2 s
    task = await a.submit("taken away")
    await wait_for(lambda: first.active == 1)
    # A claims nothing more: once its heartbeat frees its slot it would race B for the task
    # (and on a slow machine win it, before B has even opened the database).
    a_faults.fail("claim", sqlite3.OperationalError("database is locked"), times=10_000)
    # Another worker's reaper took the task back (as after a long pause in A) ...
    sql(a.path, "UPDATE tasks SET status = 'queued', worker = NULL, lease_until = NULL WHERE id = ?", task.id)
    second = FakeProvider(outcomes=["hang"])
    b = await make_manager(provider=second, lease=30)
    await wait_for(lambda: second.active == 1)  # ... and B claimed attempt 2
    await wait_for(lambda: first.active == 0, timeout=5)  # A noticed at a heartbeat and stopped
    row = sql(a.path, "SELECT status, attempt, worker FROM tasks WHERE id = ?", task.id)[0]
    assert row[0] == "running" and row[1] == 2 and row[2] == b.worker_id
    await b.cancel(task.id)
    assert (await b.wait(task.id, timeout=5)).status is TaskStatus.CANCELLED
    workers_after_claim_2 = sql(
        a.path,
        "SELECT worker FROM task_events WHERE task_id = ? AND attempt = 1 AND event != 'claimed'",
        task.id,
    )
    assert workers_after_claim_2 == []  # A wrote nothing for attempt 1


async def test_expired_leases_are_taken_back_while_every_slot_is_busy(make_manager):
    """A worker whose generation slot and claim ahead are both taken still takes back another
    worker's expired lease within a few poll intervals: the task returns to the queue instead
    of staying running until one of this worker's generations ends."""
    busy = FakeProvider(outcomes=["hang", "hang"])
    a = await make_manager(provider=busy, concurrency=1, lease=30)  # claims 1 + 1 ahead
    own = [await a.submit(f"keeps A busy {i}") for i in range(2)]
    await wait_for(lambda: busy.active == 1)
    await wait_for(lambda: sql(a.path, "SELECT count(*) FROM tasks WHERE status = 'running'") == [(2,)])
    stalled, stalled_faults = FakeProvider(outcomes=["hang"]), Faults()
    b = await make_manager(provider=stalled, lease=30, faults=stalled_faults)
    task = await b.submit("held by a worker that stalls")
    await wait_for(lambda: stalled.active == 1)
    # B stalls (none of its claims get through) and its lease on the task runs out.
    stalled_faults.fail("claim", sqlite3.OperationalError("database is locked"), times=10_000)
    sql(a.path, "UPDATE tasks SET lease_until = 0 WHERE id = ?", task.id)
    await wait_for(lambda: sql(a.path, "SELECT status FROM tasks WHERE id = ?", task.id) == [("queued",)], 5)
    assert trail(await a.events(task.id)) == [("claimed", 1), ("lease_expired", 1)]
    assert busy.active == 1 and [(await a.poll(t.id)).status for t in own] == [TaskStatus.RUNNING] * 2
    for t in (*own, task):
        await a.cancel(t.id)


async def test_cancel_from_another_process_stops_the_attempt_at_heartbeat(make_manager):
    """A running task cancelled through another manager stops its coroutine at the next heartbeat."""
    provider = FakeProvider(outcomes=["hang"])
    worker = await make_manager(provider=provider, lease=0.6)
    other = await make_manager(workers=False)
    task = await worker.submit("cancel me from afar")
    await wait_for(lambda: provider.active == 1)
    assert (await other.cancel(task.id)).status is TaskStatus.CANCELLED
    await wait_for(lambda: provider.active == 0, timeout=5)
    assert (await worker.wait(task.id, timeout=5)).status is TaskStatus.CANCELLED


async def test_prune_deletes_old_finished_tasks_and_their_files_only(make_manager):
    """prune removes finished tasks past the age with files and events; it keeps active tasks and
    never touches the ledger."""
    tm = await make_manager(credits=True, provider=FakeProvider(outcomes=["ok", "permanent"]))
    await tm.credits.grant("alice", 10)
    ok = await tm.wait((await tm.submit("keep?", owner="alice")).id, timeout=10)
    failed = await tm.wait((await tm.submit("fails", owner="alice")).id, timeout=10)
    assert failed.status is TaskStatus.FAILED
    hanging = FakeProvider(outcomes=["hang"])
    active_mgr = await make_manager(provider=hanging, credits=True)
    active = await active_mgr.submit("still running", owner="alice")
    await wait_for(lambda: hanging.active == 1)
    ledger_before = sql(tm.path, "SELECT * FROM ledger ORDER BY id")
    nothing = await tm.prune(older_than=3600)
    assert nothing.tasks == 0 and ok.images[0].path.exists()
    report = await tm.prune(older_than=0)
    assert report.tasks == 2 and report.files == 1
    assert not ok.images[0].path.exists()
    assert [t.id for t in await tm.list()] == [active.id]
    assert sql(tm.path, "SELECT * FROM ledger ORDER BY id") == ledger_before
    assert sql(tm.path, "SELECT DISTINCT task_id FROM task_events") == [(active.id,)]


async def test_a_task_claimed_ahead_waits_for_a_slot_and_can_be_cancelled(make_manager):
    """With concurrency 1, a second task is claimed ahead but not generated until the slot frees;
    cancelling it while it waits never reaches the provider; per_owner still bounds the claims."""
    provider = FakeProvider(outcomes=["hang"])
    tm = await make_manager(provider=provider, concurrency=1, per_owner=5)
    first = await tm.submit("holds the slot", owner="a")
    second = await tm.submit("waits for it", owner="b")
    third = await tm.submit("not claimed yet", owner="c")
    await wait_for(lambda: provider.active == 1)
    await asyncio.sleep(0.2)  # several dispatcher turns
    statuses = {t.id: t.status for t in [await tm.poll(i) for i in (first.id, second.id, third.id)]}
    assert statuses == {first.id: "running", second.id: "running", third.id: "queued"}
    assert provider.calls == 1 and provider.max_active == 1
    assert (await tm.cancel(second.id)).status is TaskStatus.CANCELLED
    await tm.cancel(first.id)
    done = await tm.wait(third.id, timeout=10)  # the slot and the look-ahead move on
    assert done.ok and provider.calls == 2  # the cancelled waiting task never generated


async def test_a_worker_claims_a_quarter_of_its_slots_ahead(make_manager):
    """With concurrency 8 a worker runs 8 generations and holds exactly 2 more claimed tasks;
    the rest stay queued for any process to take."""
    provider = FakeProvider(outcomes=["hang"] * 8)
    tm = await make_manager(provider=provider, concurrency=8, per_owner=20)
    await tm.submit_many([{"prompt": f"t{i}"} for i in range(14)])
    await wait_for(lambda: provider.active == 8)
    await asyncio.sleep(0.2)  # several dispatcher turns
    counts = dict(sql(tm.path, "SELECT status, count(*) FROM tasks GROUP BY status"))
    assert counts == {"running": 10, "queued": 4}
    assert provider.calls == 8


async def test_claim_ahead_respects_per_owner(make_manager):
    """The task claimed ahead still counts against its owner's limit."""
    provider = FakeProvider(outcomes=["hang", "hang"])
    tm = await make_manager(provider=provider, concurrency=1, per_owner=1)
    ids = [(await tm.submit(f"alice {i}", owner="alice")).id for i in range(3)]
    await wait_for(lambda: provider.active == 1)
    await asyncio.sleep(0.2)
    assert sql(tm.path, "SELECT count(*) FROM tasks WHERE status = 'running'") == [(1,)]
    for task_id in ids:
        await tm.cancel(task_id)


async def test_a_failed_success_write_is_tried_again_not_regenerated(make_manager):
    """When the database refuses an attempt's success write for a moment (an I/O error), the
    worker writes it again: the task succeeds with its one generation, not a second paid one."""
    faults = Faults()
    faults.fail("succeed", sqlite3.OperationalError("disk I/O error"), times=2)
    provider = FakeProvider()
    tm = await make_manager(provider=provider, faults=faults)
    done = await tm.wait((await tm.submit("worth keeping")).id, timeout=10)
    assert done.ok and done.attempts == 1 and len(done.images) == 1
    assert provider.calls == 1 and faults.hits["succeed"] == 3
    assert done.images[0].path.exists()


async def test_a_success_that_committed_despite_an_error_keeps_its_files(make_manager):
    """If a success write reports an error although it committed, the next try is fenced out;
    the worker sees the committed result is its own files and keeps them (never deletes the
    images a succeeded row points to)."""
    faults = Faults()
    faults.fail("succeed", sqlite3.OperationalError("disk I/O error"), after_commit=True)
    provider = FakeProvider()
    tm = await make_manager(provider=provider, faults=faults)
    done = await tm.wait((await tm.submit("keep my files")).id, timeout=10)
    await tm.aclose()  # waits for the attempt: its second try, fenced out, and its decision
    assert done.ok and provider.calls == 1 and faults.hits["succeed"] == 2
    assert [im.path.exists() for im in done.images] == [True]


async def test_submits_of_an_owner_at_its_cap_wake_no_claim(make_manager):
    """With one owner whose per_owner cap is full (the notebook shape), further submits wake no
    claim transaction that could only find nothing; an attempt that ends claims the next."""
    faults, provider = Faults(), FakeProvider(outcomes=["hang", "hang"])
    tm = await make_manager(provider=provider, faults=faults, concurrency=2, per_owner=2, poll_interval=30)
    first = [await tm.submit(f"fills the cap {i}") for i in range(2)]
    await wait_for(lambda: provider.active == 2)
    before = faults.hits["claim"]
    later = [await tm.submit(f"waits its turn {i}") for i in range(50)]
    await asyncio.sleep(0.1)
    assert faults.hits["claim"] - before <= 2  # not one per submit
    await tm.cancel(first[0].id)  # a slot frees: the next task is claimed without a submit
    await wait_for(lambda: provider.calls >= 3)  # the rest then run at once: calls goes on
    for task in [*first, *later]:
        await tm.cancel(task.id)


async def test_a_worker_runs_only_its_own_providers_tasks(make_manager, db_path):
    """A task submitted for one provider is never run by another's workers: a FakeProvider worker
    leaves a Gemini task queued (no fake picture for it), and a Gemini task is never claimed by
    the offline provider even when both serve the same model ids."""
    from imagetask import TaskManager
    from imagetask.providers import GEMINI_MODELS, GeminiProvider

    async with TaskManager(db_path, provider=GeminiProvider(), workers=False) as web:  # no key needed
        real = await web.submit("for Gemini only", model="gemini-2.5-flash-image")
    fake = FakeProvider(models=GEMINI_MODELS)
    tm = await make_manager(provider=fake)
    offline = await tm.submit("for the offline provider", model="gemini-2.5-flash-image")
    assert (await tm.wait(offline.id, timeout=10)).ok
    await asyncio.sleep(0.3)  # several claims
    assert (await tm.poll(real.id)).status is TaskStatus.QUEUED and fake.calls == 1
    assert sql(db_path, "SELECT provider FROM tasks ORDER BY id") == [("gemini",), ("fake",)]
