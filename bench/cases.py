"""The benchmark cases. Each runs in its own process: ``python bench/cases.py CASE [--quick]``
prints one JSON object (the median over repetitions) on its last line."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import math
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import aiosqlite
from common import (
    INSERT_EVENT,
    INSERT_TASK,
    atimed_loop,
    connect,
    copy_db,
    create_schema,
    finished_db,
    median_of,
    rss_now_mb,
    rss_peak_mb,
    submit_args,
    summarize,
    timed_loop,
)

from imagetask import GenerationRequest, TaskManager
from imagetask._store.reads import _GET_ONE
from imagetask.providers import FakeProvider, ImageRequest, ImageResult
from imagetask.testing import Faults

CASES: dict[str, tuple[str, Callable[[Path, bool], Any]]] = {}


def case(name: str, what: str) -> Callable[[Callable[[Path, bool], Any]], Callable[[Path, bool], Any]]:
    def register(fn: Callable[[Path, bool], Any]) -> Callable[[Path, bool], Any]:
        CASES[name] = (what, fn)
        return fn

    return register


def n_ops(quick: bool, full: int = 3000) -> int:
    return 200 if quick else full


def big_rows(quick: bool) -> int:
    return 10_000 if quick else 1_000_000


class NoopProvider(FakeProvider):
    """Answers at once with a tiny cached PNG: the worker path without drawing."""

    def __init__(self, latency: float = 0.0) -> None:
        super().__init__(latency=latency)
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (1, 1)).save(buf, format="PNG")
        self._png = buf.getvalue()

    async def generate(self, request: ImageRequest) -> ImageResult:
        self.calls += 1
        if self.latency:
            await asyncio.sleep(self.latency)
        return ImageResult(self._png, "image/png", {})


class HangProvider(FakeProvider):
    def __init__(self) -> None:
        super().__init__(outcomes=["hang"] * 1_000_000)


# --- floors: stdlib sqlite3 and bare aiosqlite -----------------------------------------------


@case("stdlib.submit", "BEGIN IMMEDIATE; INSERT task; COMMIT (what imagetask's submit writes)")
def stdlib_submit(tmp: Path, quick: bool) -> dict[str, float]:
    db = tmp / "s.db"
    create_schema(db)
    conn = connect(db)

    def op(i: int) -> None:
        task, _ = submit_args(i)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(INSERT_TASK, task)
        conn.execute("COMMIT")

    return timed_loop(n_ops(quick), op)


@case("stdlib.submit_batch", "BEGIN IMMEDIATE; INSERT 100 tasks (executemany); COMMIT (tasks/s)")
def stdlib_submit_batch(tmp: Path, quick: bool) -> dict[str, float]:
    db = tmp / "s.db"
    create_schema(db)
    conn = connect(db)

    def op(b: int) -> None:
        rows = [submit_args(b * 100 + i)[0] for i in range(100)]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT_TASK, rows)
        conn.execute("COMMIT")

    result = timed_loop(n_ops(quick, 10_000) // 100, op)
    result["ops"] *= 100  # tasks per second
    return result


@case("aiosqlite.submit_per_statement", "the same transaction, one await per statement")
def aiosqlite_submit_per_statement(tmp: Path, quick: bool) -> dict[str, float]:
    db = tmp / "s.db"
    create_schema(db)

    async def run() -> dict[str, float]:
        async with aiosqlite.connect(db, isolation_level=None) as conn:
            await conn.execute("PRAGMA synchronous = NORMAL")

            async def op(i: int) -> None:
                task, _ = submit_args(i)
                await conn.execute("BEGIN IMMEDIATE")
                await conn.execute(INSERT_TASK, task)
                await conn.execute("COMMIT")

            return await atimed_loop(n_ops(quick), op)

    return asyncio.run(run())


@case("aiosqlite.submit_one_hop", "the same transaction as one function on aiosqlite's thread")
def aiosqlite_submit_one_hop(tmp: Path, quick: bool) -> dict[str, float]:
    db = tmp / "s.db"
    create_schema(db)

    def tx(conn: sqlite3.Connection, task: tuple[Any, ...], _event: tuple[Any, ...]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(INSERT_TASK, task)
        conn.execute("COMMIT")

    async def run() -> dict[str, float]:
        async with aiosqlite.connect(db, isolation_level=None) as conn:
            await conn.execute("PRAGMA synchronous = NORMAL")

            async def op(i: int) -> None:
                await conn._execute(tx, conn._conn, *submit_args(i))

            return await atimed_loop(n_ops(quick), op)

    return asyncio.run(run())


def _seeded(tmp: Path, count: int = 1000) -> tuple[Path, list[str]]:
    db = tmp / "s.db"
    create_schema(db)
    conn = connect(db)
    ids = []
    conn.execute("BEGIN")
    for i in range(count):
        task, event = submit_args(i)
        conn.execute(INSERT_TASK, task)
        conn.execute(INSERT_EVENT, event)
        ids.append(task[0])
    conn.execute("COMMIT")
    conn.close()
    return db, ids


@case("stdlib.poll_row", "SELECT * FROM tasks WHERE id = ? (one row, no images)")
def stdlib_poll_row(tmp: Path, quick: bool) -> dict[str, float]:
    db, ids = _seeded(tmp)
    conn = connect(db)
    return timed_loop(n_ops(quick, 20_000), lambda i: conn.execute(
        "SELECT * FROM tasks WHERE id = ?", (ids[i % 1000],)).fetchone())  # fmt: skip


@case("stdlib.poll", "the task and its images: imagetask's one-statement JOIN, fetchall")
def stdlib_poll(tmp: Path, quick: bool) -> dict[str, float]:
    db, ids = _seeded(tmp)
    conn = connect(db)
    return timed_loop(n_ops(quick, 20_000), lambda i: conn.execute(_GET_ONE, (ids[i % 1000],)).fetchall())


@case("aiosqlite.poll", "the same JOIN through aiosqlite (one thread hop)")
def aiosqlite_poll(tmp: Path, quick: bool) -> dict[str, float]:
    db, ids = _seeded(tmp)

    async def run() -> dict[str, float]:
        async with aiosqlite.connect(db, isolation_level=None) as conn:

            async def op(i: int) -> None:
                async with conn.execute(_GET_ONE, (ids[i % 1000],)) as cur:
                    await cur.fetchall()

            return await atimed_loop(n_ops(quick, 5000), op)

    return asyncio.run(run())


_PENDING = "SELECT * FROM tasks WHERE owner = ? AND status IN ('queued', 'running') ORDER BY id DESC"


@case("stdlib.pending", "pending(owner) query: 10 pending among 1,000 finished")
def stdlib_pending(tmp: Path, quick: bool) -> dict[str, float]:
    db = _pending_db(tmp, 1000)
    conn = connect(db)
    return timed_loop(n_ops(quick, 5000), lambda i: conn.execute(_PENDING, ("alice",)).fetchall())


@case("stdlib.list", "list(limit=50): newest 50 tasks")
def stdlib_list(tmp: Path, quick: bool) -> dict[str, float]:
    db, _ = _seeded(tmp)
    conn = connect(db)
    return timed_loop(
        n_ops(quick, 2000), lambda i: conn.execute("SELECT * FROM tasks ORDER BY id DESC LIMIT 50").fetchall()
    )


_CLAIM = """UPDATE tasks SET status = 'running', attempt = attempt + 1, worker = 'w', lease_until = ?,
 started_at = ?, updated_at = ? WHERE status = 'queued' AND id = (SELECT id FROM tasks
 WHERE status = 'queued' AND run_after <= ? ORDER BY run_after, id LIMIT 1) RETURNING id, attempt"""


@case("stdlib.claim_finish", "claim tx (guarded UPDATE + event) then finish tx, per task; no file")
def stdlib_claim_finish(tmp: Path, quick: bool) -> dict[str, float]:
    return _stdlib_claim_finish(tmp, quick, write_file=False)


@case("stdlib.claim_finish_file", "the same plus one fsynced, renamed 1x1 PNG per task")
def stdlib_claim_finish_file(tmp: Path, quick: bool) -> dict[str, float]:
    return _stdlib_claim_finish(tmp, quick, write_file=True)


def _stdlib_claim_finish(tmp: Path, quick: bool, write_file: bool) -> dict[str, float]:
    import os

    db, _ = _seeded(tmp, n_ops(quick, 2000))
    conn = connect(db)
    png = NoopProvider()._png

    def op(i: int) -> None:
        now = int(time.time() * 1000)
        conn.execute("BEGIN IMMEDIATE")
        task_id, attempt = conn.execute(_CLAIM, (now + 60000, now, now, now)).fetchone()
        conn.execute(INSERT_EVENT.replace("'submitted', 'queued'", "'claimed', 'running'"), (task_id, now))
        conn.execute("COMMIT")
        if write_file:
            path = tmp / f"{task_id}.png"
            fd = os.open(str(path) + ".tmp", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, png)
            os.fsync(fd)
            os.close(fd)
            os.replace(str(path) + ".tmp", path)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "UPDATE tasks SET status = 'succeeded', finished_at = ? WHERE id = ? AND attempt = ?"
            " AND status = 'running' RETURNING id",
            (now, task_id, attempt),
        ).fetchone()
        conn.execute(
            INSERT_EVENT.replace("'submitted', 'queued'", "'succeeded', 'succeeded'"), (task_id, now)
        )
        conn.execute("COMMIT")

    return timed_loop(n_ops(quick, 2000), op)


@case("stdlib.cancel", "guarded UPDATE to cancelled + event, per queued task")
def stdlib_cancel(tmp: Path, quick: bool) -> dict[str, float]:
    db, ids = _seeded(tmp, n_ops(quick))
    conn = connect(db)

    def op(i: int) -> None:
        now = int(time.time() * 1000)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "UPDATE tasks SET status = 'cancelled', finished_at = ? WHERE id = ?"
            " AND status IN ('queued', 'running') RETURNING attempt",
            (now, ids[i]),
        ).fetchone()
        conn.execute(INSERT_EVENT.replace("'submitted', 'queued'", "'cancelled', 'cancelled'"), (ids[i], now))
        conn.execute("COMMIT")

    return timed_loop(n_ops(quick), op)


# --- imagetask --------------------------------------------------------------------------------


def _manager(db: Path, **kw: Any) -> TaskManager:
    kw.setdefault("provider", FakeProvider())
    kw.setdefault("workers", False)
    return TaskManager(db, **kw)


@case("imagetask.submit", "await tm.submit(prompt), one after another (credits off)")
def it_submit(tmp: Path, quick: bool) -> dict[str, float]:
    async def run() -> dict[str, float]:
        async with _manager(tmp / "t.db") as tm:
            return await atimed_loop(n_ops(quick), lambda i: tm.submit(f"prompt {i}", owner="alice"))

    return asyncio.run(run())


@case("imagetask.submit_credits", "the same with credits on (balance check + ledger row)")
def it_submit_credits(tmp: Path, quick: bool) -> dict[str, float]:
    async def run() -> dict[str, float]:
        async with _manager(tmp / "t.db", credits=True) as tm:
            await tm.credits.grant("alice", 10_000_000)
            return await atimed_loop(n_ops(quick), lambda i: tm.submit(f"prompt {i}", owner="alice"))

    return asyncio.run(run())


@case("imagetask.submit_concurrent", "100 coroutines submitting at once (group commit)")
def it_submit_concurrent(tmp: Path, quick: bool) -> dict[str, float]:
    async def run() -> dict[str, float]:
        async with _manager(tmp / "t.db") as tm:
            per = n_ops(quick, 6000) // 100
            samples: list[float] = []

            async def worker(w: int) -> None:
                for i in range(per):
                    t = time.perf_counter()
                    await tm.submit(f"prompt {w}-{i}", owner=f"u{w}")
                    samples.append(time.perf_counter() - t)

            start = time.perf_counter()
            await asyncio.gather(*[worker(w) for w in range(100)])
            return {"ops": per * 100 / (time.perf_counter() - start), **summarize(samples)}

    return asyncio.run(run())


@case("imagetask.submit_many", "submit_many of 100 requests (tasks/s)")
def it_submit_many(tmp: Path, quick: bool) -> dict[str, float]:
    async def run() -> dict[str, float]:
        async with _manager(tmp / "t.db") as tm:
            batches = n_ops(quick, 10_000) // 100
            result = await atimed_loop(
                batches,
                lambda b: tm.submit_many(
                    [GenerationRequest(f"p {b}-{i}", owner="alice") for i in range(100)]
                ),
            )
            result["ops"] *= 100  # tasks per second
            return result

    return asyncio.run(run())


async def _seed_manager(tm: TaskManager, count: int = 1000) -> list[str]:
    ids: list[str] = []
    for start in range(0, count, 100):
        tasks = await tm.submit_many([GenerationRequest(f"p{start + i}") for i in range(100)])
        ids.extend(t.id for t in tasks)
    return ids


@case("imagetask.poll", "await tm.poll(id): the task and its images")
def it_poll(tmp: Path, quick: bool) -> dict[str, float]:
    async def run() -> dict[str, float]:
        async with _manager(tmp / "t.db") as tm:
            ids = await _seed_manager(tm)
            return await atimed_loop(n_ops(quick, 20_000), lambda i: tm.poll(ids[i % 1000]))

    return asyncio.run(run())


def _pending_db(tmp: Path, finished: int) -> Path:
    db = copy_db(finished_db(finished), tmp / "p.db")
    conn = connect(db)
    conn.execute("BEGIN")
    for i in range(10):
        task, event = submit_args(i, owner="alice")
        conn.execute(INSERT_TASK, task)
        conn.execute(INSERT_EVENT, event)
    conn.execute("COMMIT")
    conn.close()
    return db


def _it_pending(tmp: Path, quick: bool, finished: int, read: str = "pending") -> dict[str, float]:
    db = _pending_db(tmp, finished)

    async def run() -> dict[str, float]:
        async with _manager(db) as tm:
            op = {
                "pending": lambda i: tm.pending("alice"),
                "pending_all": lambda i: tm.pending(),
                # The finished rows of the cache all succeeded: none has failed.
                "list_failed": lambda i: tm.list(status="failed", limit=50),
            }[read]
            return await atimed_loop(n_ops(quick, 3000), op)

    return asyncio.run(run())


@case("imagetask.pending_all_1k", "pending() of every owner: 10 pending among 1,000 finished rows")
def it_pending_all_small(tmp: Path, quick: bool) -> dict[str, float]:
    return _it_pending(tmp, quick, 1000, "pending_all")


@case("imagetask.pending_all_big", "pending() of every owner among 1,000,000 finished rows (10,000 quick)")
def it_pending_all_big(tmp: Path, quick: bool) -> dict[str, float]:
    return _it_pending(tmp, quick, big_rows(quick), "pending_all")


@case("imagetask.list_failed_1k", "list(status='failed'): none among 1,000 finished rows")
def it_list_failed_small(tmp: Path, quick: bool) -> dict[str, float]:
    return _it_pending(tmp, quick, 1000, "list_failed")


@case("imagetask.list_failed_big", "list(status='failed'): none among 1,000,000 finished rows (10,000 quick)")
def it_list_failed_big(tmp: Path, quick: bool) -> dict[str, float]:
    return _it_pending(tmp, quick, big_rows(quick), "list_failed")


@case("imagetask.pending_1k", "pending('alice'): 10 pending among 1,000 finished rows")
def it_pending_small(tmp: Path, quick: bool) -> dict[str, float]:
    return _it_pending(tmp, quick, 1000)


@case("imagetask.pending_big", "pending('alice'): 10 pending among 1,000,000 finished rows (10,000 quick)")
def it_pending_big(tmp: Path, quick: bool) -> dict[str, float]:
    return _it_pending(tmp, quick, big_rows(quick))


@case("imagetask.list", "await tm.list(limit=50)")
def it_list(tmp: Path, quick: bool) -> dict[str, float]:
    async def run() -> dict[str, float]:
        async with _manager(tmp / "t.db") as tm:
            await _seed_manager(tm)
            return await atimed_loop(n_ops(quick, 2000), lambda i: tm.list(limit=50))

    return asyncio.run(run())


@case("imagetask.claim_finish", "no-op tasks through the real worker (claim, provider, file, finish), C=16")
def it_claim_finish(tmp: Path, quick: bool) -> dict[str, float]:
    count = n_ops(quick, 2000)

    async def run() -> dict[str, float]:
        db = tmp / "t.db"
        async with _manager(db) as tm:
            ids = await _seed_manager(tm, count)
        start = time.perf_counter()
        async with TaskManager(db, provider=NoopProvider(), concurrency=16, per_owner=10_000) as tm:
            async for _ in tm.as_completed(ids):
                pass
        return {"ops": count / (time.perf_counter() - start)}

    return asyncio.run(run())


@case("imagetask.submit_busy", "await tm.submit() one after another while 16 generations run here")
def it_submit_busy(tmp: Path, quick: bool) -> dict[str, float]:
    async def run() -> dict[str, float]:
        provider = FakeProvider(latency=3600)
        async with TaskManager(tmp / "t.db", provider=provider, concurrency=16, per_owner=16) as tm:
            await tm.submit_many([GenerationRequest(f"running {i}", owner=f"u{i}") for i in range(16)])
            while provider.active < 16:
                await asyncio.sleep(0.01)
            return await atimed_loop(n_ops(quick), lambda i: tm.submit(f"prompt {i}", owner="alice"))

    return asyncio.run(run())


@case(
    "imagetask.burst", "1,500 submits started at once: asyncio.gather, a semaphore of 100 (a web app's burst)"
)
def it_burst(tmp: Path, quick: bool) -> dict[str, float]:
    count = 300 if quick else 1500

    async def run() -> dict[str, float]:
        async with _manager(tmp / "t.db") as tm:
            gate = asyncio.Semaphore(100)
            samples: list[float] = []

            async def one(i: int) -> None:
                async with gate:
                    t = time.perf_counter()
                    await tm.submit(f"prompt {i}", owner=f"u{i % 100}")
                    samples.append(time.perf_counter() - t)

            # Full garbage collections during the burst: each costs ~10 ms in this process, so
            # what a submit keeps alive until its commit shows here first.
            full = [0]

            def count_full(phase: str, info: dict[str, Any]) -> None:
                full[0] += phase == "stop" and info["generation"] == 2

            gc.callbacks.append(count_full)
            start = time.perf_counter()
            try:
                await asyncio.gather(*(one(i) for i in range(count)))
                elapsed = time.perf_counter() - start
            finally:
                gc.callbacks.remove(count_full)
            return {"ops": count / elapsed, **summarize(samples), "full_gcs": full[0]}

    return asyncio.run(run())


def _write_atomically(folder: Path, name: str, data: bytes) -> None:
    """What a careful hand-written loop does with an image: validate it, write a temporary file,
    fsync, rename into place."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / name)


@case(
    "asyncio.drain",
    "floor: 2,000 FakeProvider(latency=0) images, semaphore 16, validated + fsynced + renamed",
)
def asyncio_drain(tmp: Path, quick: bool) -> dict[str, float]:
    count = 200 if quick else 2000

    async def run() -> dict[str, float]:
        provider = FakeProvider()
        gate = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            async with gate:
                result = await provider.generate(ImageRequest(model="fake", prompt=f"p{i}"))
                await asyncio.to_thread(
                    _write_atomically, tmp / "images" / f"{i % 256}", f"{i}.png", result.data
                )

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        return {"ops": count / (time.perf_counter() - start)}

    return asyncio.run(run())


@case(
    "imagetask.drain",
    "2,000 queued tasks drained by FakeProvider(latency=0) workers, concurrency 16 (tasks/s)",
)
def it_drain(tmp: Path, quick: bool) -> dict[str, float]:
    count = 200 if quick else 2000

    async def run() -> dict[str, float]:
        db = tmp / "t.db"
        async with _manager(db) as tm:
            ids = [t.id for t in await tm.submit_many([GenerationRequest(f"p{i}") for i in range(count)])]
        start = time.perf_counter()
        async with TaskManager(db, provider=FakeProvider(), concurrency=16, per_owner=16) as tm:
            async for _ in tm.as_completed(ids):
                pass
        return {"ops": count / (time.perf_counter() - start)}

    return asyncio.run(run())


@case(
    "asyncio.generate_write",
    "floor of submit-to-wait: one FakeProvider(latency=0) generation, then its file written as above",
)
def asyncio_generate_write(tmp: Path, quick: bool) -> dict[str, float]:
    async def run() -> dict[str, float]:
        provider = FakeProvider()

        async def one(i: int) -> None:
            result = await provider.generate(ImageRequest(model="fake", prompt=f"p{i}"))
            await asyncio.to_thread(_write_atomically, tmp / "images", f"{i}.png", result.data)

        return await atimed_loop(n_ops(quick, 500), one)

    return asyncio.run(run())


@case(
    "imagetask.submit_to_wait",
    "await tm.wait((await tm.submit()).id) with FakeProvider(latency=0) in the same process",
)
def it_submit_to_wait(tmp: Path, quick: bool) -> dict[str, float]:
    async def run() -> dict[str, float]:
        async with TaskManager(tmp / "t.db", provider=FakeProvider()) as tm:

            async def one(i: int) -> None:
                await tm.wait((await tm.submit(f"p{i}")).id)

            return await atimed_loop(n_ops(quick, 500), one)

    return asyncio.run(run())


@case(
    "memory.drain_100k",
    "RSS (MiB) of one process draining 100,000 tasks (5,000 quick): after 10%, 50%, 100%",
)
def memory_drain(tmp: Path, quick: bool) -> dict[str, float]:
    count = 5_000 if quick else 100_000
    chunk = count // 10

    async def run() -> dict[str, float]:
        rss: list[float] = []
        async with TaskManager(tmp / "t.db", provider=NoopProvider(), concurrency=16, per_owner=16) as tm:
            for start in range(0, count, chunk):
                tasks = await tm.submit_many([GenerationRequest(f"p{start + i}") for i in range(chunk)])
                async for _ in tm.as_completed([t.id for t in tasks]):
                    pass
                rss.append(rss_now_mb())
        half = rss[len(rss) // 2 - 1]
        return {
            "rss_first_tenth_mb": rss[0], "rss_half_mb": half, "rss_end_mb": rss[-1],
            "growth": rss[-1] / rss[0], "growth_second_half": rss[-1] / half,
        }  # fmt: skip

    return asyncio.run(run())


@case("imagetask.cancel", "await tm.cancel(id) of a queued task")
def it_cancel(tmp: Path, quick: bool) -> dict[str, float]:
    async def run() -> dict[str, float]:
        async with _manager(tmp / "t.db") as tm:
            ids = await _seed_manager(tm, n_ops(quick))
            return await atimed_loop(len(ids), lambda i: tm.cancel(ids[i]))

    return asyncio.run(run())


# --- peers ------------------------------------------------------------------------------------


def _huey(tmp: Path) -> Any:
    from huey import SqliteHuey
    from huey.storage import SqliteStorage

    class NormalSqliteStorage(SqliteStorage):  # type: ignore[misc]
        """WAL + synchronous=NORMAL: the same durability as imagetask's default."""

        def _create_connection(self) -> sqlite3.Connection:
            conn = super()._create_connection()
            conn.execute("PRAGMA synchronous = NORMAL")
            return conn

    class Huey(SqliteHuey):  # type: ignore[misc]
        storage_class = NormalSqliteStorage

    return Huey("bench", filename=str(tmp / "huey.db"), immediate=False)


@case("huey.enqueue", "SqliteHuey (WAL, synchronous=NORMAL): enqueue a task")
def huey_enqueue(tmp: Path, quick: bool) -> dict[str, float]:
    huey = _huey(tmp)

    @huey.task()
    def noop(i: int) -> int:
        return i

    return timed_loop(n_ops(quick), lambda i: noop(i))


@case("huey.dequeue_execute", "SqliteHuey: dequeue and execute a no-op task (stores its result)")
def huey_dequeue_execute(tmp: Path, quick: bool) -> dict[str, float]:
    huey = _huey(tmp)

    @huey.task()
    def noop(i: int) -> int:
        return i

    for i in range(n_ops(quick)):
        noop(i)
    return timed_loop(n_ops(quick), lambda i: huey.execute(huey.dequeue()))


@case("huey.result", "SqliteHuey: look up a stored result (preserve=True)")
def huey_result(tmp: Path, quick: bool) -> dict[str, float]:
    huey = _huey(tmp)

    @huey.task()
    def noop(i: int) -> int:
        return i

    handles = [noop(i) for i in range(1000)]
    for _ in range(1000):
        huey.execute(huey.dequeue())
    return timed_loop(n_ops(quick, 5000), lambda i: handles[i % 1000].get(preserve=True))


@case("persistqueue.put", "SQLiteAckQueue (WAL, synchronous=FULL, its default): put")
def pq_put(tmp: Path, quick: bool) -> dict[str, float]:
    from persistqueue import SQLiteAckQueue

    q = SQLiteAckQueue(str(tmp / "pq"), multithreading=True)
    return timed_loop(n_ops(quick), lambda i: q.put({"prompt": f"p{i}"}))


@case("persistqueue.get_ack", "SQLiteAckQueue: get then ack")
def pq_get_ack(tmp: Path, quick: bool) -> dict[str, float]:
    from persistqueue import SQLiteAckQueue

    q = SQLiteAckQueue(str(tmp / "pq"), multithreading=True)
    for i in range(n_ops(quick)):
        q.put({"prompt": f"p{i}"})
    return timed_loop(n_ops(quick), lambda i: q.ack(q.get(block=False)))


# --- end to end ---------------------------------------------------------------------------------


@case("e2e.makespan", "N tasks at latency L with concurrency C: makespan / (ceil(N/C) x L)")
def e2e_makespan(tmp: Path, quick: bool) -> dict[str, float]:
    n, c, latency = (160, 16, 0.05) if quick else (1000, 16, 0.1)

    async def run() -> dict[str, float]:
        db = tmp / "t.db"
        async with TaskManager(db, provider=FakeProvider(latency=latency), concurrency=c, per_owner=c) as tm:
            start = time.perf_counter()
            tasks = await tm.submit_many([GenerationRequest(f"p{i}", owner=f"u{i % 50}") for i in range(n)])
            async for _ in tm.as_completed([t.id for t in tasks]):
                pass
            makespan = time.perf_counter() - start
        ideal = math.ceil(n / c) * latency
        return {"makespan_s": makespan, "ideal_s": ideal, "ratio": makespan / ideal}

    return asyncio.run(run())


def _commit_clock(sink: Callable[[float], None]) -> Faults:
    """The store's test hook, set to call ``sink(perf_counter)`` on the writer's thread right
    after each success commits (one task at a time here, so the n-th call is the n-th task)."""
    faults = Faults()
    faults.call("succeed", lambda: sink(time.perf_counter()), times=10**9, after_commit=True)
    return faults


@case("wake.same_process", "commit of a success -> wait() returns, same process")
def wake_same_process(tmp: Path, quick: bool) -> dict[str, float]:
    commits: list[float] = []
    faults = _commit_clock(commits.append)

    async def run() -> dict[str, float]:
        samples = []
        async with TaskManager(tmp / "t.db", provider=NoopProvider(latency=0.005), faults=faults) as tm:
            for i in range(50 if quick else 300):
                task = await tm.submit(f"p{i}")
                await tm.wait(task.id)
                returned = time.perf_counter()
                while len(commits) <= i:  # the recording thread may not have run yet
                    await asyncio.sleep(0)
                samples.append(returned - commits[i])
        return summarize(samples)

    return asyncio.run(run())


_CHILD = """
import asyncio, sys, time
sys.path.insert(0, {bench!r})
from cases import NoopProvider, _commit_clock
from imagetask import TaskManager
faults = _commit_clock(lambda t: print(t, flush=True))
async def main():
    async with TaskManager({db!r}, provider=NoopProvider(latency=0.005), faults=faults):
        print("ready", flush=True)
        await asyncio.sleep(3600)
asyncio.run(main())
"""


@case("wake.other_process", "commit in a worker process -> wait() returns in another (poll_interval 0.5 s)")
def wake_other_process(tmp: Path, quick: bool) -> dict[str, float]:
    db = tmp / "t.db"
    code = _CHILD.format(bench=str(Path(__file__).parent), db=str(db))
    asyncio.run(_touch(db))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    commits: list[float] = []
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            commits.append(float(line))

    threading.Thread(target=read, daemon=True).start()

    async def run() -> dict[str, float]:
        samples = []
        async with _manager(db) as tm:
            for i in range(5 if quick else 40):
                task = await tm.submit(f"p{i}")
                await tm.wait(task.id, timeout=30)
                returned = time.perf_counter()
                while len(commits) <= i:
                    await asyncio.sleep(0.001)
                samples.append(returned - commits[i])
        return summarize(samples)

    try:
        return asyncio.run(run())
    finally:
        child.kill()
        child.wait()


async def _touch(db: Path) -> None:
    async with _manager(db):
        pass


@case("memory.queued_100k", "peak RSS (MiB) of a worker process with 100,000 queued tasks (10,000 quick)")
def memory_queued(tmp: Path, quick: bool) -> dict[str, float]:
    count = 10_000 if quick else 100_000

    async def run() -> dict[str, float]:
        async with TaskManager(tmp / "t.db", provider=HangProvider(), concurrency=4) as tm:
            await asyncio.sleep(0.2)
            before = rss_now_mb()
            for start in range(0, count, 1000):
                await tm.submit_many(
                    [GenerationRequest(f"p{start + i}", owner=f"u{i % 100}") for i in range(1000)]
                )
            await asyncio.sleep(1.0)  # the dispatcher works over the full queue
            await tm.pending("u1")
            return {"rss_before_mb": before, "rss_after_mb": rss_now_mb(), "rss_peak_mb": rss_peak_mb()}

    return asyncio.run(run())


def _memory_with_finished(tmp: Path, quick: bool, finished: int) -> dict[str, float]:
    db = copy_db(finished_db(finished), tmp / "m.db")

    async def run() -> dict[str, float]:
        async with TaskManager(db, provider=NoopProvider(), concurrency=8) as tm:
            tasks = await tm.submit_many([GenerationRequest(f"p{i}") for i in range(200)])
            async for _ in tm.as_completed([t.id for t in tasks]):
                pass
            for _ in range(20):
                await tm.list(limit=50)
                await tm.pending("user1")
            await tm.prune(older_than=10**9)  # sweeps, touches every row's index but deletes none
        return {"rss_peak_mb": rss_peak_mb()}

    return asyncio.run(run())


@case("memory.finished_1k", "peak RSS (MiB): run 200 tasks beside 1,000 finished rows")
def memory_finished_small(tmp: Path, quick: bool) -> dict[str, float]:
    return _memory_with_finished(tmp, quick, 1000)


@case("memory.finished_big", "peak RSS (MiB): the same beside 1,000,000 finished rows (10,000 quick)")
def memory_finished_big(tmp: Path, quick: bool) -> dict[str, float]:
    return _memory_with_finished(tmp, quick, big_rows(quick))


@case("startup.recover", "open a database of 1,000,000 finished tasks + 1,000 expired leases, take them back")
def startup_recover(tmp: Path, quick: bool) -> dict[str, float]:
    db = copy_db(finished_db(big_rows(quick)), tmp / "s.db")
    conn = connect(db)
    conn.execute("BEGIN")
    for i in range(1000):
        task, _ = submit_args(i, owner=f"u{i}")
        conn.execute(INSERT_TASK, task)
        conn.execute(
            "UPDATE tasks SET status = 'running', attempt = 1, worker = 'dead', lease_until = 1 WHERE id = ?",
            (task[0],),
        )
    conn.execute("COMMIT")
    conn.close()

    async def run() -> dict[str, float]:
        start = time.perf_counter()
        tm = TaskManager(db, provider=HangProvider(), concurrency=4)
        await tm.open()
        opened = time.perf_counter() - start
        probe = sqlite3.connect(db)
        while (
            probe.execute("SELECT count(*) FROM task_events WHERE event = 'lease_expired'").fetchone()[0]
            < 1000
        ):
            await asyncio.sleep(0.002)
        recovered = time.perf_counter() - start
        probe.close()
        await tm.aclose()
        return {"open_s": opened, "recovered_s": recovered}

    return asyncio.run(run())


def _process_rate(cmd: list[str], runs: int) -> dict[str, float]:
    """Start ``cmd`` ``runs`` times in a row; processes per second and the p50 wall time.

    Byte-code caching is on, as on a user's machine (these machines set
    PYTHONDONTWRITEBYTECODE, which would recompile every module of every run), and one
    untimed run writes the caches first."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        samples.append(time.perf_counter() - start)
    return {"ops": len(samples) / sum(samples), **summarize(samples)}


@case("startup.python_sqlite", 'python -c "import sqlite3": the floor of any Python command')
def startup_python_sqlite(tmp: Path, quick: bool) -> dict[str, float]:
    return _process_rate([sys.executable, "-c", "import sqlite3"], 3 if quick else 15)


@case("startup.cli_ls", "imagetask ls on a database of 1,000 finished tasks (a whole command)")
def startup_cli_ls(tmp: Path, quick: bool) -> dict[str, float]:
    home = tmp / "home"
    home.mkdir()
    copy_db(finished_db(1000), home / "tasks.db")
    cmd = [sys.executable, "-m", "imagetask", "--home", str(home), "ls", "--limit", "20"]
    return _process_rate(cmd, 3 if quick else 15)


import web_cases  # noqa: E402  (bench/ is not a package: its folder is on the path)

web_cases.register(case, n_ops)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    _, fn = CASES[args.case]
    runs = []
    for _ in range(args.reps):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(fn(Path(tmp), args.quick))
    print(json.dumps(median_of(runs)))


if __name__ == "__main__":
    main()
