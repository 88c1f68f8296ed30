"""Faults injected for real: stalls, held locks, bad neighbours, broken image disks, dead holders,
unclosed managers, clean closes. Each test names the fault it makes and what the task must get."""

from __future__ import annotations

import asyncio
import errno
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from imagetask import StoreError, TaskManager, TaskStatus, ValidationError
from imagetask.providers import FakeProvider
from imagetask.testing import Faults

from conftest import check_attempts_exclusive, sql, trail, wait_until


async def wait_for(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- a stalled process ------------------------------------------------------------------------


async def test_a_loop_blocked_past_the_lease_keeps_its_own_attempt(make_manager):
    """A worker whose event loop was blocked longer than its lease (1 s) keeps its attempt when
    it wakes: the task succeeds on attempt 1 with one paid call, never taken back by itself."""
    provider = FakeProvider(latency=3)
    tm = await make_manager(provider=provider, lease=1)
    task = await tm.submit("a stalled worker")
    await wait_for(lambda: provider.active == 1)
    time.sleep(1.6)  # the fault: nothing on this loop runs, no heartbeat renews the lease
    done = await tm.wait(task.id, timeout=20)
    assert done.ok and done.attempts == 1 and provider.calls == 1
    assert trail(await tm.events(task.id)) == [("claimed", 1), ("succeeded", 1)]


@pytest.mark.slow
async def test_a_sigstopped_only_worker_finishes_its_tasks_when_continued(db_path, spawn):
    """The only worker process, SIGSTOPped for 5 s with lease=2, finishes all 3 tasks on their
    first attempt when continued: a stall is not a crash, and nothing is run twice."""
    child = spawn("work", str(db_path), "--lease", "2", "--latency", "3", "--concurrency", "3")
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    async with TaskManager(db_path, provider=FakeProvider(), workers=False) as tm:
        ids = [(await tm.submit(f"stalled {i}")).id for i in range(3)]
        wait_until(lambda: sql(db_path, "SELECT count(*) FROM tasks WHERE status = 'running'") == [(3,)])
        child.send_signal(signal.SIGSTOP)
        try:
            time.sleep(5)  # every lease (2 s) runs out while the worker is stopped
        finally:
            child.send_signal(signal.SIGCONT)
        done = [await tm.wait(task_id, timeout=30) for task_id in ids]
        assert [t.status for t in done] == [TaskStatus.SUCCEEDED] * 3
        assert [t.attempts for t in done] == [1, 1, 1]
        for task_id in ids:
            assert trail(await tm.events(task_id)) == [("claimed", 1), ("succeeded", 1)]


async def test_a_reclaim_by_the_same_process_replaces_the_old_attempt(make_manager):
    """When a stalled worker's lease was taken elsewhere and the same worker then claims the
    task again, the old attempt is stopped and the new one runs alone and is renewed: the task
    succeeds on that claim, and the old attempt's end does not unregister the new one."""
    provider, stall = FakeProvider(latency=3), Faults()
    # concurrency 1: a stale attempt that kept generating would hold the only slot.
    a = await make_manager(provider=provider, lease=0.6, concurrency=1, poll_interval=30, faults=stall)
    task = await a.submit("claimed twice by one worker")
    await wait_for(lambda: provider.active == 1)
    # A stalls: its lease renewals never reach the database, so its lease (0.6 s) runs out.
    stall.fail("heartbeat", sqlite3.OperationalError("disk I/O error"), times=10_000)
    await asyncio.sleep(1.0)
    other = FakeProvider(outcomes=["hang"])
    b = await make_manager(provider=other)  # takes the expired lease back and claims attempt 2
    await wait_for(lambda: other.active == 1)
    await b.aclose()  # hands attempt 2 back: the task is queued again
    stall.clear()
    await a.submit("wakes A's dispatcher", owner="nudge")  # A claims the task again: attempt 3
    done = await a.wait(task.id, timeout=15)
    assert done.ok and [im.path.name for im in done.images] == ["a3-0.png"]
    assert trail(await a.events(task.id)) == [
        ("claimed", 1), ("lease_expired", 1), ("claimed", 2), ("released", 2),
        ("claimed", 3), ("succeeded", 3),
    ]  # fmt: skip
    assert done.attempts == 2  # claims 1 and 3; attempt 2 was handed back
    assert [r.attempt for r in provider.requests if r.task_id == task.id] == [1, 3]
    check_attempts_exclusive(a.path)


# -- a held write lock ------------------------------------------------------------------------


def hold_write_lock(db, seconds: float, released: list[int], started: threading.Event) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        started.set()
        time.sleep(seconds)
        released.append(now_ms())
        conn.execute("COMMIT")
    finally:
        conn.close()


async def test_a_renewal_that_waited_for_the_lock_grants_a_full_lease(make_manager):
    """A lease renewal that waited 2.6 s for a write lock held by another connection grants a
    full lease (3 s) from the moment it commits, not from when it started waiting."""
    provider = FakeProvider(outcomes=["hang"])
    tm = await make_manager(provider=provider, lease=3)  # a heartbeat every second
    task = await tm.submit("renewed under a held lock")
    await wait_for(lambda: provider.active == 1)
    released: list[int] = []
    started = threading.Event()
    holder = threading.Thread(target=hold_write_lock, args=(tm.path, 2.6, released, started))
    holder.start()
    await asyncio.to_thread(started.wait)
    await asyncio.to_thread(holder.join)
    await asyncio.sleep(0.5)  # the heartbeat that waited commits right after the release
    ((lease_until,),) = sql(tm.path, "SELECT lease_until FROM tasks WHERE id = ?", task.id)
    assert lease_until >= released[0] + 3000
    assert (await tm.poll(task.id)).attempts == 1
    await tm.cancel(task.id)


async def test_a_reading_manager_opens_and_reads_while_another_connection_holds_the_lock(
    make_manager, db_path
):
    """Opening a database already at this schema version takes no lock: a manager that only
    reads (as the CLI's `ls` and `show` do) opens and polls while another connection holds
    the write lock, instead of waiting 10 s and failing "database is locked"."""
    writer = await make_manager()
    task = await writer.submit("read under a held lock")
    await writer.wait(task.id, timeout=10)
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        async with asyncio.timeout(5):
            async with TaskManager(db_path, workers=False) as reader:
                assert (await reader.poll(task.id)).status is TaskStatus.SUCCEEDED
                assert [t.id for t in await reader.list()] == [task.id]
    finally:
        holder.close()


async def test_a_claim_that_waited_out_a_held_lock_logs_one_line_and_retries(make_manager, caplog):
    """A claim that failed because another connection held the lock past the busy timeout
    (SQLite's SQLITE_BUSY) is logged as a one-line warning naming the lock, not an error with
    a traceback, and a later claim runs the task."""
    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode = sqlite3.SQLITE_BUSY  # as SQLite's own error carries it
    faults = Faults()
    faults.fail("claim", locked, times=2)
    caplog.set_level("WARNING", logger="imagetask")
    tm = await make_manager(faults=faults)
    task = await tm.submit("claimed once the lock is let go")
    assert (await tm.wait(task.id, timeout=10)).ok
    failed = [r for r in caplog.records if r.getMessage().startswith("claiming tasks failed")]
    assert len(failed) == 2 and faults.hits["claim"] >= 3
    assert all(r.levelname == "WARNING" and r.exc_info is None for r in failed)
    assert all("database is locked" in r.getMessage() for r in failed)


@pytest.mark.parametrize("operation", ["cancel", "grant"])
async def test_a_write_that_waited_out_a_held_lock_says_so_and_what_to_do(make_manager, operation):
    """A write refused because another connection held the lock past the busy timeout is a
    StoreError that names the file, says the lock was held elsewhere and to try again."""
    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode = sqlite3.SQLITE_BUSY  # as SQLite's own error carries it
    faults = Faults()
    tm = await make_manager(faults=faults, workers=False, credits=True)
    await tm.credits.grant("alice", 1)
    task = await tm.submit("cancelled later", owner="alice")
    # Twice: a small write that finds the lock taken goes to the writer's thread, which waits.
    faults.fail(operation, locked, times=2)
    with pytest.raises(StoreError) as err:
        await (tm.cancel(task.id) if operation == "cancel" else tm.credits.grant("alice", 5))
    message = str(err.value)
    assert str(tm.path) in message and "database is locked" in message
    assert "another connection held the write lock for more than 10 s; try again" in message
    assert (await tm.poll(task.id)).status is TaskStatus.QUEUED  # nothing was written
    assert await tm.credits.balance("alice") == 0


async def test_a_first_open_waits_for_a_lock_held_on_the_new_file(tmp_path):
    """Processes creating the same new database together: while another connection holds a
    lock on the file (not yet in WAL mode), the first open waits for it, as for any lock,
    and then opens; SQLite itself answers the switch to WAL "database is locked" at once."""
    path = tmp_path / "new.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    opening = asyncio.ensure_future(TaskManager(path, workers=False).open())
    try:
        await asyncio.sleep(0.5)
        assert not opening.done()  # waiting, not failed
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    tm = await asyncio.wait_for(opening, timeout=10)
    try:
        assert await tm.pending() == []
    finally:
        await tm.aclose()


# -- one caller's bad input -------------------------------------------------------------------


@pytest.mark.parametrize("field", ["prompt", "owner", "idempotency_key"])
async def test_a_lone_surrogate_fails_only_its_own_submit(make_manager, field):
    """A lone surrogate in one caller's prompt, owner or key is a ValidationError naming the
    field, and the submits made beside it in the same loop turn (one shared commit) succeed."""
    tm = await make_manager(workers=False)
    bad = {"prompt": "fine", field: "bad \ud800 text"}
    results = await asyncio.gather(
        tm.submit("before it"), tm.submit(**bad), tm.submit("after it"), return_exceptions=True
    )
    assert isinstance(results[1], ValidationError) and results[1].field == field
    assert [t.prompt for t in (results[0], results[2])] == ["before it", "after it"]
    assert sorted(t.prompt for t in await tm.list()) == ["after it", "before it"]


async def test_every_method_refuses_a_lone_surrogate_with_a_validation_error(make_manager):
    """poll, wait, cancel, pending, list, events and credits refuse a lone surrogate with a
    ValidationError naming the field, never a raw UnicodeEncodeError."""
    tm = await make_manager(workers=False, credits=True)
    bad = "x\udfff"
    calls = {
        "task_id": [tm.poll(bad), tm.wait(bad, timeout=1), tm.cancel(bad), tm.events(bad)],
        "owner": [
            tm.pending(owner=bad),
            tm.list(owner=bad),
            tm.credits.grant(bad, 5),
            tm.credits.balance(bad),
        ],
        "before": [tm.list(before=bad)],
    }
    for field, coroutines in calls.items():
        for coroutine in coroutines:
            with pytest.raises(ValidationError) as info:
                await coroutine
            assert info.value.field == field


async def test_a_row_the_database_refuses_fails_alone_in_a_shared_commit(make_manager):
    """When the database itself refuses one row of a shared commit (here a trigger another
    connection installed), only that caller gets a StoreError; its neighbours are written."""
    tm = await make_manager(workers=False)
    sql(
        tm.path,
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON tasks WHEN NEW.prompt = 'poison'"
        " BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END",
    )
    results = await asyncio.gather(
        tm.submit("first"), tm.submit("poison"), tm.submit("third"), return_exceptions=True
    )
    assert isinstance(results[1], StoreError) and "refused by a trigger" in str(results[1])
    assert [t.prompt for t in (results[0], results[2])] == ["first", "third"]
    assert sorted(t.prompt for t in await tm.list()) == ["first", "third"]


# -- image storage faults ---------------------------------------------------------------------


async def test_a_full_image_disk_is_retried_with_the_bytes_in_hand(make_manager, tmpfs):
    """Images that do not fit on a full disk are written again, without another generation,
    once space is freed within storage_timeout: one paid call, success, no .tmp files."""
    provider = FakeProvider()
    tm = await make_manager(provider=provider, images=tmpfs.path / "images", storage_timeout=30)
    (tmpfs.path / "images").mkdir()
    tmpfs.fill(leave_bytes=0)
    task = await tm.submit("waits for space")
    await wait_for(lambda: provider.calls == 1)
    await asyncio.sleep(0.5)  # several tries fail with ENOSPC
    assert (await tm.poll(task.id)).status is TaskStatus.RUNNING
    for filler in tmpfs.path.glob(".filler-*"):
        filler.unlink()
    done = await tm.wait(task.id, timeout=20)
    assert done.ok and done.attempts == 1 and provider.calls == 1
    assert list(tmpfs.path.rglob("*.tmp")) == []


async def test_a_read_only_image_disk_fails_storage_error_and_refunds(make_manager, tmpfs):
    """With the image folder on a read-only file system, each task fails storage_error (EROFS)
    after storage_timeout, is refunded, and was generated exactly once: 5 tasks, 5 paid calls."""
    provider = FakeProvider()
    images = tmpfs.path / "images"
    images.mkdir()
    tmpfs.remount(ro=True)
    tm = await make_manager(provider=provider, images=images, storage_timeout=0.5, credits=True)
    await tm.credits.grant("alice", 5)
    tasks = [await tm.submit(f"read-only {i}", owner="alice") for i in range(5)]
    assert await tm.credits.balance("alice") == 0
    done = [await tm.wait(t.id, timeout=20) for t in tasks]
    assert {t.status for t in done} == {TaskStatus.FAILED}
    assert {t.error.code for t in done if t.error} == {"storage_error"}
    assert all("EROFS" in t.error.message for t in done if t.error)
    assert [t.attempts for t in done] == [1] * 5 and provider.calls == 5
    assert await tm.credits.balance("alice") == 5


@pytest.mark.parametrize("tmpfs", ["256k"], indirect=True)
async def test_a_disk_that_stays_full_never_costs_a_second_generation(make_manager, tmpfs):
    """On a 256 KB disk that fills up, every task either stores its images or fails
    storage_error (ENOSPC): 12 tasks of 4 large images, 48 paid calls, no .tmp files left."""
    provider = FakeProvider()
    images = tmpfs.path / "images"
    tm = await make_manager(provider=provider, images=images, storage_timeout=0.3)
    tasks = [await tm.submit(f"a large picture {i}", n=4, size="4K") for i in range(12)]
    done = [await tm.wait(t.id, timeout=30) for t in tasks]
    failed = [t for t in done if not t.ok]
    assert failed and {t.error.code for t in failed if t.error} == {"storage_error"}
    assert all("ENOSPC" in t.error.message for t in failed if t.error)
    assert [t.attempts for t in done] == [1] * 12 and provider.calls == 48
    assert list(tmpfs.path.rglob("*.tmp")) == []
    for t in done:
        assert all(im.path.exists() for im in t.images)


async def test_an_io_error_storing_images_is_retried_not_regenerated(make_manager):
    """Two I/O errors (EIO, injected) while an image is written are retried with the bytes in
    hand: the task succeeds with its one generation."""
    provider, faults = FakeProvider(), Faults()
    faults.fail("write_image", OSError(errno.EIO, "Input/output error"), times=2)
    tm = await make_manager(provider=provider, faults=faults)
    done = await tm.wait((await tm.submit("survives EIO")).id, timeout=20)
    assert done.ok and provider.calls == 1 and faults.hits["write_image"] == 3


async def test_a_reference_copy_on_a_full_disk_is_a_store_error_and_writes_nothing(make_manager, tmpfs):
    """submit(images=...) with the image folder full raises StoreError naming the reason; no
    row and no file is left."""
    from PIL import Image

    images = tmpfs.path / "images"
    images.mkdir()
    tm = await make_manager(workers=False, images=images)
    tmpfs.fill(leave_bytes=0)
    reference = Image.frombytes("RGB", (256, 256), bytes(range(256)) * 768)
    with pytest.raises(StoreError, match="No space left on device"):
        await tm.submit("with a reference", images=[reference, reference])
    assert await tm.list() == []
    assert [p for p in images.rglob("*") if p.is_file()] == []


# -- a holder that is provably gone -----------------------------------------------------------


async def start_holder(db_path, spawn, prompts: list[str]) -> tuple[Any, list[str]]:
    """A worker process (60 s lease, 30 s generations) running tasks with these prompts."""
    child = spawn("work", str(db_path), "--lease", "60", "--latency", "30")
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    async with TaskManager(db_path, provider=FakeProvider(), workers=False) as submitter:
        ids = [(await submitter.submit(prompt)).id for prompt in prompts]
    count = len(prompts)
    wait_until(lambda: sql(db_path, "SELECT count(*) FROM tasks WHERE status = 'running'") == [(count,)])
    return child, ids


@pytest.mark.slow
async def test_a_killed_holder_on_this_host_is_taken_back_at_once(db_path, spawn):
    """A manager that opens on the same host takes back the tasks of a SIGKILLed worker at once,
    although their 60 s lease has not expired, and runs them."""
    child, ids = await start_holder(db_path, spawn, ["orphaned 0", "orphaned 1"])
    child.kill()
    child.wait()
    async with TaskManager(db_path, provider=FakeProvider(), lease=60, poll_interval=0.05) as tm:
        done = [await tm.wait(task_id, timeout=10) for task_id in ids]
        assert [t.status for t in done] == [TaskStatus.SUCCEEDED] * 2
        events = await tm.events(ids[0])
        assert [(e.kind, e.detail) for e in events][:2] == [
            ("claimed", None),
            ("lease_expired", "holder_gone"),
        ]


@pytest.mark.slow
async def test_a_stopped_holder_is_alive_and_keeps_its_leases(db_path, spawn):
    """A SIGSTOPped worker on the same host is alive: another manager does not take its
    unexpired leases back."""
    child, (task_id,) = await start_holder(db_path, spawn, ["held by a stopped process"])
    child.send_signal(signal.SIGSTOP)
    try:
        provider = FakeProvider()
        async with TaskManager(db_path, provider=provider, lease=60, poll_interval=0.05) as tm:
            await asyncio.sleep(1.0)  # twenty claims, each checking the holders
            assert (await tm.poll(task_id)).status is TaskStatus.RUNNING and provider.calls == 0
    finally:
        child.send_signal(signal.SIGCONT)


# -- clean close ------------------------------------------------------------------------------


async def test_attempts_handed_back_at_close_do_not_count(make_manager):
    """A task with max_attempts=1 that three managers claimed and handed back at close still
    runs and succeeds: handed-back attempts do not count (the fencing attempt number grows)."""
    ids = None
    for _ in range(3):
        provider = FakeProvider(outcomes=["hang"])
        tm = await make_manager(provider=provider, max_attempts=1)
        if ids is None:
            ids = (await tm.submit("handed back thrice")).id
        await wait_for(lambda provider=provider: provider.active == 1)
        await tm.aclose()
        async with TaskManager(tm.path, workers=False) as reader:
            snapshot = await reader.poll(ids)
        assert snapshot.status is TaskStatus.QUEUED and snapshot.attempts == 0
    tm = await make_manager(max_attempts=1)
    done = await tm.wait(ids, timeout=10)
    assert done.ok and done.attempts == 1 and [im.path.name for im in done.images] == ["a4-0.png"]


async def test_every_attempt_handed_back_at_close_shares_one_transaction(make_manager):
    """Closing with four attempts running hands all four back in one commit: a lock held
    elsewhere is then waited for once, not once per task."""
    faults = Faults()
    provider = FakeProvider(outcomes=["hang"] * 4)
    tm = await make_manager(provider=provider, concurrency=4, per_owner=4, faults=faults)
    ids = [(await tm.submit(f"handed back {i}")).id for i in range(4)]
    await wait_for(lambda: provider.active == 4)
    commits = sum(faults.commits.values())
    await tm.aclose()
    assert faults.hits["release"] == 4
    assert sum(faults.commits.values()) - commits == 1
    async with TaskManager(tm.path, workers=False) as reader:
        assert [(await reader.poll(i)).status for i in ids] == [TaskStatus.QUEUED] * 4


async def test_a_draining_close_hands_back_a_task_claimed_ahead_at_once(make_manager, db_path):
    """aclose(cancel_running=False) lets the running generation finish, but a task claimed
    ahead (waiting for a slot) is back in the queue while the close still waits: a long
    drain never keeps it past its lease."""
    provider = FakeProvider(latency=3)
    tm = await make_manager(provider=provider, concurrency=1, per_owner=2)
    first = await tm.submit("generating")
    second = await tm.submit("claimed ahead")
    await wait_for(lambda: provider.active == 1)
    await wait_for(lambda: sql(db_path, "SELECT status FROM tasks WHERE id = ?", second.id) == [("running",)])
    closing = asyncio.ensure_future(tm.aclose(cancel_running=False))
    await wait_for(lambda: sql(db_path, "SELECT status FROM tasks WHERE id = ?", second.id) == [("queued",)])
    assert not closing.done() and provider.active == 1
    await closing
    assert sql(db_path, "SELECT status FROM tasks WHERE id = ?", first.id) == [("succeeded",)]


async def test_a_close_that_cannot_hand_back_says_so_for_each_task(make_manager, db_path, caplog):
    """With another connection holding the write lock through the close, each attempt that
    could not be handed back is logged by task id (it runs again once its lease expires),
    and the close still ends."""
    provider = FakeProvider(outcomes=["hang"] * 2)
    tm = await make_manager(provider=provider, concurrency=2, per_owner=2)
    ids = [(await tm.submit(f"stuck {i}")).id for i in range(2)]
    await wait_for(lambda: provider.active == 2)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        await tm.aclose()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    for task_id in ids:
        assert f"task {task_id}: handing back attempt 1 failed" in caplog.text
    assert "database is locked" in caplog.text and "once its lease expires" in caplog.text


# -- an unclosed manager ----------------------------------------------------------------------

UNCLOSED = """
import asyncio, sys
from imagetask import TaskManager
from imagetask.providers import FakeProvider

async def main():
    tm = TaskManager(sys.argv[1], provider=FakeProvider(latency=60))
    await tm.open()
    await tm.submit("never finished")
    await asyncio.sleep(0.3)  # the attempt is running; the manager is never closed
    print("leaving", flush=True)

asyncio.run(main())
"""


def test_an_unclosed_manager_warns_and_does_not_keep_the_process_alive(db_path):
    """A script that never closes its manager warns with ResourceWarning and still exits."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", "-c", UNCLOSED, str(db_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "leaving" in done.stdout
    assert "ResourceWarning" in done.stderr and "was never closed" in done.stderr


# -- damage found while running ---------------------------------------------------------------


async def test_damage_found_while_running_is_reported_and_backed_off(make_manager, caplog):
    """When claims find the database damaged (SQLITE_CORRUPT, injected: the bounded check at
    open reads only part of a big file), the worker logs how to recover and backs off,
    doubling its pause, instead of failing every poll interval."""
    damaged = sqlite3.DatabaseError("database disk image is malformed")
    damaged.sqlite_errorcode = sqlite3.SQLITE_CORRUPT  # type: ignore[attr-defined]
    faults = Faults()
    faults.fail("claim", damaged, times=10_000)
    caplog.set_level("ERROR", logger="imagetask")
    await make_manager(faults=faults, poll_interval=0.05)
    await asyncio.sleep(1.6)
    # Without backing off: about 32 claims. With it: 0.05 + 0.1 + 0.2 + 0.4 + 0.8 s.
    assert 3 <= faults.hits["claim"] <= 6
    messages = [r.getMessage() for r in caplog.records]
    assert messages and all("is damaged" in m and ".recover" in m for m in messages)


async def test_a_quick_close_after_submit_never_leaves_a_task_running(make_manager, db_path):
    """Closing a manager right after a submit (while its dispatcher may be claiming) hands back
    every attempt it claimed before aclose() returns: after 15 quick cycles no task is left
    `running` for the next start to wait a lease on."""
    for i in range(15):
        tm = await make_manager(provider=FakeProvider(latency=5))
        await tm.submit(f"closed at once {i}")
        await asyncio.sleep(0.001 * (i % 4))
        await tm.aclose()
        assert sql(db_path, "SELECT count(*) FROM tasks WHERE status = 'running'") == [(0,)]


# -- found by an adversarial run ------------------------------------------------------------


async def test_a_bug_while_storing_fails_the_task_once_never_regenerates(make_manager):
    """An error that is not a storage fault (a bug, injected: RuntimeError while an image is
    written) fails the task with internal_error at once: one paid call, not one per lease."""
    provider, faults = FakeProvider(), Faults()
    faults.fail("write_image", RuntimeError("a bug"), times=100)
    tm = await make_manager(provider=provider, faults=faults, lease=1)
    done = await tm.wait((await tm.submit("meets a bug")).id, timeout=10)
    assert done.error is not None and done.error.code == "internal_error" and "a bug" in done.error.message
    assert provider.calls == 1 and done.attempts == 1


async def test_closing_while_images_are_retried_keeps_the_lease(make_manager, tmpfs):
    """aclose() while an attempt retries storing on a full disk keeps renewing its lease: a
    second manager never takes the task back and re-generates it; the attempt succeeds once
    space returns."""
    images = tmpfs.path / "images"
    images.mkdir()
    first = FakeProvider()
    a = await make_manager(provider=first, images=images, lease=1, storage_timeout=20)
    tmpfs.fill(leave_bytes=0)
    task = await a.submit("stored during close")
    await wait_for(lambda: first.calls == 1)
    closing = asyncio.ensure_future(a.aclose())
    second = FakeProvider()
    await make_manager(provider=second, images=images, lease=1)
    await asyncio.sleep(2.5)  # two and a half leases
    assert second.calls == 0
    for filler in tmpfs.path.glob(".filler-*"):
        filler.unlink()
    await asyncio.wait_for(closing, 20)
    ((status, attempt),) = sql(a.path, "SELECT status, attempt FROM tasks WHERE id = ?", task.id)
    assert (status, attempt) == ("succeeded", 1) and second.calls == 0


async def test_refunds_can_never_push_a_balance_past_the_limit(make_manager):
    """A grant that, with the refunds of the owner's unfinished charged tasks, could pass 10**12
    is refused; taking credits away is always allowed while the balance stays >= 0."""
    tm = await make_manager(provider=FakeProvider(outcomes=["hang"]), credits=True)
    await tm.credits.grant("alice", 10**12)
    task = await tm.submit("charged 8", n=8, owner="alice")
    with pytest.raises(ValidationError, match="unfinished"):
        await tm.credits.grant("alice", 8)
    assert await tm.credits.grant("alice", -1) == 10**12 - 9
    await tm.cancel(task.id)
    assert await tm.credits.balance("alice") == 10**12 - 1


@pytest.mark.parametrize("where", ["new file", "missing folder", "dangling link"])
async def test_an_unusable_database_location_is_a_store_error(tmpfs, tmp_path, where):
    """A database that cannot be created (read-only file system, a folder that cannot be made,
    a link to nowhere) is a StoreError naming the file, never a raw sqlite3 or OS error."""
    if where == "dangling link":
        path = tmp_path / "tasks.db"
        path.symlink_to(tmp_path / "nowhere" / "tasks.db")
    else:
        tmpfs.remount(ro=True)
        path = tmpfs.path / ("tasks.db" if where == "new file" else "sub/tasks.db")
    with pytest.raises(StoreError, match=r"tasks\.db"):
        await TaskManager(path, provider=FakeProvider()).open()


async def test_prune_with_a_read_only_image_folder_still_prunes_the_rows(make_manager, tmpfs, caplog):
    """prune() when image files cannot be deleted (read-only file system) deletes the rows,
    warns which files stay, and raises nothing."""
    images = tmpfs.path / "images"
    tm = await make_manager(images=images)
    done = await tm.wait((await tm.submit("to prune")).id, timeout=10)
    await asyncio.sleep(0.01)
    tmpfs.remount(ro=True)
    report = await tm.prune(0)
    assert report.tasks == 1 and report.files == 0 and await tm.list() == []
    assert done.images[0].path.exists()
    assert any("could not delete" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
async def test_a_killed_holder_not_yet_reaped_is_gone_too(db_path, spawn):
    """A SIGKILLed worker that its parent has not reaped yet (a zombie) runs nothing: its leases
    are taken back at once too."""
    child, (task_id,) = await start_holder(db_path, spawn, ["held by a zombie"])
    child.send_signal(signal.SIGKILL)
    stat = Path(f"/proc/{child.pid}/stat")
    wait_until(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", what="a zombie")
    async with TaskManager(db_path, provider=FakeProvider(), lease=60, poll_interval=0.05) as tm:
        assert (await tm.wait(task_id, timeout=10)).ok


# --- the fault hook itself ------------------------------------------------------------------


async def test_the_watcher_survives_an_unexpected_error_while_looking(db_path):
    """An error that is not the database's own (here a planned call raising RuntimeError in
    the watcher's status read) is logged and the watcher goes on: a waiter still wakes when
    another connection ends its task."""
    faults = Faults()
    async with TaskManager(
        db_path, provider=FakeProvider(), workers=False, poll_interval=0.1, faults=faults
    ) as tm:
        task = await tm.submit("ends elsewhere")

        def boom() -> None:
            raise RuntimeError("a hook that fails")

        faults.call("statuses", boom)
        waiting = asyncio.create_task(tm.wait(task.id, timeout=10))
        await wait_for(lambda: faults.hits["statuses"] >= 1)  # the watcher's first look failed
        sql(db_path, "UPDATE tasks SET status = 'cancelled' WHERE id = ?", task.id)
        done = await waiting
    assert done.status is TaskStatus.CANCELLED and faults.hits["statuses"] >= 2


async def test_a_read_hook_raising_a_database_error_reaches_the_caller_as_a_store_error(make_manager):
    """What a planned call raises after a read reaches the caller as a planned error would: a
    sqlite3 error as a StoreError."""
    faults = Faults()
    tm = await make_manager(workers=False, faults=faults)
    task = await tm.submit("x")

    def disk_error() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    for operation, read in (("list", lambda: tm.list()), ("events", lambda: tm.events(task.id))):
        faults.call(operation, disk_error, after_commit=True)
        with pytest.raises(StoreError, match="disk I/O error"):
            await read()


@pytest.mark.parametrize("door", ["submit", "submit_many"])
async def test_a_submit_whose_answer_is_lost_after_its_commit_keeps_its_reference_copies(
    make_manager, db_path, door
):
    """A submit with reference images whose commit reports an error after it committed (the
    answer lost): the caller gets the StoreError, the row stands, and its reference copies
    stay, so the task can run; a failure before the commit still deletes them."""
    from test_manager import png

    faults = Faults()
    tm = await make_manager(workers=False, faults=faults)

    async def submit(prompt: str) -> None:
        if door == "submit":
            await tm.submit(prompt, images=[png()])
        else:
            await tm.submit_many([{"prompt": prompt, "images": [png()]}, {"prompt": prompt + " too"}])

    faults.fail("submit", sqlite3.OperationalError("disk I/O error"), after_commit=True)
    with pytest.raises(StoreError, match="disk I/O error"):
        await submit("written")
    (written,) = [t for t in await tm.list() if t.prompt == "written"]
    assert [im.path.is_file() for im in written.references] == [True]
    faults.fail("submit", sqlite3.OperationalError("disk I/O error"))
    with pytest.raises(StoreError, match="disk I/O error"):
        await submit("refused")
    assert [t.prompt for t in await tm.list() if t.prompt.startswith("refused")] == []
    stored = {p for p in tm.images_root.rglob("*") if p.is_file()}
    assert stored == {im.path for im in written.references}  # whole paths: every copy is ref-0


async def test_a_write_hook_raising_after_commit_fails_only_its_own_caller(make_manager):
    """A planned call that raises after a shared commit is the outcome of its own operation
    only: a submit committed in the same transaction is answered as written, and a grant whose
    hook raises a 'database is locked' error is not written twice."""
    faults = Faults()
    tm = await make_manager(workers=False, faults=faults)
    queued = await tm.submit("to cancel")

    def boom() -> None:
        raise RuntimeError("after the commit")

    faults.call("cancel", boom, after_commit=True)
    cancel, submit = await asyncio.gather(
        tm.cancel(queued.id), tm.submit("beside it"), return_exceptions=True
    )
    assert isinstance(cancel, RuntimeError) and not isinstance(submit, BaseException)
    assert (await tm.poll(queued.id)).status is TaskStatus.CANCELLED  # it did commit
    assert (await tm.poll(submit.id)).status is TaskStatus.QUEUED

    def locked() -> None:
        raise sqlite3.OperationalError("database is locked")

    faults.call("grant", locked, after_commit=True)
    with pytest.raises(StoreError):
        await tm.credits.grant("bob", 5)
    assert await tm.credits.balance("bob") == 5  # committed once, never re-run


@pytest.mark.parametrize(
    ("plan", "match"),
    [
        (lambda f: f.kill("get"), "cannot be killed"),
        (lambda f: f.kill("sync_folder"), "cannot be killed"),
        (lambda f: f.fail("write_image", OSError(5, "EIO"), after_commit=True), "after_commit"),
        (lambda f: f.call("sync_folder", print, after_commit=True), "after_commit"),
        (lambda f: f.fail("get", "oops"), "error: must be an exception"),
        (lambda f: f.fail("get", None), "error: must be an exception"),
        (lambda f: f.fail("nope", ValueError()), "operation: unknown"),
        (lambda f: f.call("get", 42), "fn: must be callable"),
    ],
)
def test_faults_that_could_never_fire_are_refused_when_planned(plan, match):
    """A plan that could never fire (a kill where there is no commit, after_commit on a file)
    or could only fail oddly (an error that is not an exception) is a ValueError naming the
    argument, and nothing is planned."""
    faults = Faults()
    with pytest.raises(ValueError, match=match):
        plan(faults)
    assert repr(faults) == "Faults(planned={})"


async def test_a_failed_open_leaves_no_connection_thread_behind(tmp_path):
    """When open() raises because SQLite cannot open the file, the connection's thread has
    ended by then: none is left to answer the event loop after it closed ("Event loop is
    closed" in a thread, at some later point of the program)."""
    path = tmp_path / "tasks.db"
    path.symlink_to(tmp_path / "nowhere" / "tasks.db")
    before = set(threading.enumerate())
    with pytest.raises(StoreError, match=r"tasks\.db"):
        await TaskManager(path, provider=FakeProvider()).open()
    left = [t.name for t in set(threading.enumerate()) - before if "connection" in t.name and t.is_alive()]
    assert left == []
