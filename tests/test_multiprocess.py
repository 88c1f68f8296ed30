"""Two worker processes on one database file (guarantees 3, 5, 6 and 8 across processes)."""

from __future__ import annotations

import sqlite3
import time

import pytest

from imagetask import TaskManager
from imagetask.providers import FakeProvider
from imagetask.testing import Faults

from conftest import check_attempts_exclusive, max_overlap, sql

pytestmark = pytest.mark.slow


async def test_two_processes_run_200_tasks_each_exactly_once(db_path, spawn):
    """Two processes submitting and working on one file: every task ends once, no attempt overlaps
    another of the same task, and no 'database is locked' reaches a caller."""
    async with TaskManager(db_path, provider=FakeProvider(), workers=False):
        pass  # create the schema before both children race to
    children = [
        spawn(
            "work",
            str(db_path),
            "--latency",
            "0.005",
            "--concurrency",
            "8",
            "--per-owner",
            "8",
            "--submit",
            "100",
            "--until",
            "200",
            "--lease",
            "5",
        )
        for _ in range(2)
    ]
    for child in children:
        _out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        assert "locked" not in err and "Traceback" not in err
    assert sql(db_path, "SELECT status, count(*) FROM tasks GROUP BY status") == [("succeeded", 200)]
    ends = sql(
        db_path,
        "SELECT count(*) FROM task_events WHERE event IN ('succeeded', 'failed', 'cancelled')"
        " GROUP BY task_id",
    )
    assert ends == [(1,)] * 200
    check_attempts_exclusive(db_path)
    workers = {w for (w,) in sql(db_path, "SELECT DISTINCT worker FROM task_events WHERE event = 'claimed'")}
    assert len(workers) == 2  # both processes did work


async def test_per_owner_limit_holds_across_processes(db_path, spawn):
    """With per_owner=4 and two processes of concurrency 10, one owner never has more than 4 running."""
    async with TaskManager(db_path, provider=FakeProvider(), workers=False) as tm:
        children = [
            spawn(
                "work",
                str(db_path),
                "--latency",
                "0.3",
                "--concurrency",
                "10",
                "--per-owner",
                "4",
                "--until",
                "10",
            )
            for _ in range(2)
        ]
        for child in children:
            assert child.stdout.readline().strip() == "ready"
        ids = [(await tm.submit(f"alice {i}", owner="alice")).id for i in range(10)]
        peak = 0
        while True:
            running = sql(db_path, "SELECT count(*) FROM tasks WHERE owner = 'alice' AND status = 'running'")
            peak = max(peak, running[0][0])
            assert running[0][0] <= 4
            if all(t.done for t in [await tm.poll(i) for i in ids]):
                break
            time.sleep(0.01)
        for child in children:
            child.communicate(timeout=30)
            assert child.returncode == 0
    assert max_overlap(db_path, "alice") == 4
    assert peak >= 3  # the limit was actually approached, so the check could fail


async def test_wait_in_another_process_notices_completion(db_path, spawn):
    """A process that does not run the work sees the task finish within its poll interval."""
    child = spawn("work", str(db_path), "--latency", "0.5")
    assert child.stdout.readline().strip() == "ready"
    poll_interval = 0.2
    async with TaskManager(
        db_path, provider=FakeProvider(), workers=False, poll_interval=poll_interval
    ) as tm:
        task = await tm.submit("elsewhere")
        done = await tm.wait(task.id, timeout=20)
        noticed = time.time()
    assert done.ok and done.finished_at is not None
    assert noticed - done.finished_at.timestamp() < poll_interval + 1.0


async def test_as_completed_in_another_process_yields_every_task(db_path, spawn):
    """as_completed in a process without workers yields each task once, as another process ends it."""
    child = spawn("work", str(db_path), "--latency", "0.2")
    assert child.stdout.readline().strip() == "ready"
    async with TaskManager(db_path, provider=FakeProvider(), workers=False, poll_interval=0.2) as tm:
        ids = [t.id for t in await tm.submit_many([{"prompt": f"elsewhere {i}"} for i in range(6)])]
        seen = [t async for t in tm.as_completed(ids, timeout=30)]
        assert tm.waiting == 0
    assert sorted(t.id for t in seen) == sorted(ids)
    assert all(t.ok for t in seen)


async def test_wait_notices_a_task_that_ended_elsewhere_just_before_watching(db_path):
    """A task that another connection ends after a waiter's own read, but before the watcher
    starts, still wakes the waiter (the watcher's first turn always looks)."""
    faults = Faults()
    async with TaskManager(
        db_path, provider=FakeProvider(), workers=False, poll_interval=0.1, faults=faults
    ) as tm:
        task = await tm.submit("ends elsewhere")

        def end_it() -> None:
            with sqlite3.connect(db_path) as other:  # another connection: a foreign commit
                other.execute("UPDATE tasks SET status = 'cancelled' WHERE id = ?", (task.id,))

        faults.call("get", end_it, after_commit=True)  # right after wait()'s own read
        done = await tm.wait(task.id, timeout=5)
        assert faults.hits["get"] >= 2  # the first read saw it queued; the watcher looked again
    assert done.status == "cancelled"


async def test_the_watcher_skips_this_process_own_commits(make_manager):
    """In the process that runs the tasks, its own commits wake waiters by signal; the watcher
    does not re-read every waited task after each of them (only its first turn looks)."""
    faults = Faults()
    tm = await make_manager(
        provider=FakeProvider(latency=0.05), concurrency=4, poll_interval=0.05, faults=faults
    )
    started = time.monotonic()
    tasks = await tm.submit_many([{"prompt": f"t{i}"} for i in range(20)])
    seen = [t async for t in tm.as_completed([t.id for t in tasks], timeout=30)]
    assert len(seen) == 20
    # One status read is as_completed's own; at most one more is the watcher's first look,
    # and then one per 10 poll intervals (its safety net) on a host slow enough to need them.
    safety_net = int((time.monotonic() - started) / (10 * 0.05))
    assert faults.hits["statuses"] <= 2 + safety_net


async def test_a_foreign_commit_wakes_a_waiter_while_both_own_writers_commit(db_path):
    """A waiter wakes on a commit from another connection even while this process's fast
    (loop-thread) writer and threaded writer both keep committing."""
    import asyncio

    async with TaskManager(db_path, provider=FakeProvider(), workers=False, poll_interval=0.1) as tm:
        target = await tm.submit("ends elsewhere")
        waiting = asyncio.create_task(tm.wait(target.id, timeout=10))
        for i in range(5):
            await tm.submit(f"own fast {i}")  # one row: the loop-thread writer
            await tm.submit_many([{"prompt": f"own threaded {i}-{j}"} for j in range(10)])
            await asyncio.sleep(0.05)
        with sqlite3.connect(db_path) as other:
            other.execute("UPDATE tasks SET status = 'cancelled' WHERE id = ?", (target.id,))
        for i in range(5):
            await tm.submit(f"more own {i}")
            await asyncio.sleep(0.05)
        done = await waiting
    assert done.status == "cancelled"


async def test_the_watcher_still_looks_now_and_then_when_only_this_process_writes(db_path):
    """A task ended by this process's own writer without a signal (which no code path should
    do) still wakes its waiter within about 10 poll intervals: the watcher's safety net."""
    import asyncio

    async with TaskManager(db_path, provider=FakeProvider(), workers=False, poll_interval=0.05) as tm:
        task = await tm.submit("ended quietly")
        # A trigger ends the task inside one of this process's own submits: a commit of our
        # own writer that changes the task without any signal.
        sql(
            db_path,
            "CREATE TRIGGER end_quietly AFTER INSERT ON tasks WHEN NEW.prompt = 'end it' "
            f"BEGIN UPDATE tasks SET status = 'cancelled' WHERE id = '{task.id}'; END",
        )
        waiting = asyncio.create_task(tm.wait(task.id, timeout=10))
        for i in range(3):  # own commits: the watcher has looked once and now skips
            await tm.submit(f"own {i}")
            await asyncio.sleep(0.05)
        await tm.submit("end it")
        for i in range(30):  # keep committing, so the data_version keeps changing
            await tm.submit(f"more own {i}")
            await asyncio.sleep(0.02)
            if waiting.done():
                break
        done = await waiting
    assert done.status == "cancelled"


async def test_the_watcher_backs_off_while_foreign_commits_end_nothing_it_waits_for(db_path):
    """Foreign commits that end none of the waited tasks do not make the watcher re-read the
    statuses at its fastest pace: the pause keeps doubling up to poll_interval (here at most
    about one look per poll_interval, not one per poll_interval / 10)."""
    import asyncio

    faults = Faults()
    async with TaskManager(
        db_path, provider=FakeProvider(), workers=False, poll_interval=0.2, faults=faults
    ) as tm:
        task = await tm.submit("waited")
        other = (await tm.submit("touched elsewhere")).id
        waiting = asyncio.create_task(tm.wait(task.id, timeout=10))
        started = time.monotonic()
        with sqlite3.connect(db_path, isolation_level=None) as conn:
            for i in range(50):  # a foreign commit every 20 ms for a second (longer on a slow host)
                conn.execute("UPDATE tasks SET metadata = ? WHERE id = ?", (f'{{"i": {i}}}', other))
                await asyncio.sleep(0.02)
            looks, took = faults.hits["statuses"], time.monotonic() - started
            conn.execute("UPDATE tasks SET status = 'cancelled' WHERE id = ?", (task.id,))
        done = await waiting
    assert done.status == "cancelled"
    # Four looks while the pause doubles from 0.02 s to 0.2 s, then at most one per 0.2 s: about
    # 10 in the second these commits take here, where the fastest pace would be about 50.
    assert looks <= 5 + took / 0.2, (looks, took)
