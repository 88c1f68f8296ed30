"""The store: schema and migrations, file checks, and the fenced transitions (a contract any
store must pass; a PostgreSQL store would add itself to STORES)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from imagetask import StoreError, TaskManager, TaskStatus
from imagetask._models import StoredImage, TaskError, new_task_id, task_id_ms
from imagetask._store import SCHEMA_VERSION, Store, SubmitRow
from imagetask.providers import FakeProvider
from imagetask.testing import Faults

from conftest import RETAKEN_THEN_SUCCEEDED, sql, trail


def row(owner: str = "alice", key: str | None = None, prompt: str = "p", cost: int = 1) -> SubmitRow:
    return SubmitRow(
        id=new_task_id(),
        owner=owner,
        prompt=prompt,
        model="fake",
        params={"n": 1},
        max_attempts=2,
        cost=cost,
        charge=False,
        idempotency_key=key,
        fingerprint=prompt,
        metadata_json="{}",
    )


async def sqlite_store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "s.db", tmp_path / "images")
    await store.open()
    return store


STORES = [sqlite_store]


@pytest.fixture(params=STORES, ids=lambda f: f.__name__)
async def store(request, tmp_path) -> AsyncIterator[Store]:
    s = await request.param(tmp_path)
    yield s
    await s.close()


def expire(store: Store, task_id: str) -> None:
    sql(store.path, "UPDATE tasks SET lease_until = 0 WHERE id = ?", task_id)


class TestStoreContract:
    """Transitions are guarded: only the current claim may move a task, and only once."""

    async def test_claim_takes_oldest_first_and_counts_the_attempt(self, store):
        """claim() returns runnable tasks oldest first, with attempt 1, and marks them running."""
        a, b = row(), row()
        await store.submit([a, b], atomic=True)
        claimed, _, _ = await store.claim("w1", 1, 4, 60)
        assert [(c.id, c.attempt) for c in claimed] == [(a.id, 1)]
        task = await store.get(a.id)
        assert task is not None and task.status is TaskStatus.RUNNING and task.attempts == 1

    async def test_claim_respects_per_owner(self, store):
        """claim() never takes more of one owner's tasks than per_owner allows."""
        await store.submit([row("alice") for _ in range(5)] + [row("bob")], atomic=True)
        claimed, _, _ = await store.claim("w1", 10, 2, 60)
        owners = sorted(c.owner for c in claimed)
        assert owners == ["alice", "alice", "bob"]
        again, _, _ = await store.claim("w2", 10, 2, 60)
        assert again == []

    async def test_a_late_worker_cannot_write_after_its_lease_was_taken(self, store):
        """After a lease is taken back and re-claimed, every write of the old attempt is refused."""
        r = row()
        await store.submit([r], atomic=True)
        await store.claim("w1", 1, 4, 60)
        expire(store, r.id)
        (second,), _, _ = await store.claim("w2", 1, 4, 60)
        assert second.attempt == 2
        err = TaskError("server_error", "x", True)
        assert not await store.succeed(r.id, 1, "w1", [])
        assert not await store.fail(r.id, 1, "w1", err)
        assert not await store.retry(r.id, 1, "w1", err, 0)
        assert not await store.release(r.id, 1, "w1")
        assert await store.heartbeat("w1", [(r.id, 1)], 60) == set()
        assert await store.heartbeat("w2", [(r.id, 2)], 60) == {r.id}
        assert await store.succeed(r.id, 2, "w2", [])
        events = trail(await store.events(r.id))
        assert events == RETAKEN_THEN_SUCCEEDED

    async def test_terminal_states_never_change(self, store):
        """Once succeeded, a task cannot be failed, cancelled, retried or re-claimed."""
        r = row()
        await store.submit([r], atomic=True)
        await store.claim("w1", 1, 4, 60)
        assert await store.succeed(r.id, 1, "w1", [])
        assert not await store.cancel(r.id, "late")
        assert not await store.fail(r.id, 1, "w1", TaskError("x", "y"))
        assert (await store.claim("w1", 1, 4, 60))[0] == []
        task = await store.get(r.id)
        assert task is not None and task.status is TaskStatus.SUCCEEDED

    async def test_expired_lease_without_attempts_left_fails_interrupted(self, store):
        """A spent task whose lease expires fails with `interrupted` and is reported as ended."""
        r = row()
        await store.submit([r], atomic=True)
        await store.claim("w1", 1, 4, 60)
        expire(store, r.id)
        await store.claim("w1", 1, 4, 60)  # attempt 2 of 2
        expire(store, r.id)
        _, ended, _ = await store.claim("w2", 1, 4, 60)
        assert ended == [r.id]
        task = await store.get(r.id)
        assert task is not None and task.status is TaskStatus.FAILED
        assert task.error is not None and task.error.code == "interrupted"

    async def test_idempotency_key_is_unique_per_owner(self, store):
        """A second row with the same owner and key returns the first task's id."""
        a = row(key="k", prompt="same")
        b = row(key="k", prompt="same")
        first, second = await store.submit([a, b], atomic=False)
        assert first.created and not second.created and second.id == a.id

    async def test_retry_waits_for_run_after(self, store):
        """A retried task is not claimable before its run_after."""
        r = row()
        await store.submit([r], atomic=True)
        await store.claim("w1", 1, 4, 60)
        assert await store.retry(r.id, 1, "w1", TaskError("rate_limited", "x", True), 30)
        claimed, _, next_run = await store.claim("w1", 1, 4, 60)
        assert claimed == [] and next_run is not None and next_run > time.time() * 1000 + 20_000

    async def test_prune_keeps_the_ledger(self, store):
        """prune deletes finished tasks with their events and images but never ledger rows."""
        await store.grant("alice", 5)
        r = row()
        await store.submit([r], atomic=True)
        assert await store.cancel(r.id, "bye")
        count, _ = await store.prune(int(time.time() * 1000) + 1000)
        assert count == 1 and await store.get(r.id) is None
        assert sql(store.path, "SELECT count(*) FROM task_events") == [(0,)]
        assert sql(store.path, "SELECT kind FROM ledger") == [("grant",)]


# --- the file ---------------------------------------------------------------------------------


async def test_schema_is_versioned_and_pragmas_are_set(tmp_path):
    """A new database records its schema version and runs in WAL mode."""
    store = Store(tmp_path / "s.db", tmp_path / "images")
    await store.open()
    await store.close()
    assert sql(tmp_path / "s.db", "SELECT max(version) FROM schema_migrations") == [(SCHEMA_VERSION,)]
    assert sql(tmp_path / "s.db", "PRAGMA journal_mode") == [("wal",)]


async def test_full_durability_fsyncs_every_commit_on_the_writer_thread(tmp_path):
    """With durability="full" the writer runs synchronous=FULL, no write is committed on the
    loop's thread (every commit is fsynced), and image folders are fsynced after each rename;
    a task still runs end to end."""
    faults = Faults()
    async with TaskManager(
        tmp_path / "t.db", provider=FakeProvider(), durability="full", faults=faults
    ) as tm:
        assert (await tm.health()).durability == "full"  # PRAGMA synchronous on the writer
        done = await tm.wait((await tm.submit("durable")).id, timeout=10)
        assert done.ok and faults.commits["loop"] == 0 and faults.commits["writer"] >= 2
        assert faults.hits["sync_folder"] == len(done.images)
    normal = Faults()
    async with TaskManager(tmp_path / "n.db", provider=FakeProvider(), faults=normal) as tm:
        assert (await tm.health()).durability == "normal"
        assert (await tm.wait((await tm.submit("fast")).id, timeout=10)).ok
    assert normal.hits["sync_folder"] == 0 and normal.commits["loop"] >= 1


async def test_a_newer_database_is_refused(tmp_path):
    """A database whose schema is newer than the code is refused with a clear error, untouched."""
    db = tmp_path / "s.db"
    async with TaskManager(db, provider=FakeProvider(), workers=False):
        pass
    sql(db, "INSERT INTO schema_migrations VALUES (?, 'from the future', 0)", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match="newer than this imagetask"):
        async with TaskManager(db, provider=FakeProvider(), workers=False):
            pass


@pytest.mark.parametrize("content", [b"this is a text file, not a database" * 10, b"\x00" * 4096])
async def test_a_corrupt_file_is_refused_and_left_alone(tmp_path, content):
    """A non-SQLite file is a StoreError naming the file, and its bytes are not touched."""
    db = tmp_path / "tasks.db"
    db.write_bytes(content)
    with pytest.raises(StoreError, match=str(db)):
        async with TaskManager(db, provider=FakeProvider()):
            pass
    assert db.read_bytes() == content


async def test_a_corrupt_sqlite_file_is_a_store_error(tmp_path):
    """An SQLite header over garbage pages is a StoreError, not a crash or a new database."""
    db = tmp_path / "tasks.db"
    async with TaskManager(db, provider=FakeProvider(), workers=False) as tm:
        await tm.submit("x")
    data = bytearray(db.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)
    db.write_bytes(bytes(data))
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    with pytest.raises(StoreError, match=str(db)):
        async with TaskManager(db, provider=FakeProvider(), workers=False) as tm:
            await tm.list()


async def test_a_foreign_sqlite_database_is_refused(tmp_path):
    """An SQLite file with someone else's tables is refused, not migrated."""
    db = tmp_path / "other.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not an imagetask"):
        async with TaskManager(db, provider=FakeProvider(), workers=False):
            pass
    assert sql(db, "SELECT name FROM sqlite_master") == [("customers",)]


async def test_a_folder_as_path_is_refused(tmp_path):
    """Passing a folder as the database path is a StoreError that says so."""
    with pytest.raises(StoreError, match="folder"):
        async with TaskManager(tmp_path, provider=FakeProvider(), workers=False):
            pass


def test_task_ids_sort_by_time_and_carry_it():
    """Task ids are 26 characters, increase within a process, and encode their millisecond."""
    before = int(time.time() * 1000)
    ids = [new_task_id() for _ in range(1000)]
    after = int(time.time() * 1000)
    assert ids == sorted(ids) and len(set(ids)) == 1000
    assert all(len(i) == 26 for i in ids)
    assert before <= task_id_ms(ids[0]) <= after


def test_batches_of_task_ids_sort_with_single_ones():
    """new_task_ids(n) gives n distinct ids that sort in order, before and after single ones."""
    from imagetask._models import new_task_ids

    ids = [new_task_id(), *new_task_ids(500), new_task_id(), *new_task_ids(3), new_task_id()]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) == 506
    assert all(len(i) == 26 for i in ids)
    assert new_task_ids(0) == []


def test_task_ids_follow_the_ulid_layout():
    """An id is the 128-bit number (48 bits of milliseconds, then 80 random bits) in Crockford
    base32, most significant first, the same layout a database written by any version holds."""
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    for _ in range(2000):
        before = int(time.time() * 1000)
        task_id = new_task_id()
        after = int(time.time() * 1000)
        value = 0
        for char in task_id:
            value = value * 32 + alphabet.index(char)
        assert value < 1 << 128 and len(task_id) == 26
        ms = value >> 80
        assert before <= ms <= after and task_id_ms(task_id) == ms
        assert value & ((1 << 80) - 1) != 0  # the random part is there


def test_stored_image_opens_with_pillow(tmp_path):
    """StoredImage.open() gives a PIL image of the file; a notebook shows an inline preview."""
    from PIL import Image

    path = tmp_path / "x.png"
    Image.new("RGB", (3, 2)).save(path)
    im = StoredImage(path, "image/png", 3, 2, "0", path.stat().st_size)
    with im.open() as opened:
        assert opened.size == (3, 2)
    assert "data:image/jpeg;base64," in im._repr_html_()  # a preview in a notebook, not the file


async def test_point_read_falls_back_to_the_threaded_reader_when_busy(tmp_path):
    """If the inline read connection reports busy, get() still answers through the reader thread."""
    faults = Faults()
    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False, faults=faults) as tm:
        task = await tm.submit("x")
        faults.fail("get", sqlite3.OperationalError("database is locked"))  # the inline read only
        assert (await tm.poll(task.id)).id == task.id
        assert faults.hits["get"] == 2  # refused inline, answered by the reader thread


@pytest.mark.parametrize(
    ("shape", "index", "sorts"),
    [
        ("pending(owner)", "tasks_active", False),
        ("pending()", "tasks_status", True),  # sorts the few active rows only
        ("list()", "sqlite_autoindex_tasks_1", False),
        ("list(owner)", "tasks_owner", False),
        ("list(status)", "tasks_status", False),
        ("list(owner, status)", "tasks_owner", False),
        ("list(status, before)", "tasks_status", False),
    ],
)
async def test_the_hot_reads_walk_an_index_never_the_table(tmp_path, shape, index, sorts):
    """pending() and list() in every shape the API offers read through an index in id order
    (finished rows never cost pending; a page stops after `limit` rows), never a table scan."""
    from imagetask._store import list_sql, pending_sql

    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False):
        pass
    text, args = {
        "pending(owner)": pending_sql("alice"),
        "pending()": pending_sql(None),
        "list()": list_sql(None, None, 50, None),
        "list(owner)": list_sql("alice", None, 50, None),
        "list(status)": list_sql(None, "failed", 50, None),
        "list(owner, status)": list_sql("alice", "failed", 50, None),
        "list(status, before)": list_sql(None, "failed", 50, "01M8"),
    }[shape]
    plan = [str(r) for r in sqlite3.connect(tmp_path / "t.db").execute("EXPLAIN QUERY PLAN " + text, args)]
    assert any(f"INDEX {index}" in line for line in plan), plan
    assert not any("SCAN tasks" in line and "INDEX" not in line for line in plan), plan
    assert any("TEMP B-TREE" in line for line in plan) == sorts, plan


async def test_batched_writes_isolate_a_failing_operation(tmp_path):
    """Writes committed together stay independent: one that fails is rolled back alone."""
    import asyncio

    from imagetask import InsufficientCredits

    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False, credits=True) as tm:
        await tm.credits.grant("rich", 10)
        results = await asyncio.gather(
            tm.submit("a", owner="rich"),
            tm.submit("b", owner="poor"),
            tm.submit("c", owner="rich", idempotency_key="k"),
            return_exceptions=True,
        )
        assert isinstance(results[1], InsufficientCredits)
        assert [r.prompt for r in results if not isinstance(r, Exception)] == ["a", "c"]
        assert await tm.credits.balance("rich") == 8
    assert sql(tmp_path / "t.db", "SELECT owner FROM tasks ORDER BY id") == [("rich",), ("rich",)]


@pytest.mark.parametrize(
    ("query", "index"),
    [("_CLAIM", "tasks_queue"), ("_NEXT_RUN", "tasks_queue"), ("_EXPIRED", "tasks_running")],
)
async def test_claim_queries_use_the_partial_indexes(tmp_path, query, index):
    """The claim transaction reads the queue and the leases through their partial indexes,
    never by sorting every queued row."""
    import imagetask._store.transitions as store_module

    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False):
        pass
    text = getattr(store_module, query)
    args = {
        "_CLAIM": {"worker": "w", "lease_until": 0, "now": 0, "per_owner": 4, "provider": ""},
        "_NEXT_RUN": (),
        "_EXPIRED": (0,),
    }[query]
    conn = sqlite3.connect(tmp_path / "t.db")
    plan = [str(r) for r in conn.execute("EXPLAIN QUERY PLAN " + text, args)]
    conn.close()
    assert any(index in line for line in plan), plan
    assert not any("TEMP B-TREE" in line for line in plan), plan


async def test_cancelling_the_committing_caller_strands_no_other_write(tmp_path):
    """A submit cancelled while its own commit is in flight leaves the writes queued behind it to
    commit and answer normally."""
    import asyncio

    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False) as tm:
        first = asyncio.ensure_future(tm.submit("leader"))
        await asyncio.sleep(0)  # the leader is now committing alone
        others = [asyncio.ensure_future(tm.submit(f"queued {i}")) for i in range(5)]
        await asyncio.sleep(0)
        first.cancel()
        done = await asyncio.gather(*others)
        assert [t.prompt for t in done] == [f"queued {i}" for i in range(5)]
        assert first.cancelled() or first.done()
        assert {t.prompt for t in await tm.list()} >= {f"queued {i}" for i in range(5)}


async def test_a_submit_waits_for_a_lock_held_elsewhere_without_blocking_the_loop(tmp_path):
    """While another connection holds the write lock, a submit waits for it on the writer's
    thread (the event loop keeps running), then commits."""
    import asyncio
    import sqlite3

    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False) as tm:
        await tm.submit("warm up")
        blocker = sqlite3.connect(tm.path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        submitting = asyncio.create_task(tm.submit("behind the lock"))
        await asyncio.sleep(0.3)
        assert not submitting.done()
        blocker.execute("COMMIT")
        blocker.close()
        task = await asyncio.wait_for(submitting, 10)
        ticker.cancel()
        assert ticks >= 10  # the loop ran while the submit waited
        assert (await tm.poll(task.id)).prompt == "behind the lock"


async def test_the_wal_stays_bounded_under_many_small_submits(tmp_path):
    """Submits committed on the loop's thread never checkpoint there; the store checkpoints on
    the writer's thread instead, so the WAL file stops growing (it would pass 20 MB here)."""
    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False) as tm:
        for i in range(3000):
            await tm.submit(f"prompt {i}")
        wal = Path(str(tm.path) + "-wal")
        assert wal.stat().st_size < 10 * 2**20, wal.stat().st_size
        assert len(await tm.list(limit=5)) == 5


async def test_submits_pending_at_close_are_committed_and_answered(tmp_path):
    """Submits still waiting for their commit when the manager closes are committed first,
    and their callers get their tasks."""
    import asyncio

    tm = TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False)
    await tm.open()
    pending = [asyncio.ensure_future(tm.submit(f"late {i}")) for i in range(3)]
    await asyncio.sleep(0)  # each has queued its write; none is committed yet
    await tm.aclose()
    tasks = await asyncio.gather(*pending)
    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False) as again:
        stored = {t.id for t in await again.list()}
    assert {t.id for t in tasks} == stored and len(stored) == 3


async def test_concurrent_small_submits_commit_together_in_order(tmp_path):
    """Small submits made in one turn of the event loop share a commit on the loop's thread;
    every caller gets its own task, and the ids follow the call order."""
    import asyncio

    faults = Faults()  # the store's documented counters
    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False, faults=faults) as tm:
        before = faults.commits["loop"]
        tasks = await asyncio.gather(*(tm.submit(f"p{i}") for i in range(10)))
        assert [t.prompt for t in tasks] == [f"p{i}" for i in range(10)]
        assert [t.id for t in tasks] == sorted(t.id for t in tasks)
        assert faults.commits["loop"] == before + 1 and faults.commits["writer"] == 0
        assert len(await tm.list()) == 10


async def test_only_submits_of_up_to_128_rows_commit_on_the_loop_thread(tmp_path):
    """A submit_many of 128 rows commits on the loop's thread; one of 129 goes to the writer's
    thread (the loop is never held for a big batch); both are written whole."""
    faults = Faults()
    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False, faults=faults) as tm:
        before = dict(faults.commits)
        await tm.submit_many([{"prompt": f"a{i}"} for i in range(128)])
        assert faults.commits["loop"] == before.get("loop", 0) + 1
        await tm.submit_many([{"prompt": f"b{i}"} for i in range(129)])
        assert faults.commits["loop"] == before.get("loop", 0) + 1
        assert faults.commits["writer"] == before.get("writer", 0) + 1
        assert len(await tm.list(limit=500)) == 257


async def test_the_wal_stays_bounded_while_workers_run_tasks(tmp_path):
    """Claims and finishes on the writer's thread are checkpointed by the store too (SQLite's
    own checkpoint is only a safety net at 20,000 pages): the WAL stays small."""
    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), concurrency=16, per_owner=16) as tm:
        tasks = await tm.submit_many([{"prompt": f"p{i}", "owner": f"o{i % 8}"} for i in range(1500)])
        async for _ in tm.as_completed([t.id for t in tasks], timeout=120):
            pass
        wal = Path(str(tm.path) + "-wal")
        assert wal.stat().st_size < 8 * 2**20, wal.stat().st_size  # about 19 MB without
