"""The store: schema and migrations, file checks, and the fenced transitions (a contract any
store must pass; a PostgreSQL store would add itself to STORES)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import pytest

from imagetask import (
    InsufficientCredits,
    StoreError,
    TaskManager,
    TaskStatus,
    TooManyPending,
    ValidationError,
)
from imagetask._ids import new_task_id, task_id_ms
from imagetask._models import StoredImage, TaskError, now_ms
from imagetask._store import SCHEMA_VERSION, WOULD_WAIT, Changes, Store, SubmitRow, Submitted, TaskStore
from imagetask.providers import FakeProvider
from imagetask.testing import Faults

from conftest import RETAKEN_THEN_SUCCEEDED, check_ledger, sql, trail


def row(
    owner: str = "alice",
    key: str | None = None,
    prompt: str = "p",
    cost: int = 1,
    *,
    charge: bool = False,
    provider: str = "",
    max_attempts: int = 2,
    references: tuple[StoredImage, ...] = (),
) -> SubmitRow:
    return SubmitRow(
        id=new_task_id(),
        owner=owner,
        prompt=prompt,
        model="fake",
        params={"n": 1},
        max_attempts=max_attempts,
        cost=cost,
        charge=charge,
        idempotency_key=key,
        fingerprint=prompt,
        metadata_json="{}",
        references=references,
        provider=provider,
    )


def image(store: TaskStore, name: str, index: int = 0) -> StoredImage:
    """An image record under the store's image root (the store never opens the file)."""
    return StoredImage(store.images_root / name, "image/png", 2, 1, "ab" * 32, 10, index)


# --- the per-store harness ----------------------------------------------------------------------


class StoreHarness(Protocol):
    """What the contract tests need beyond the contract: a store to test, and the few things
    only the store's own kind can do (make a lease expire, commit from another connection).
    Each store kind provides one; the tests never speak a database's own language."""

    #: The store under test, open.
    store: TaskStore
    #: `try_get` answers on the caller's thread when no lock is held (False: a store without
    #: a synchronous read path, which may always answer `WOULD_WAIT`).
    inline_reads: bool
    #: `changes_since` tells this store's own commits apart (answers `Changes.OWN`, not the
    #: `Changes.OTHERS` the contract allows when unsure).
    exact_own: bool

    async def expire(self, task_id: str) -> None:
        """Make the task's lease expired now (as if its holder had stalled past it)."""
        ...

    async def commit_elsewhere(self) -> None:
        """Commit a harmless write through another connection to the same database."""
        ...

    async def open_another(self) -> TaskStore:
        """Another store instance, open, on the same database (closed with the harness)."""
        ...

    def busy_error(self) -> BaseException:
        """The error the database raises when a read would have to wait for a lock (for a
        `Faults` plan on ``get``)."""
        ...

    async def check_ledger(self) -> None:
        """Assert every balance is the sum of its ledger, with each charge and refund once."""
        ...

    async def close(self) -> None: ...


class SqliteHarness:
    """The harness of the SQLite `Store`: a file under the test's tmp_path."""

    inline_reads = True
    exact_own = True

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "s.db"
        self.images_root = tmp_path / "images"
        self.store: TaskStore = Store(self.path, self.images_root)
        self._others: list[TaskStore] = []

    async def expire(self, task_id: str) -> None:
        sql(self.path, "UPDATE tasks SET lease_until = 0 WHERE id = ?", task_id)

    async def commit_elsewhere(self) -> None:
        other = Store(self.path, self.images_root)
        await other.open()
        try:
            await other.grant("somebody else", 1)
        finally:
            await other.close()

    async def open_another(self) -> TaskStore:
        other = Store(self.path, self.images_root)
        await other.open()
        self._others.append(other)
        return other

    def busy_error(self) -> BaseException:
        return sqlite3.OperationalError("database is locked")

    async def check_ledger(self) -> None:
        check_ledger(self.path)

    async def close(self) -> None:
        for other in self._others:
            await other.close()
        await self.store.close()


async def sqlite_store(tmp_path: Path) -> StoreHarness:
    harness = SqliteHarness(tmp_path)
    await harness.store.open()
    return harness


STORES = [sqlite_store]


@pytest.fixture(params=STORES, ids=lambda f: f.__name__)
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreHarness]:
    """One store of each kind; after the test, its ledger must still balance."""
    h = await request.param(tmp_path)
    yield h
    await h.close()
    await h.check_ledger()


@pytest.fixture
def store(harness: StoreHarness) -> TaskStore:
    return harness.store


ERROR = TaskError("server_error", "x", True)
AttemptEnd = Callable[[TaskStore, str, int, str], Awaitable[object]]  # truthy: it held the task
#: The four fenced ways an attempt ends, by name.
ENDS: dict[str, AttemptEnd] = {
    "succeed": lambda s, task_id, attempt, worker: s.succeed(task_id, attempt, worker, []),
    "retry": lambda s, task_id, attempt, worker: s.retry(task_id, attempt, worker, ERROR, 0),
    "fail": lambda s, task_id, attempt, worker: s.fail(task_id, attempt, worker, ERROR),
    "release": lambda s, task_id, attempt, worker: s.release(task_id, attempt, worker),
}


#: The keys `TaskStore.health` answers (what `TaskManager.health` reads).
HEALTH_KEYS = ("schema_version", "integrity", "wal_bytes", "counts", "expired_leases", "durability")


async def submitted(store: TaskStore, *rows: SubmitRow) -> list[Submitted]:
    """Submit ``rows`` atomically; their `Submitted` records."""
    results = await store.submit(rows, atomic=True)
    assert all(isinstance(r, Submitted) for r in results), results
    return [r for r in results if isinstance(r, Submitted)]


async def running(store: TaskStore, r: SubmitRow, worker: str = "w1", lease: float = 60) -> int:
    """Submit ``r`` and claim it as ``worker``; the attempt."""
    await submitted(store, r)
    (claimed,), _, _ = await store.claim(worker, 1, 100, lease)
    assert claimed.id == r.id
    return claimed.attempt


async def status(store: TaskStore, task_id: str) -> TaskStatus | None:
    task = await store.get(task_id)
    return None if task is None else task.status


class TestStoreContract:
    """The `TaskStore` contract (src/imagetask/_store/contract.py), run against every store
    kind in STORES through its harness: transitions are guarded (only the current claim may
    move a task, and only once), money moves exactly once, reads see one snapshot."""

    # -- submit ------------------------------------------------------------------------------

    async def test_submit_returns_created_tasks_with_the_transaction_time(self, store):
        """submit() answers each row in order with Submitted(created=True, at=ms taken inside the
        one transaction, the same for every row), and `at` is the task's created_at (plain,
        keyed and charged rows alike)."""
        await store.grant("alice", 1)
        rows = [row(), row(key="k"), row(charge=True, cost=1)]
        before = now_ms()
        results = await store.submit(rows, atomic=True)
        after = now_ms()
        assert [(r.id, r.created) for r in results] == [(r.id, True) for r in rows]
        (at,) = {r.at for r in results}
        assert before <= at <= after
        for r in rows:
            task = await store.get(r.id)
            assert task is not None and task.status is TaskStatus.QUEUED and task.attempts == 0
            assert task.created_at == datetime.fromtimestamp(at / 1000, tz=UTC)

    async def test_submit_stores_what_the_row_says(self, store):
        """A submitted task reads back with the row's owner, prompt, model, params, budget,
        cost and key, and its reference images in order."""
        refs = (image(store, "refs/a.png", 0), image(store, "refs/b.png", 1))
        r = row("bob", key="k", prompt="a cat", cost=3, max_attempts=4)._replace(references=refs)
        await submitted(store, r)
        task = await store.get(r.id)
        assert task is not None
        assert (task.owner, task.prompt, task.model, dict(task.params)) == ("bob", "a cat", "fake", {"n": 1})
        assert (task.max_attempts, task.cost, task.idempotency_key) == (4, 3, "k")
        assert task.references == refs and task.images == ()
        # Every read of a task gives the same record: pages and the pending set too.
        assert await store.pending("bob") == [task]
        assert await store.list_tasks("bob", None, 10, None) == [task]
        assert await store.list_tasks(None, "queued", 10, None) == [task]

    @pytest.mark.parametrize("order", ["key_first", "credits_first"])
    async def test_an_atomic_submit_raises_the_first_error_and_writes_nothing(self, store, order):
        """With atomic=True the first failing row's error is raised (in row order) and no row
        of the call is written: no task, and no charge of the rows that would have passed."""
        await store.grant("alice", 5)
        taken = row(key="k", prompt="first")
        await submitted(store, taken)
        ok, paid = row(), row(charge=True, cost=2)
        reused = row(key="k", prompt="another request")  # ValidationError
        short = row("bob", charge=True, cost=1)  # InsufficientCredits: bob has nothing
        bad = [reused, short] if order == "key_first" else [short, reused]
        expected = ValidationError if order == "key_first" else InsufficientCredits
        with pytest.raises(expected):
            await store.submit([ok, paid, *bad], atomic=True)
        for r in (ok, paid, reused, short):
            assert await store.get(r.id) is None
        assert [t.id for t in await store.list_tasks(None, None, 100, None)] == [taken.id]
        assert await store.balance("alice") == 5

    async def test_an_atomic_submit_refused_midway_through_its_bulk_insert_writes_nothing(self, store):
        """An atomic submit of plain rows (inserted several statements at a time) whose 80th row
        the database refuses (an id already taken) raises StoreError, and none of its rows are
        written, not even those of the statements before."""
        taken = row()
        await submitted(store, taken)
        rows = [row() for _ in range(100)]
        rows[79] = rows[79]._replace(id=taken.id)
        with pytest.raises(StoreError):
            await store.submit(rows, atomic=True)
        assert [t.id for t in await store.list_tasks(None, None, 200, None)] == [taken.id]

    async def test_a_non_atomic_submit_returns_each_error_in_its_place(self, store):
        """With atomic=False each failing row's error stands in its place and only that row is
        unwritten; the others are written (and charged)."""
        await store.grant("alice", 5)
        taken = row(key="k", prompt="first")
        await submitted(store, taken)
        good, reused = row(), row(key="k", prompt="other")
        short, paid = row("bob", charge=True), row(charge=True, cost=2)
        results = await store.submit([good, reused, short, paid], atomic=False)
        assert isinstance(results[0], Submitted) and results[0].id == good.id and results[0].created
        assert isinstance(results[1], ValidationError)
        assert isinstance(results[2], InsufficientCredits)
        assert isinstance(results[3], Submitted) and results[3].id == paid.id and results[3].created
        assert await status(store, good.id) is TaskStatus.QUEUED
        assert await status(store, paid.id) is TaskStatus.QUEUED
        assert await store.get(reused.id) is None and await store.get(short.id) is None
        assert await store.balance("alice") == 3

    async def test_idempotency_key_is_unique_per_owner(self, store):
        """A second row with the same owner and key returns the first task's id."""
        a = row(key="k", prompt="same")
        b = row(key="k", prompt="same")
        first, second = await store.submit([a, b], atomic=False)
        assert first.created and not second.created and second.id == a.id

    async def test_a_resubmit_with_the_same_key_returns_the_first_task(self, store):
        """A later submit of the same owner, key and fingerprint answers the first task's id with
        created=False and writes no new task (atomic or not)."""
        first = row(key="k", prompt="same")
        await submitted(store, first)
        for atomic in (True, False):
            again = row(key="k", prompt="same")
            (result,) = await store.submit([again], atomic=atomic)
            assert isinstance(result, Submitted) and result.id == first.id and not result.created
            assert await store.get(again.id) is None
        assert [t.id for t in await store.list_tasks(None, None, 10, None)] == [first.id]

    async def test_the_same_key_for_a_different_request_is_a_validation_error(self, store):
        """The same owner and key with another fingerprint is a ValidationError (raised when
        atomic, in its place otherwise), and the first task is left as it was."""
        first = row(key="k", prompt="one")
        await submitted(store, first)
        with pytest.raises(ValidationError):
            await store.submit([row(key="k", prompt="two")], atomic=True)
        other = row(key="k", prompt="two")
        (result,) = await store.submit([other], atomic=False)
        assert isinstance(result, ValidationError)
        assert await store.get(other.id) is None
        task = await store.get(first.id)
        assert task is not None and task.prompt == "one"

    async def test_the_same_key_for_another_owner_is_another_task(self, store):
        """Idempotency keys are per owner: bob's "k" is not alice's "k"."""
        a, b = row("alice", key="k", prompt="same"), row("bob", key="k", prompt="same")
        first, second = await submitted(store, a, b)
        assert first.created and second.created and (first.id, second.id) == (a.id, b.id)
        tasks = await store.list_tasks(None, None, 10, None)
        assert sorted((t.owner, t.idempotency_key) for t in tasks) == [("alice", "k"), ("bob", "k")]

    async def test_a_charged_submit_with_a_short_balance_is_refused(self, store):
        """charge=True with a balance below the cost is InsufficientCredits: no task, no charge."""
        await store.grant("alice", 2)
        r = row(charge=True, cost=3)
        with pytest.raises(InsufficientCredits):
            await store.submit([r], atomic=True)
        assert await store.get(r.id) is None and await store.balance("alice") == 2
        (result,) = await store.submit([r], atomic=False)
        assert isinstance(result, InsufficientCredits)
        assert await store.get(r.id) is None and await store.balance("alice") == 2

    async def test_a_charged_submit_takes_its_cost_from_the_balance(self, store):
        """charge=True with enough balance takes exactly the cost; charge=False takes nothing."""
        await store.grant("alice", 5)
        await submitted(store, row(charge=True, cost=3))
        assert await store.balance("alice") == 2
        await submitted(store, row(charge=False, cost=2))
        assert await store.balance("alice") == 2
        await submitted(store, row(charge=True, cost=2))
        assert await store.balance("alice") == 0

    # -- claim -------------------------------------------------------------------------------

    async def test_claim_takes_oldest_first_and_counts_the_attempt(self, store):
        """claim() returns runnable tasks oldest first, with attempt 1, and marks them running."""
        a, b = row(), row()
        await store.submit([a, b], atomic=True)
        claimed, _, _ = await store.claim("w1", 1, 4, 60)
        assert [(c.id, c.attempt) for c in claimed] == [(a.id, 1)]
        task = await store.get(a.id)
        assert task is not None and task.status is TaskStatus.RUNNING and task.attempts == 1

    async def test_claim_returns_what_the_attempt_needs(self, store):
        """A Claimed carries the task's owner, prompt, model, params, budget and references,
        with nothing released and no retries yet."""
        refs = (image(store, "refs/r.png"),)
        r = row("bob", prompt="a dog", max_attempts=3)._replace(references=refs)
        await submitted(store, r)
        (c,), ended, _ = await store.claim("w1", 1, 4, 60)
        assert ended == []
        assert (c.id, c.owner, c.prompt, c.model, c.params) == (r.id, "bob", "a dog", "fake", {"n": 1})
        assert (c.attempt, c.max_attempts, c.references, c.released, dict(c.retries)) == (1, 3, refs, 0, {})

    async def test_claim_takes_at_most_limit(self, store):
        """claim() takes no more than ``limit`` tasks, the oldest ones; the rest stay queued."""
        rows = [row() for _ in range(5)]
        await submitted(store, *rows)
        claimed, _, _ = await store.claim("w1", 3, 10, 60)
        assert [c.id for c in claimed] == [r.id for r in rows[:3]]
        assert await store.statuses([r.id for r in rows]) == {
            **{r.id: "running" for r in rows[:3]},
            **{r.id: "queued" for r in rows[3:]},
        }

    async def test_claim_respects_per_owner(self, store):
        """claim() never takes more of one owner's tasks than per_owner allows."""
        await store.submit([row("alice") for _ in range(5)] + [row("bob")], atomic=True)
        claimed, _, _ = await store.claim("w1", 10, 2, 60)
        owners = sorted(c.owner for c in claimed)
        assert owners == ["alice", "alice", "bob"]
        again, _, _ = await store.claim("w2", 10, 2, 60)
        assert again == []

    async def test_claim_finds_other_owners_behind_owners_at_their_cap(self, store):
        """With owners at their cap ("b" and "d") and many of their tasks queued first, a claim
        still takes the tasks of every other owner, whether its name sorts before, between
        or after theirs, oldest first, and nothing more once only capped owners are left."""
        await store.submit([row("b") for _ in range(30)] + [row("d") for _ in range(30)], atomic=True)
        first, _, _ = await store.claim("w1", 4, 2, 60)
        assert sorted(c.owner for c in first) == ["b", "b", "d", "d"]
        others = [row(owner) for owner in ("e", "a", "c", "bb", "d0")]
        await store.submit(others, atomic=True)
        claimed, _, _ = await store.claim("w2", 10, 2, 60)
        assert [c.id for c in claimed] == [r.id for r in others]  # oldest first, every one
        again, _, _ = await store.claim("w3", 10, 2, 60)
        assert again == []

    async def test_claim_with_per_owner_zero_takes_nothing(self, store):
        """per_owner 0 lets no owner run anything: a claim takes no task."""
        await store.submit([row("alice"), row("bob")], atomic=True)
        claimed, _, _ = await store.claim("w1", 10, 0, 60)
        assert claimed == []

    async def test_per_owner_counts_tasks_running_from_earlier_claims(self, store):
        """per_owner counts every running task of the owner, whichever claim (or worker) took
        it, and frees a place when one ends."""
        a1, a2, a3, b = row("alice"), row("alice"), row("alice"), row("bob")
        await submitted(store, a1, a2, a3, b)
        first, _, _ = await store.claim("w1", 1, 2, 60)
        assert [c.id for c in first] == [a1.id]
        second, _, _ = await store.claim("w2", 10, 2, 60)
        assert [c.id for c in second] == [a2.id, b.id]
        assert (await store.claim("w3", 10, 2, 60))[0] == []
        assert await store.succeed(a1.id, 1, "w1", [])
        third, _, _ = await store.claim("w3", 10, 2, 60)
        assert [c.id for c in third] == [a3.id]

    async def test_claim_takes_only_the_workers_provider_or_unnamed_tasks(self, store):
        """A task submitted for provider "fake" is not claimed by a "gemini" worker but is by a
        "fake" one; a task with provider "" is claimable by any provider."""
        fake, anyone = row(provider="fake"), row(provider="")
        await submitted(store, fake, anyone)
        claimed, _, _ = await store.claim("gemini-worker", 10, 10, 60, provider="gemini")
        assert [c.id for c in claimed] == [anyone.id]
        assert await status(store, fake.id) is TaskStatus.QUEUED
        claimed, _, _ = await store.claim("fake-worker", 10, 10, 60, provider="fake")
        assert [c.id for c in claimed] == [fake.id]

    async def test_an_unnamed_provider_claims_only_unnamed_tasks(self, store):
        """A worker of provider "" (the default) claims tasks without a provider, never one
        submitted for a named provider."""
        fake, anyone = row(provider="fake"), row(provider="")
        await submitted(store, fake, anyone)
        claimed, _, _ = await store.claim("w1", 10, 10, 60)
        assert [c.id for c in claimed] == [anyone.id]
        assert await status(store, fake.id) is TaskStatus.QUEUED

    async def test_a_live_lease_is_kept_and_an_expired_one_is_taken_back(self, store):
        """Another worker's claim leaves a task whose lease is live; once the lease (here the
        0.05 s a heartbeat set) has passed, the next claim takes it back as a new attempt."""
        r = row()
        await running(store, r, "w1", lease=60)
        await asyncio.sleep(0.02)
        assert (await store.claim("w2", 1, 4, 60))[0] == []
        assert await store.heartbeat("w1", [(r.id, 1)], 0.05) == {r.id}
        await asyncio.sleep(0.1)
        (second,), ended, _ = await store.claim("w2", 1, 4, 60)
        assert (second.id, second.attempt, ended) == (r.id, 2, [])

    async def test_a_held_attempt_with_an_expired_lease_is_renewed_not_taken_back(self, harness, store):
        """The caller's own ``held`` attempt whose lease expired is renewed by its claim (a full
        lease: another worker's claim right after leaves it), not taken back."""
        r = row()
        await running(store, r, "w1")
        await harness.expire(r.id)
        claimed, ended, _ = await store.claim("w1", 1, 4, 60, held=[(r.id, 1)])
        assert claimed == [] and ended == []
        await asyncio.sleep(0.02)  # well within the renewed lease, past a lease renewed to "now"
        assert (await store.claim("w2", 1, 4, 60))[0] == []
        task = await store.get(r.id)
        assert task is not None and task.status is TaskStatus.RUNNING and task.attempts == 1
        assert await store.heartbeat("w1", [(r.id, 1)], 60) == {r.id}
        assert trail(await store.events(r.id)) == [("claimed", 1)]

    async def test_held_protects_only_the_callers_own_attempts(self, harness, store):
        """``held`` naming another worker's attempt does not keep it: its expired lease is taken
        back and the task claimed anew."""
        r = row()
        await running(store, r, "w1")
        await harness.expire(r.id)
        (second,), _, _ = await store.claim("w2", 1, 4, 60, held=[(r.id, 1)])
        assert (second.id, second.attempt) == (r.id, 2)
        assert await store.heartbeat("w1", [(r.id, 1)], 60) == set()

    async def test_gone_takes_back_a_live_lease_of_a_gone_holder(self, store):
        """With ``gone``, a claim takes back the unexpired lease of a holder it says is gone
        (and claims the task anew); a holder it says is alive keeps its task."""
        r = row()
        await running(store, r, "w1")
        asked: list[str] = []

        def alive(worker: str) -> bool:
            asked.append(worker)
            return False

        assert (await store.claim("w2", 1, 4, 60, gone=alive))[0] == []
        assert "w1" in asked
        (second,), _, _ = await store.claim("w2", 1, 4, 60, gone=lambda worker: worker == "w1")
        assert (second.id, second.attempt) == (r.id, 2)
        assert not await store.succeed(r.id, 1, "w1", [])
        assert trail(await store.events(r.id)) == [("claimed", 1), ("lease_expired", 1), ("claimed", 2)]

    async def test_claim_reports_the_earliest_run_after_still_queued(self, store):
        """claim()'s third value is the earliest run_after still queued: a runnable task left by
        ``limit`` is due now, a retried one at its commit + delay, and an empty queue is None."""
        a, b = row(), row()
        await submitted(store, a, b)
        _, _, next_run = await store.claim("w1", 1, 4, 60)
        assert next_run is not None and next_run <= now_ms()
        (claimed_b,), _, next_run = await store.claim("w1", 1, 4, 60)
        assert claimed_b.id == b.id and next_run is None
        before = now_ms()
        assert await store.retry(a.id, 1, "w1", ERROR, 60)
        assert await store.retry(b.id, 1, "w1", ERROR, 30)
        after = now_ms()
        claimed, _, next_run = await store.claim("w1", 4, 4, 60)
        assert claimed == [] and next_run is not None
        assert before + 30_000 <= next_run <= after + 30_000

    async def test_expired_lease_without_attempts_left_fails_interrupted(self, harness, store):
        """A spent task whose lease expires fails with `interrupted` and is reported as ended."""
        r = row()
        await store.submit([r], atomic=True)
        await store.claim("w1", 1, 4, 60)
        await harness.expire(r.id)
        await store.claim("w1", 1, 4, 60)  # attempt 2 of 2
        await harness.expire(r.id)
        _, ended, _ = await store.claim("w2", 1, 4, 60)
        assert ended == [r.id]
        task = await store.get(r.id)
        assert task is not None and task.status is TaskStatus.FAILED
        assert task.error is not None and task.error.code == "interrupted"

    async def test_a_task_failed_by_its_lease_is_refunded(self, harness, store):
        """A charged task that fails because its last lease expired gets its charge back."""
        await store.grant("alice", 5)
        r = row(charge=True, cost=3, max_attempts=1)
        await running(store, r)
        assert await store.balance("alice") == 2
        await harness.expire(r.id)
        _, ended, _ = await store.claim("w2", 1, 4, 60)
        assert ended == [r.id] and await store.balance("alice") == 5
        await harness.check_ledger()

    # -- heartbeat ---------------------------------------------------------------------------

    async def test_heartbeat_returns_only_the_ids_still_held(self, store):
        """heartbeat() answers the held ids this worker still runs with that attempt: not a
        finished one, not a wrong attempt, nothing for another worker."""
        a, b, c = row(), row(), row()
        await submitted(store, a, b, c)
        await store.claim("w1", 3, 4, 60)
        assert await store.succeed(a.id, 1, "w1", [])
        held = [(a.id, 1), (b.id, 1), (c.id, 2)]
        assert await store.heartbeat("w1", held, 60) == {b.id}
        assert await store.heartbeat("w2", [(b.id, 1), (c.id, 1)], 60) == set()
        assert await store.heartbeat("w1", [(c.id, 1)], 60) == {c.id}

    async def test_a_heartbeat_after_the_lease_was_taken_returns_nothing(self, harness, store):
        """Once an attempt's lease was taken back (and the task re-claimed), that attempt's
        heartbeat holds nothing, while the new attempt's does."""
        r = row()
        await running(store, r, "w1")
        await harness.expire(r.id)
        (second,), _, _ = await store.claim("w2", 1, 4, 60)
        assert await store.heartbeat("w1", [(r.id, 1)], 60) == set()
        assert await store.heartbeat("w2", [(r.id, second.attempt)], 60) == {r.id}

    async def test_a_heartbeat_renews_an_expired_lease_still_held(self, harness, store):
        """A heartbeat that arrives after its lease expired but before anyone took it back
        renews it for a full lease: the next claim leaves the task."""
        r = row()
        await running(store, r, "w1")
        await harness.expire(r.id)
        assert await store.heartbeat("w1", [(r.id, 1)], 60) == {r.id}
        await asyncio.sleep(0.02)  # well within the renewed lease, past a lease renewed to "now"
        claimed, ended, _ = await store.claim("w2", 1, 4, 60)
        assert claimed == [] and ended == []
        assert await status(store, r.id) is TaskStatus.RUNNING

    # -- succeed, retry, fail, release -------------------------------------------------------

    @pytest.mark.parametrize("end", sorted(ENDS))
    async def test_each_end_of_an_attempt_is_fenced(self, store, end):
        """succeed/retry/fail/release with a wrong attempt or a wrong worker answer False and
        change nothing (task and events as they were); the right one answers True, once."""
        r = row()
        await running(store, r, "w1")
        before, events = await store.get(r.id), await store.events(r.id)
        assert not await ENDS[end](store, r.id, 2, "w1")
        assert not await ENDS[end](store, r.id, 0, "w1")
        assert not await ENDS[end](store, r.id, 1, "w2")
        assert await store.get(r.id) == before and await store.events(r.id) == events
        assert await ENDS[end](store, r.id, 1, "w1")
        assert not await ENDS[end](store, r.id, 1, "w1")

    async def test_a_late_worker_cannot_write_after_its_lease_was_taken(self, harness, store):
        """After a lease is taken back and re-claimed, every write of the old attempt is refused."""
        r = row()
        await store.submit([r], atomic=True)
        await store.claim("w1", 1, 4, 60)
        await harness.expire(r.id)
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

    async def test_succeed_stores_the_images(self, store):
        """A succeeded task reads back succeeded, finished, with its images in order."""
        r = row()
        await running(store, r)
        images = [image(store, f"out/{r.id}-0.png", 0), image(store, f"out/{r.id}-1.png", 1)]
        assert await store.succeed(r.id, 1, "w1", images)
        task = await store.get(r.id)
        assert task is not None and task.status is TaskStatus.SUCCEEDED and task.ok
        assert task.images == tuple(images) and task.error is None and task.finished_at is not None
        assert await store.list_tasks(None, None, 10, None) == [task]  # a page carries them too
        assert await store.list_tasks(None, "succeeded", 10, None) == [task]

    async def test_succeed_and_fail_return_the_task_as_committed(self, store):
        """succeed() and fail() return the task their transaction committed, equal field for
        field to a get() right after (references and images included); None when fenced out."""
        refs = (image(store, "refs/r-0.png"),)
        ok, bad = row(references=refs)._replace(metadata_json='{"k": 1}'), row()
        await store.submit([ok, bad], atomic=True)
        await store.claim("w1", 2, 4, 60)
        images = [image(store, f"out/{ok.id}-0.png", 0)]
        done = await store.succeed(ok.id, 1, "w1", images)
        assert done is not None and done == await store.get(ok.id)
        assert done.references == refs and done.images == tuple(images) and done.ok
        failed = await store.fail(bad.id, 1, "w1", ERROR)
        assert failed is not None and failed == await store.get(bad.id) and failed.error == ERROR
        assert await store.succeed(ok.id, 1, "w1", images) is None
        assert await store.fail(bad.id, 1, "w1", ERROR) is None

    async def test_cancel_returns_the_task_as_committed(self, store):
        """cancel() returns the task its transaction cancelled, equal to a get() right after
        (references included); None for a task that had ended, and for an unknown id."""
        refs = (image(store, "refs/c-0.png"),)
        r = row(references=refs)
        await store.submit([r], atomic=True)
        cancelled = await store.cancel(r.id, "not needed")
        assert cancelled is not None and cancelled == await store.get(r.id)
        assert cancelled.status is TaskStatus.CANCELLED and cancelled.references == refs
        assert cancelled.error is not None and cancelled.error.message == "not needed"
        assert await store.cancel(r.id, "again") is None
        assert await store.cancel(new_task_id(), "nobody") is None

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

    async def test_retry_requeues_a_task_runnable_at_once_with_no_delay(self, store):
        """retry(delay=0) puts the task back queued and claimable at once, as the next attempt,
        whose Claimed counts the retry by its error code."""
        r = row()
        await running(store, r)
        assert await store.retry(r.id, 1, "w1", TaskError("rate_limited", "slow down", True), 0)
        assert await status(store, r.id) is TaskStatus.QUEUED
        (second,), _, _ = await store.claim("w2", 1, 4, 60)
        assert (second.id, second.attempt, dict(second.retries)) == (r.id, 2, {"rate_limited": 1})

    async def test_retry_waits_for_run_after(self, store):
        """A retried task is not claimable before its run_after."""
        r = row()
        await store.submit([r], atomic=True)
        await store.claim("w1", 1, 4, 60)
        assert await store.retry(r.id, 1, "w1", TaskError("rate_limited", "x", True), 30)
        claimed, _, next_run = await store.claim("w1", 1, 4, 60)
        assert claimed == [] and next_run is not None and next_run > time.time() * 1000 + 20_000

    async def test_release_hands_back_the_attempt_without_counting_it(self, harness, store):
        """A released task is claimable at once, its Claimed says how many attempts were
        released, Task.attempts leaves them out, and a lost lease afterwards still has the
        released attempt to spend (re-queued, not failed)."""
        r = row(max_attempts=2)
        await running(store, r, "w1")
        assert await store.release(r.id, 1, "w1")
        task = await store.get(r.id)
        assert task is not None and task.status is TaskStatus.QUEUED and task.attempts == 0
        (second,), _, _ = await store.claim("w2", 1, 4, 60)
        assert (second.attempt, second.released) == (2, 1)
        task = await store.get(r.id)
        assert task is not None and task.attempts == 1
        await harness.expire(r.id)
        (third,), ended, _ = await store.claim("w3", 1, 4, 60)
        assert ended == [] and (third.attempt, third.released) == (3, 1)

    async def test_fail_refunds_a_charged_task_exactly_once(self, harness, store):
        """fail() of a charged task gives its cost back; a second fail or a cancel afterwards
        refunds nothing more."""
        await store.grant("alice", 5)
        r = row(charge=True, cost=3)
        await running(store, r)
        assert await store.balance("alice") == 2
        assert await store.fail(r.id, 1, "w1", ERROR)
        task = await store.get(r.id)
        assert task is not None and task.status is TaskStatus.FAILED
        assert task.error == ERROR
        assert await store.balance("alice") == 5
        assert not await store.fail(r.id, 1, "w1", ERROR)
        assert not await store.cancel(r.id, "late")
        assert await store.balance("alice") == 5
        await harness.check_ledger()

    async def test_fail_of_an_uncharged_task_refunds_nothing(self, store):
        """A task submitted with charge=False moved no credits, so its failure gives none."""
        await store.grant("alice", 5)
        r = row(charge=False, cost=3)
        await running(store, r)
        assert await store.fail(r.id, 1, "w1", ERROR)
        assert await store.balance("alice") == 5

    # -- cancel ------------------------------------------------------------------------------

    async def test_cancel_a_queued_task(self, store):
        """cancel() of a queued task answers True, and the task is cancelled and never claimed."""
        r = row()
        await submitted(store, r)
        assert await store.cancel(r.id, "no longer wanted")
        task = await store.get(r.id)
        assert task is not None and task.status is TaskStatus.CANCELLED and task.finished_at is not None
        assert (await store.claim("w1", 1, 4, 60))[0] == []
        assert [e.kind for e in await store.events(r.id)] == ["cancelled"]

    async def test_cancel_a_running_task_fences_its_worker(self, store):
        """cancel() of a running task answers True; its attempt can then neither heartbeat nor
        succeed."""
        r = row()
        await running(store, r)
        assert await store.cancel(r.id, "stop")
        assert await status(store, r.id) is TaskStatus.CANCELLED
        assert await store.heartbeat("w1", [(r.id, 1)], 60) == set()
        assert not await store.succeed(r.id, 1, "w1", [])
        assert await status(store, r.id) is TaskStatus.CANCELLED

    @pytest.mark.parametrize("end", ["succeed", "fail", "cancel"])
    async def test_cancel_of_an_ended_task_is_false(self, store, end):
        """cancel() of a succeeded, failed or cancelled task answers False and changes nothing."""
        r = row()
        await running(store, r)
        if end == "cancel":
            assert await store.cancel(r.id, "first")
        else:
            assert await ENDS[end](store, r.id, 1, "w1")
        before = await store.get(r.id)
        assert not await store.cancel(r.id, "again")
        assert await store.get(r.id) == before

    async def test_cancel_refunds_at_most_once(self, harness, store):
        """A charged task cancelled (queued or running) gets its cost back once: a second cancel
        or the worker's late fail refunds nothing more."""
        await store.grant("alice", 10)
        queued, run = row(charge=True, cost=3), row(charge=True, cost=4)
        await running(store, run)
        await submitted(store, queued)
        assert await store.balance("alice") == 3
        assert await store.cancel(queued.id, "x")
        assert await store.balance("alice") == 6
        assert await store.cancel(run.id, "x")
        assert await store.balance("alice") == 10
        assert not await store.cancel(queued.id, "x") and not await store.cancel(run.id, "x")
        assert not await store.fail(run.id, 1, "w1", ERROR)
        assert await store.balance("alice") == 10
        await harness.check_ledger()

    # -- grant, balance ----------------------------------------------------------------------

    async def test_grant_returns_the_new_balance(self, store):
        """grant() adds (or, negative, takes away) and answers the new balance, which balance()
        reads back; owners are separate."""
        assert await store.grant("alice", 5) == 5
        assert await store.grant("alice", 3) == 8
        assert await store.grant("alice", -2) == 6
        assert await store.balance("alice") == 6
        assert await store.balance("bob") == 0

    async def test_an_unknown_owner_has_a_zero_balance(self, store):
        """balance() of an owner never seen is 0."""
        assert await store.balance("nobody") == 0

    async def test_grant_never_takes_a_balance_below_zero(self, store):
        """A negative grant past the balance is a ValidationError and takes nothing; down to
        exactly 0 is allowed."""
        await store.grant("alice", 5)
        with pytest.raises(ValidationError):
            await store.grant("alice", -6)
        assert await store.balance("alice") == 5
        with pytest.raises(ValidationError):
            await store.grant("bob", -1)
        assert await store.balance("bob") == 0
        assert await store.grant("alice", -5) == 0

    async def test_grant_never_takes_a_balance_past_10_to_the_12(self, store):
        """A balance of exactly 10**12 is allowed; a grant past it is a ValidationError that
        adds nothing."""
        assert await store.grant("alice", 10**12) == 10**12
        with pytest.raises(ValidationError):
            await store.grant("alice", 1)
        assert await store.balance("alice") == 10**12
        with pytest.raises(ValidationError):
            await store.grant("bob", 10**12 + 1)
        assert await store.balance("bob") == 0

    async def test_no_refund_takes_a_balance_past_10_to_the_12(self, store):
        """Credits charged to unfinished tasks may come back: no grant may leave room for a
        refund to pass 10**12 (the grant is refused, or the balance stays within bounds)."""
        await store.grant("alice", 10)
        r = row(charge=True, cost=4)
        await submitted(store, r)
        with contextlib.suppress(ValidationError):
            await store.grant("alice", 10**12 - 6)
        assert await store.cancel(r.id, "refund")
        assert 0 <= await store.balance("alice") <= 10**12

    # -- get, try_get ------------------------------------------------------------------------

    async def test_get_of_an_unknown_id_is_none(self, store):
        """get() and try_get() of an id that does not exist answer None (try_get may say
        WOULD_WAIT)."""
        unknown = new_task_id()
        assert await store.get(unknown) is None
        assert store.try_get(unknown) in (None, WOULD_WAIT)

    async def test_try_get_answers_what_get_answers_or_would_wait(self, harness, store):
        """try_get() answers a Task equal to get()'s, or WOULD_WAIT (a store with inline reads
        answers at once when no lock is held)."""
        r = row()
        await running(store, r)
        found = store.try_get(r.id)
        if harness.inline_reads:
            assert found is not WOULD_WAIT
        assert found is WOULD_WAIT or found == await store.get(r.id)
        assert found is WOULD_WAIT or (found is not None and found.status is TaskStatus.RUNNING)

    async def test_try_get_would_wait_where_get_waits(self, harness, store):
        """When the read would have to wait for a lock, try_get() says WOULD_WAIT, and get()
        (which may wait) answers the task."""
        r = row()
        await submitted(store, r)
        store.faults = Faults()
        store.faults.fail("get", harness.busy_error())
        assert store.try_get(r.id) is WOULD_WAIT
        task = await store.get(r.id)
        assert task is not None and task.id == r.id
        assert store.faults.hits["get"] == 2

    # -- pending, list_tasks, statuses -------------------------------------------------------

    async def test_pending_lists_queued_and_running_newest_first(self, store):
        """pending(None) is every queued or running task, newest first; pending(owner) only
        that owner's; ended tasks never appear."""
        a, b, c, d, e = row("alice"), row("alice"), row("alice"), row("bob"), row("bob")
        await submitted(store, a, b, c, d, e)
        (claimed,), _, _ = await store.claim("w1", 1, 4, 60)
        assert claimed.id == a.id
        assert await store.cancel(b.id, "x")
        assert await store.cancel(e.id, "x")
        assert [t.id for t in await store.pending(None)] == [d.id, c.id, a.id]
        assert [t.id for t in await store.pending("alice")] == [c.id, a.id]
        assert [t.status for t in await store.pending("alice")] == [TaskStatus.QUEUED, TaskStatus.RUNNING]
        assert await store.pending("nobody") == []

    async def test_list_tasks_pages_newest_first_by_before(self, store):
        """list_tasks pages newest first; each page's last id as ``before`` gives the next page,
        disjoint and consecutive, until an empty page."""
        rows = [row() for _ in range(7)]
        await submitted(store, *rows)
        pages, before = [], None
        while page := await store.list_tasks(None, None, 3, before):
            pages.append([t.id for t in page])
            before = page[-1].id
        assert [len(p) for p in pages] == [3, 3, 1]
        assert [i for p in pages for i in p] == [r.id for r in reversed(rows)]

    async def test_list_tasks_filters_by_owner_and_status(self, store):
        """list_tasks(owner, status) gives only tasks of that owner and status, newest first,
        also combined with ``before``."""
        a1, b1, a2, a3, b2 = row("alice"), row("bob"), row("alice"), row("alice"), row("bob")
        await submitted(store, a1, b1, a2, a3, b2)
        await store.claim("w1", 2, 4, 60)  # a1 and b1
        ids = [t.id for t in await store.list_tasks(None, "running", 10, None)]
        assert ids == [b1.id, a1.id]
        assert [t.id for t in await store.list_tasks("alice", None, 10, None)] == [a3.id, a2.id, a1.id]
        assert [t.id for t in await store.list_tasks("alice", "queued", 10, None)] == [a3.id, a2.id]
        assert [t.id for t in await store.list_tasks("alice", "queued", 10, a3.id)] == [a2.id]
        assert [t.id for t in await store.list_tasks(None, "queued", 1, None)] == [b2.id]
        assert await store.list_tasks(None, "succeeded", 10, None) == []

    async def test_statuses_answers_only_existing_ids(self, store):
        """statuses() maps each existing id to its status and leaves unknown ids out, for more
        ids than fit one statement."""
        rows = [row() for _ in range(600)]
        await submitted(store, *rows)
        await store.claim("w1", 1, 4, 60)
        unknown = [new_task_id() for _ in range(600)]
        found = await store.statuses([r.id for r in rows] + unknown)
        assert found == {rows[0].id: "running", **{r.id: "queued" for r in rows[1:]}}
        assert await store.statuses([]) == {}

    # -- changes_since -----------------------------------------------------------------------

    async def test_changes_since_none_is_others(self, store):
        """The first call (token None) always answers OTHERS."""
        _, seen = await store.changes_since(None)
        assert seen is Changes.OTHERS

    async def test_changes_since_with_nothing_committed_is_none(self, store):
        """With nothing committed since the token (reads do not count), the answer is NONE,
        again and again."""
        await submitted(store, r := row())
        token, _ = await store.changes_since(None)
        await store.get(r.id)
        await store.list_tasks(None, None, 10, None)
        for _ in range(2):
            token, seen = await store.changes_since(token)
            assert seen is Changes.NONE

    @pytest.mark.parametrize("write", ["submit", "grant", "cancel", "claim"])
    async def test_changes_since_after_an_own_write(self, harness, store, write):
        """After one of this store's own commits the answer is OWN (OTHERS is allowed when
        unsure; never NONE), and right after that NONE."""
        r = row()
        await submitted(store, r)
        token, _ = await store.changes_since(None)
        if write == "submit":
            await submitted(store, row())
        elif write == "grant":
            await store.grant("alice", 1)
        elif write == "cancel":
            assert await store.cancel(r.id, "x")
        else:
            assert len((await store.claim("w1", 1, 4, 60))[0]) == 1
        token, seen = await store.changes_since(token)
        assert seen is Changes.OWN if harness.exact_own else seen in (Changes.OWN, Changes.OTHERS)
        _, seen = await store.changes_since(token)
        assert seen is Changes.NONE

    async def test_changes_since_after_a_foreign_commit_is_others(self, harness, store):
        """A commit through another connection answers OTHERS, then NONE."""
        token, _ = await store.changes_since(None)
        await harness.commit_elsewhere()
        token, seen = await store.changes_since(token)
        assert seen is Changes.OTHERS
        _, seen = await store.changes_since(token)
        assert seen is Changes.NONE

    async def test_changes_since_sees_another_store_on_the_same_database(self, harness, store):
        """A write by another store instance on the same database answers OTHERS for this one."""
        other = await harness.open_another()
        token, _ = await store.changes_since(None)
        await submitted(other, row())
        _, seen = await store.changes_since(token)
        assert seen is Changes.OTHERS

    @pytest.mark.parametrize("first", ["own", "foreign"])
    async def test_a_foreign_commit_mixed_with_own_ones_is_never_missed(self, harness, store, first):
        """A foreign commit made before or after an own one since the token answers OTHERS."""
        token, _ = await store.changes_since(None)
        for step in [first, "foreign" if first == "own" else "own"]:
            if step == "own":
                await store.grant("alice", 1)
            else:
                await harness.commit_elsewhere()
        _, seen = await store.changes_since(token)
        assert seen is Changes.OTHERS

    async def test_a_foreign_commit_after_an_own_answer_is_never_missed(self, harness, store):
        """After OWN was answered, a foreign commit still answers OTHERS on the next call."""
        token, _ = await store.changes_since(None)
        await store.grant("alice", 1)
        token, seen = await store.changes_since(token)
        assert seen is not Changes.NONE
        await harness.commit_elsewhere()
        _, seen = await store.changes_since(token)
        assert seen is Changes.OTHERS

    # -- events, health ----------------------------------------------------------------------

    async def test_events_are_the_transitions_in_commit_order(self, store):
        """A task claimed, retried, claimed and succeeded has exactly those four events, in
        that order, with their attempts, statuses and workers, at non-decreasing times."""
        r = row()
        await running(store, r, "w1")
        assert await store.retry(r.id, 1, "w1", TaskError("rate_limited", "later", True), 0)
        (second,), _, _ = await store.claim("w2", 1, 4, 60)
        assert await store.succeed(r.id, second.attempt, "w2", [])
        events = await store.events(r.id)
        assert trail(events) == [("claimed", 1), ("retry", 1), ("claimed", 2), ("succeeded", 2)]
        assert [e.status for e in events] == [
            TaskStatus.RUNNING,
            TaskStatus.QUEUED,
            TaskStatus.RUNNING,
            TaskStatus.SUCCEEDED,
        ]
        assert [e.worker for e in events] == ["w1", "w1", "w2", "w2"]
        assert {e.task_id for e in events} == {r.id}
        assert [e.at for e in events] == sorted(e.at for e in events)
        assert "rate_limited" in (events[1].detail or "")
        assert await store.events(new_task_id()) == []

    async def test_health_reports_what_the_contract_names(self, harness, store):
        """health() has the schema version, integrity "ok", the WAL size, counts by status,
        the expired leases, and durability "normal"."""
        a, b, c = row(), row(), row()
        await submitted(store, a, b, c)
        await store.claim("w1", 2, 4, 60)
        assert await store.succeed(a.id, 1, "w1", [])
        await harness.expire(b.id)
        found = await store.health()
        assert set(HEALTH_KEYS) <= set(found)
        assert isinstance(found["schema_version"], int) and found["schema_version"] >= 1
        assert found["integrity"] == "ok" and found["durability"] == "normal"
        assert isinstance(found["wal_bytes"], int) and found["wal_bytes"] >= 0
        counts = {s.value: found["counts"].get(s.value, 0) for s in TaskStatus}
        assert counts == {"queued": 1, "running": 1, "succeeded": 1, "failed": 0, "cancelled": 0}
        assert found["expired_leases"] == 1

    # -- prune, file_state -------------------------------------------------------------------

    async def test_prune_deletes_only_ended_tasks_and_returns_their_image_paths(self, store):
        """prune(before) deletes succeeded, failed and cancelled tasks with their events, never
        queued or running ones, and answers their count and images' relative paths
        (references included)."""
        run, s, f, q, c = row(), row(), row(), row(), row()
        s = s._replace(references=(image(store, "refs/s-0.png"),))
        await submitted(store, run, s, f, q, c)
        await store.claim("w1", 3, 10, 60)  # run, s, f
        assert await store.succeed(
            s.id, 1, "w1", [image(store, "out/s-0.png"), image(store, "out/s-1.png", 1)]
        )
        assert await store.fail(f.id, 1, "w1", ERROR)
        assert await store.cancel(c.id, "x")
        count, paths = await store.prune(now_ms() + 1000)
        assert count == 3
        assert sorted(paths) == ["out/s-0.png", "out/s-1.png", "refs/s-0.png"]
        assert await store.statuses([q.id, run.id, s.id, f.id, c.id]) == {q.id: "queued", run.id: "running"}
        for gone in (s, f, c):
            assert await store.get(gone.id) is None and await store.events(gone.id) == []
        assert trail(await store.events(run.id)) == [("claimed", 1)]

    async def test_prune_keeps_tasks_finished_after_the_cutoff(self, store):
        """prune(before_ms) deletes only tasks that finished before before_ms."""
        old, new = row(), row()
        await submitted(store, old, new)
        assert await store.cancel(old.id, "x")
        old_task = await store.get(old.id)
        assert old_task is not None and old_task.finished_at is not None
        old_ms = round(old_task.finished_at.timestamp() * 1000)
        await asyncio.sleep(0.01)
        assert await store.cancel(new.id, "x")
        assert await store.prune(old_ms - 1) == (0, [])
        assert (await store.prune(old_ms + 1))[0] == 1
        assert await store.get(old.id) is None
        assert await status(store, new.id) is TaskStatus.CANCELLED

    async def test_prune_keeps_the_ledger(self, harness, store):
        """prune deletes finished tasks with their events but never the ledger: every balance
        is unchanged and still the sum of its ledger."""
        await store.grant("alice", 5)
        r = row()
        await store.submit([r], atomic=True)
        assert await store.cancel(r.id, "bye")
        charged, refunded = row(charge=True, cost=2), row(charge=True, cost=1)
        await submitted(store, charged, refunded)
        await store.claim("w1", 2, 4, 60)
        assert await store.succeed(charged.id, 1, "w1", [])
        assert await store.fail(refunded.id, 1, "w1", ERROR)
        assert await store.balance("alice") == 3
        count, _ = await store.prune(now_ms() + 1000)
        assert count == 3 and await store.get(r.id) is None
        assert await store.events(r.id) == []
        assert await store.balance("alice") == 3
        await harness.check_ledger()

    async def test_file_state_maps_ids_to_status_and_attempt(self, store):
        """file_state(ids) answers (status, attempt) for each existing id, none for unknown ids,
        and every path the rows of those ids point to (references and outputs)."""
        s = row()._replace(references=(image(store, "refs/s-0.png"),))
        q = row()
        await submitted(store, s, q)
        await store.claim("w1", 1, 4, 60)
        assert await store.succeed(s.id, 1, "w1", [image(store, "out/s-0.png")])
        known, referenced = await store.file_state([s.id, q.id, new_task_id()])
        assert known == {s.id: ("succeeded", 1), q.id: ("queued", 0)}
        assert referenced == {"refs/s-0.png", "out/s-0.png"}
        assert await store.file_state([]) == ({}, set())

    # -- max_pending, tokens, the event feed ------------------------------------------------

    async def test_max_pending_is_counted_in_the_transaction_batch_included(self, store):
        """A row with max_pending=2 is refused with TooManyPending when its owner has two
        unfinished tasks, rows earlier in the same batch included; finished ones don't count."""
        await submitted(store, row("alice"))
        results = await store.submit(
            [row("alice")._replace(max_pending=2), row("alice")._replace(max_pending=2)], atomic=False
        )
        assert isinstance(results[0], Submitted) and isinstance(results[1], TooManyPending)
        assert results[1].pending == 2 and results[1].limit == 2
        assert len(await store.pending("alice")) == 2

    async def test_tokens_are_stored_by_id_and_revoked_once(self, store):
        """add_token stores (id, owner, digest, label); try_token and token read it back;
        revoke_tokens marks it revoked once (by id, or all of an owner's), never deletes it."""
        created = await store.add_token("aaaaaaaaaaaa", "alice", "d1", "laptop")
        await store.add_token("bbbbbbbbbbbb", "alice", "d2", None)
        found = store.try_token("aaaaaaaaaaaa")
        if found is WOULD_WAIT:
            found = await store.token("aaaaaaaaaaaa")
        assert found == ("aaaaaaaaaaaa", "alice", "d1", "laptop", created, None)
        assert await store.token("cccccccccccc") is None
        assert await store.revoke_tokens("aaaaaaaaaaaa", None) == 1
        assert await store.revoke_tokens("aaaaaaaaaaaa", None) == 0
        assert await store.revoke_tokens(None, "alice") == 1
        rows = await store.tokens("alice")
        assert [r[0] for r in rows] == ["aaaaaaaaaaaa", "bbbbbbbbbbbb"] and all(
            r[5] is not None for r in rows
        )
        assert await store.tokens("bob") == []

    async def test_the_feed_reads_events_in_commit_order_by_seq_and_owner(self, store):
        """events_after answers events above a seq in commit order, each with its seq and its
        task's owner, filtered by owner when named; last_event is the highest seq."""
        assert await store.last_event() == 0
        a, b = row("alice"), row("bob")
        await running(store, a)
        await running(store, b)
        attempt = (await store.get(a.id)).attempts  # type: ignore[union-attr]
        assert await store.succeed(a.id, attempt, "w1", [])
        every = await store.events_after(0, None, 100)
        assert [(e.task_id, e.kind) for e in every] == [
            (a.id, "claimed"),
            (b.id, "claimed"),
            (a.id, "succeeded"),
        ]
        assert [e.seq for e in every] == sorted(e.seq for e in every) and len({e.seq for e in every}) == 3
        assert [e.owner for e in every] == ["alice", "bob", "alice"]
        assert await store.last_event() == every[-1].seq
        mine = await store.events_after(every[0].seq, "alice", 100)
        assert [e.kind for e in mine] == ["succeeded"]
        inline = store.try_events_after(0, None, 2)
        assert inline is WOULD_WAIT or inline == every[:2]

    # -- close -------------------------------------------------------------------------------

    async def test_submits_queued_together_each_answer_their_own_rows(self, harness, store):
        """Submits of many callers queued at once (runs of non-atomic ones, of one or more rows,
        broken by atomic ones) each get exactly their own rows' results, in order, and every
        row is stored."""
        batches = [[row() for _ in range(n)] for n in (2, 1, 3, 1, 2, 4, 1)]
        atomic = [False, False, True, False, False, True, False]
        pending = [
            asyncio.ensure_future(store.submit(rows, atomic=flag))
            for rows, flag in zip(batches, atomic, strict=True)
        ]
        results = await asyncio.gather(*pending)
        for rows, result in zip(batches, results, strict=True):
            assert [r.id for r in result] == [r.id for r in rows]
            assert all(isinstance(r, Submitted) and r.created for r in result)
        every = [r.id for rows in batches for r in rows]
        other = await harness.open_another()
        assert await other.statuses(every) == dict.fromkeys(every, "queued")

    async def test_close_answers_queued_writes_and_is_safe_twice(self, harness, store):
        """Writes queued when close() is called are committed and answered first; a second
        close() is harmless."""
        rows = [row() for _ in range(3)]
        pending = [asyncio.ensure_future(store.submit([r], atomic=True)) for r in rows]
        await asyncio.sleep(0)
        await store.close()
        await store.close()
        results = await asyncio.gather(*pending)
        assert [res[0].id for res in results] == [r.id for r in rows]
        other = await harness.open_another()
        assert await other.statuses([r.id for r in rows]) == {r.id: "queued" for r in rows}

    async def test_a_closed_store_refuses_with_store_error(self, store):
        """After close(), a method raises StoreError rather than anything else."""
        await store.close()
        with pytest.raises(StoreError):
            await store.get(new_task_id())
        with pytest.raises(StoreError):
            await store.submit([row()], atomic=True)


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


def test_task_id_ms_refuses_what_is_not_a_task_id():
    """task_id_ms reads only Crockford's digits (upper case, no I, L, O or U) and at least 10 of
    them: anything else is a ValueError, never a wrong time."""
    task_id = new_task_id()
    for bad in (task_id.lower(), "01JABCDEFI" + task_id[10:], "01JABC EFG", "01JAB", "01JABC+EFG"):
        with pytest.raises(ValueError, match="is not a task id"):
            task_id_ms(bad)


def test_a_page_row_that_did_not_succeed_carries_no_output_images(tmp_path):
    """A read without a snapshot (pending) can see, in its second statement, the outputs of a
    success committed after its first: a row that is not succeeded never takes them."""
    from imagetask._store.rows import TASK_COLUMNS, Rows

    def task_row(status: str) -> tuple[object, ...]:
        values = {"id": new_task_id(), "owner": "o", "prompt": "p", "model": "fake", "params": "{}",
                  "status": status, "attempt": 1, "max_attempts": 2, "cost": 1, "idempotency_key": None,
                  "metadata": "{}", "error_code": None, "error_message": None, "error_retryable": None,
                  "created_at": 1, "started_at": 1, "finished_at": None, "released": 0,
                  "refs": 1}  # fmt: skip
        return tuple(values[c] for c in TASK_COLUMNS)

    conn = sqlite3.connect(":memory:")
    conn.row_factory = sqlite3.Row
    conn.execute("CREATE TABLE i (task_id, role, idx, path, mime, width, height, sha256, size, provenance)")
    running, done = task_row("running"), task_row("succeeded")
    for tid in (running[0], done[0]):
        for role in ("reference", "output"):
            conn.execute(
                "INSERT INTO i VALUES (?, ?, 0, 'x.png', 'image/png', 1, 1, 'ab', 1, '{}')", (tid, role)
            )
    image_rows = conn.execute("SELECT * FROM i").fetchall()
    first, second = Rows(tmp_path).tasks(([running, done], image_rows))
    assert first.images == () and len(first.references) == 1
    assert len(second.images) == 1 and len(second.references) == 1


def test_batches_of_task_ids_sort_with_single_ones():
    """new_task_ids(n) gives n distinct ids that sort in order, before and after single ones."""
    from imagetask._ids import new_task_ids

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


async def test_pages_and_pending_fall_back_to_the_threaded_reader_when_busy(tmp_path):
    """If the loop's read connection reports busy, list() and pending() still answer (through
    the reader's thread), and a pending set bigger than one inline read is returned whole."""
    faults = Faults()
    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False, faults=faults) as tm:
        tasks = await tm.submit_many([{"prompt": f"p{i}"} for i in range(250)])
        for operation in ("list", "pending"):
            faults.fail(operation, sqlite3.OperationalError("database is locked"))
        assert [t.id for t in await tm.list(limit=10)] == [t.id for t in reversed(tasks[-10:])]
        assert len(await tm.pending()) == 250  # refused inline, then read whole on the thread
        assert faults.hits["list"] == 2 and faults.hits["pending"] == 2
        assert len(await tm.pending()) == 250  # more than fit one inline read: read again whole
        assert faults.hits["pending"] == 4


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
        "_CLAIM": {"worker": "w", "lease_until": 0, "now": 0, "provider": "", "full": "[]"},
        "_NEXT_RUN": (),
        "_EXPIRED": (0,),
    }[query]
    conn = sqlite3.connect(tmp_path / "t.db")
    plan = [str(r) for r in conn.execute("EXPLAIN QUERY PLAN " + text, args)]
    conn.close()
    assert any(index in line for line in plan), plan
    assert not any("TEMP B-TREE" in line for line in plan), plan


async def test_the_claim_check_of_other_owners_walks_index_ranges(tmp_path):
    """The check a claim makes when owners are at their cap searches ranges of the active-rows
    index (by owner), never the queue."""
    import imagetask._store.transitions as store_module

    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False):
        pass
    query = store_module._CLAIMABLE.format(range="owner > ? AND owner < ?")
    conn = sqlite3.connect(tmp_path / "t.db")
    plan = [str(r) for r in conn.execute("EXPLAIN QUERY PLAN " + query, ("a", "b", 0, ""))]
    conn.close()
    assert any("SEARCH" in line and "tasks_active" in line for line in plan), plan


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
        # Half of what it reaches with no checkpoint: on a loaded machine the checkpoint
        # thread lags the loop's commits and the WAL peaks past 10 MB before it starts over.
        assert wal.stat().st_size < 16 * 2**20, wal.stat().st_size
        assert len(await tm.list(limit=5)) == 5


@pytest.mark.parametrize("shape", ["loop", "full", "behind_a_big_commit"])
async def test_submits_pending_at_close_are_committed_and_answered(tmp_path, shape):
    """Submits still waiting for their commit when the manager closes are committed first,
    and their callers get their tasks: small ones committed on the loop's thread, every write
    going to the writer's thread (durability="full"), and submits queued behind a commit the
    writer makes in its own caller's coroutine (a submit_many of over 128 rows, held in its
    transaction while the others queue)."""
    import threading

    faults = Faults()
    release = threading.Event()
    durability = "full" if shape == "full" else "normal"
    tm = TaskManager(
        tmp_path / "t.db", provider=FakeProvider(), workers=False, durability=durability, faults=faults
    )
    await tm.open()
    big = None
    if shape == "behind_a_big_commit":
        faults.call("submit", lambda: release.wait(10))
        big = asyncio.ensure_future(tm.submit_many([{"prompt": f"big {i}"} for i in range(200)]))
        while faults.hits["submit"] == 0:  # its transaction is open on the writer's thread
            await asyncio.sleep(0.001)
    pending = [asyncio.ensure_future(tm.submit(f"late {i}")) for i in range(20)]
    # close starts in the same turn as the submits, before any of their writes is committed
    closing = asyncio.ensure_future(tm.aclose())
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.wait_for(closing, 10)
    tasks = await asyncio.wait_for(asyncio.gather(*pending), 10)
    made = len(await big) if big is not None else 0
    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False) as again:
        stored = {t.id for t in await again.list(limit=1000)}
    assert {t.id for t in tasks} <= stored and len(stored) == 20 + made
    assert made == (200 if big is not None else 0)


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


def _bulk_rows(tmp_path: Path, shape: str, count: int) -> list[SubmitRow]:
    """Rows to bulk insert: every field varied (``varied``); one request shape, so only id,
    owner and prompt differ (``uniform``); that shape with, in every chunk of 16, one row
    that differs in one more field (``one_differs``: each field that fills a column in turn);
    or that shape with no params JSON given and params that compare equal but are written
    differently (``derived_params``: ``1`` and ``True``, ``[1]`` and ``[True]``)."""
    reference = StoredImage(tmp_path / "r.png", "image/png", 1, 1, "ab", 1, 0)
    differ = ["model", "params", "max_attempts", "cost", "idempotency_key", "fingerprint",
              "metadata_json", "references", "params_json", "provider"]  # fmt: skip
    rows = []
    for i in range(count):
        if shape == "varied":
            row = SubmitRow(
                id=new_task_id(),
                owner=f"o{i % 3}",
                prompt=f"p {i}",
                model="fake",
                params={"n": 1 + i % 2},
                max_attempts=1 + i % 4,
                cost=i % 5,
                charge=False,
                idempotency_key=f"k{i}" if i % 7 == 0 else None,
                fingerprint=f"f{i}" if i % 7 == 0 else None,
                metadata_json=f'{{"i": {i}}}',
                references=(reference,) * (i % 3),
                params_json='{"n": 2}' if i % 5 == 0 else None,
                provider="fake",
            )
        else:
            row = SubmitRow(
                id=new_task_id(), owner=f"o{i % 3}", prompt=f"p {i}", model="fake", params={"n": 1},
                max_attempts=3, cost=2, charge=False, idempotency_key=None, fingerprint=None,
                metadata_json='{"a": 1}', references=(), params_json='{"n": 1}', provider="fake",
            )  # fmt: skip
            if shape == "derived_params":
                row = row._replace(params_json=None, params={"n": [1, True, [1], [True]][i % 4]})
            if shape == "one_differs" and i % 16 == 5:
                field = differ[(i // 16) % len(differ)]
                changed = {"model": "other", "params": {"n": 2}, "max_attempts": 4, "cost": 7,
                           "idempotency_key": "k", "fingerprint": "f", "metadata_json": '{"a": 2}',
                           "references": (reference,), "params_json": '{"n": 3}',
                           "provider": "p2"}  # fmt: skip
                row = row._replace(**{field: changed[field]})
        rows.append(row)
    return rows


@pytest.mark.parametrize("shape", ["varied", "uniform", "one_differs", "derived_params"])
@pytest.mark.parametrize("variable_limit", [None, 40])
async def test_the_bulk_insert_writes_what_the_one_row_insert_writes(tmp_path, variable_limit, shape):
    """`insert_tasks` (multi-row statements of up to BULK_ROWS rows, fewer when the SQLite build
    binds fewer values a statement) stores every column of every row exactly as the one-row
    INSERT does (reference counts and given params JSON included), in order, for a batch that
    spans several statements: rows of one request shape through the statement that binds
    their shared values once, and chunks where one row differs in any one field through the
    statement that binds each row's own (as do rows whose params JSON is derived: values that
    compare equal, like 1 and True, are written as they are). Values are compared as SQLite
    holds them (``quote``: 1 and 1.0 differ)."""
    from imagetask._store.rows import (
        _INSERT_TASK,
        BULK_ROWS,
        _bulk_insert_sql,
        _task_values,
        bulk_statements,
        insert_tasks,
    )

    async with TaskManager(tmp_path / "a.db", provider=FakeProvider(), workers=False):
        pass
    (tmp_path / "b.db").write_bytes((tmp_path / "a.db").read_bytes())
    rows = _bulk_rows(tmp_path, shape, 2 * BULK_ROWS + 37)
    now = now_ms()
    bulk = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    if variable_limit is not None:
        bulk.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, variable_limit)
    bindable = bulk.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) - 1
    bulk.execute("BEGIN")
    insert_tasks(bulk, rows, now)
    bulk.execute("COMMIT")
    single = sqlite3.connect(tmp_path / "b.db", isolation_level=None)
    for row in rows:
        single.execute(_INSERT_TASK, _task_values(row, now))
    columns = [r[1] for r in bulk.execute("PRAGMA table_info(tasks)")]
    query = f"SELECT {', '.join(f'quote({c})' for c in columns)} FROM tasks ORDER BY rowid"
    written = bulk.execute(query).fetchall()
    expected = single.execute(query).fetchall()
    bulk.close()
    single.close()
    assert len(written) == len(rows) and [r[0] for r in written] == [f"'{row.id}'" for row in rows]
    assert written == expected
    if shape == "derived_params":
        params = [r[columns.index("params")] for r in written]
        assert params == [f"'{json.dumps(row.params, sort_keys=True)}'" for row in rows]
    # A statement binds the shared values once exactly when it has several rows and they
    # agree on every field but id, owner and prompt.
    start, seen = 0, []
    for statement, values in bulk_statements(rows, now, bindable):
        size = statement.count("(") - 1
        chunk = rows[start : start + size]
        start += size
        agree = (
            chunk[0].params_json is not None and size > 1 and all(row[3:] == chunk[0][3:] for row in chunk)
        )
        assert statement == _bulk_insert_sql(size, agree) and len(values) <= bindable + 1
        seen.append(agree)
    assert start == len(rows)
    kinds = {
        "varied": {False},
        "uniform": {True, False},
        "one_differs": {True, False},
        "derived_params": {False},
    }
    assert set(seen) == kinds[shape]  # uniform: the last statement holds one row
