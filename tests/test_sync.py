"""SyncTaskManager: the same scenarios through both managers, then what only the blocking door does."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from imagetask import (
    ConfigError,
    InsufficientCredits,
    RemoteTaskManager,
    SyncRemoteTaskManager,
    SyncTaskManager,
    TaskManager,
    TaskNotFound,
    TaskStatus,
    ValidationError,
    WaitTimeout,
)
from imagetask.providers import FakeProvider
from imagetask.web import create_app

from conftest import sql, uvicorn_serving, wait_until

# -- one suite, both managers -----------------------------------------------------------------


class Blocking:
    """The async face of a SyncTaskManager for the shared scenarios: every call runs the
    blocking method in a worker thread, as a script's thread would call it."""

    def __init__(self, tm: SyncTaskManager) -> None:
        self.tm = tm
        self.credits = _Wrapped(tm.credits)

    def __getattr__(self, name: str) -> Any:
        return getattr(_Wrapped(self.tm), name)

    async def as_completed(self, ids: list[str], timeout: float | None = None) -> AsyncIterator[Any]:
        iterator = self.tm.as_completed(ids, timeout)
        done = object()
        while (task := await asyncio.to_thread(next, iterator, done)) is not done:
            yield task


class _Wrapped:
    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._target, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        return call


class Remote:
    """The scenarios' manager over HTTP: a real uvicorn server on 127.0.0.1 in front of a
    TaskManager, and one RemoteTaskManager (or SyncRemoteTaskManager) per owner, each with
    that owner's token. Calls go to the client of the owner they name, or of the task they
    name; granting credits and pruning, which HTTP does not offer, go to the server's
    manager (the operator's side)."""

    def __init__(self, server_tm: TaskManager, base: str, sync: bool) -> None:
        self.server_tm, self.base, self.sync = server_tm, base, sync
        self.clients: dict[str, Any] = {}
        self.owners: dict[str, str] = {}
        self.credits = _RemoteCredits(self)

    async def client(self, owner: str = "default") -> Any:
        if owner not in self.clients:
            token = await self.server_tm.tokens.create(owner)
            if self.sync:
                made = await asyncio.to_thread(
                    SyncRemoteTaskManager, self.base, token=token, poll_interval=0.2
                )
                self.clients[owner] = Blocking(made)
            else:
                self.clients[owner] = await RemoteTaskManager(
                    self.base, token=token, poll_interval=0.2
                ).open()
        return self.clients[owner]

    async def close(self) -> None:
        for c in self.clients.values():
            await (asyncio.to_thread(c.tm.close) if self.sync else c.aclose())

    async def submit(self, prompt: str, **kw: Any) -> Any:
        task = await (await self.client(kw.get("owner", "default"))).submit(prompt, **kw)
        self.owners[task.id] = task.owner
        return task

    async def submit_many(self, requests: list[Any]) -> Any:
        tasks = await (await self.client()).submit_many(requests)
        self.owners.update({t.id: t.owner for t in tasks})
        return tasks

    async def pending(self, owner: str = "default") -> Any:
        return await (await self.client(owner)).pending(owner)

    async def list(self, owner: str = "default", **kw: Any) -> Any:
        return await (await self.client(owner)).list(owner=owner, **kw)

    async def as_completed(self, ids: list[str], timeout: float | None = None) -> AsyncIterator[Any]:
        async for task in (await self.client(self.owners.get(ids[0], "default"))).as_completed(ids, timeout):
            yield task

    async def prune(self, older_than: float) -> Any:
        return await self.server_tm.prune(older_than)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        async def by_task(task_id: str, *args: Any, **kw: Any) -> Any:
            client = await self.client(self.owners.get(task_id, "default"))
            return await getattr(client, name)(task_id, *args, **kw)

        return by_task


class _RemoteCredits:
    def __init__(self, remote: Remote) -> None:
        self.remote = remote

    async def grant(self, owner: str, amount: int) -> int:
        return await self.remote.server_tm.credits.grant(owner, amount)

    async def balance(self, owner: str) -> int:
        return await (await self.remote.client(owner)).credits.balance(owner)


@pytest.fixture(params=["async", "sync", "remote", "remote-sync"])
async def make_any(request, db_path) -> AsyncIterator[Callable[..., Any]]:
    """Build a TaskManager, a SyncTaskManager behind `Blocking`, or remote managers behind
    `Remote` in front of a real server, on the test's database."""
    opened: list[Any] = []

    async def make(**options: Any) -> Any:
        options.setdefault("provider", FakeProvider())
        options.setdefault("retry_delay", 0.01)
        options.setdefault("poll_interval", 0.05)
        if request.param == "async":
            tm = await TaskManager(db_path, **options).open()
            opened.append(tm.aclose)
            return tm
        if request.param.startswith("remote"):
            server_tm = await TaskManager(db_path, **options).open()
            serving = uvicorn_serving(create_app(server_tm))
            remote = Remote(server_tm, await serving.__aenter__(), request.param == "remote-sync")

            async def stop() -> None:
                await remote.close()
                await serving.__aexit__(None, None, None)
                await server_tm.aclose()

            opened.append(stop)
            return remote
        sync = await asyncio.to_thread(SyncTaskManager, db_path, **options)
        opened.append(lambda: asyncio.to_thread(sync.close, cancel_running=True))
        return Blocking(sync)

    yield make
    for close in opened:
        await close()


async def test_submit_wait_and_read(make_any):
    """submit answers queued; wait returns it succeeded with its image; poll, pending, list and
    events agree."""
    tm = await make_any()
    task = await tm.submit("a harbour", n=2, owner="alice", metadata={"k": 1})
    assert task.status is TaskStatus.QUEUED and task.metadata == {"k": 1}
    done = await tm.wait(task.id, timeout=10)
    assert done.ok and len(done.images) == 2 and all(im.path.exists() for im in done.images)
    assert (await tm.poll(task.id)) == done
    assert await tm.pending("alice") == []
    assert [t.id for t in await tm.list(owner="alice")] == [task.id]
    assert [e.kind for e in await tm.events(task.id)] == ["claimed", "succeeded"]


async def test_submit_many_and_as_completed(make_any):
    """submit_many writes all; as_completed yields each exactly once as it ends."""
    tm = await make_any(provider=FakeProvider(latency=0.05))
    tasks = await tm.submit_many([{"prompt": f"p{i}"} for i in range(6)])
    seen = [t.id async for t in tm.as_completed([t.id for t in tasks], timeout=20)]
    assert sorted(seen) == sorted(t.id for t in tasks)


async def test_cancel_and_credits(make_any):
    """A cancelled task is refunded; a short balance is InsufficientCredits and writes nothing."""
    tm = await make_any(provider=FakeProvider(outcomes=["hang"]), credits=True)
    assert await tm.credits.grant("bob", 2) == 2
    task = await tm.submit("to be cancelled", n=2, owner="bob")
    assert await tm.credits.balance("bob") == 0
    with pytest.raises(InsufficientCredits):
        await tm.submit("cannot pay", owner="bob")
    assert (await tm.cancel(task.id)).status is TaskStatus.CANCELLED
    assert await tm.credits.balance("bob") == 2


async def test_errors_are_the_same(make_any):
    """Bad input, unknown ids and timeouts raise the same errors through both managers."""
    tm = await make_any(provider=FakeProvider(outcomes=["hang"]))
    with pytest.raises(ValidationError) as info:
        await tm.submit("x", n=9)
    assert info.value.field == "n"
    with pytest.raises(TaskNotFound):
        await tm.poll("01ARZ3NDEKTSV4RRFFQ69G5FAV")
    task = await tm.submit("hangs")
    with pytest.raises(WaitTimeout):
        await tm.wait(task.id, timeout=0.1)
    await tm.cancel(task.id)
    await asyncio.sleep(0.01)  # prune(0) takes tasks that finished before now, to the millisecond
    report = await tm.prune(0)
    assert report.tasks == 1


# -- only the blocking door -------------------------------------------------------------------


def test_a_plain_script_uses_it_without_asyncio(tmp_path):
    """A script with no asyncio submits and waits inside `with`, and exits at once."""
    script = (
        "import sys\n"
        "from imagetask import SyncTaskManager\n"
        "from imagetask.providers import FakeProvider\n"
        "with SyncTaskManager(sys.argv[1], provider=FakeProvider(latency=0.1)) as tm:\n"
        "    task = tm.wait(tm.submit('a plain script').id, timeout=30)\n"
        "print(task.status.value, len(task.images))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "t.db")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["succeeded", "1"]


def test_it_opens_when_constructed_and_works_without_with(db_path):
    """Without `with`, the manager is open at once and generations go on between calls."""
    tm = SyncTaskManager(db_path, provider=FakeProvider(latency=0.2))
    try:
        task = tm.submit("no with")
        assert tm.wait(task.id, timeout=10).ok
    finally:
        tm.close()
    with pytest.raises(ConfigError, match="closed"):
        tm.poll(task.id)
    tm.close()  # twice is fine


def test_several_threads_at_once(db_path):
    """Eight threads submit and wait at the same time; every task succeeds once."""
    with SyncTaskManager(db_path, provider=FakeProvider(latency=0.05), concurrency=8, per_owner=8) as tm:
        results: list[Any] = []

        def work(i: int) -> None:
            ids = [tm.submit(f"thread {i} task {j}", owner=f"o{i}").id for j in range(5)]
            results.extend(tm.wait(task_id, timeout=30) for task_id in ids)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 40 and all(t.ok for t in results)
    assert sql(db_path, "SELECT count(*) FROM tasks WHERE status = 'succeeded'") == [(40,)]


async def test_it_works_from_inside_a_running_event_loop(db_path):
    """Called from a coroutine (a FastAPI handler, a Jupyter cell), it blocks that loop for the
    call but neither raises nor deadlocks: its own loop is another thread's."""
    with SyncTaskManager(db_path, provider=FakeProvider()) as tm:
        task = tm.submit("from a running loop")
        assert tm.wait(task.id, timeout=10).ok


def test_a_call_from_its_own_loop_thread_raises_instead_of_hanging(db_path):
    """A provider (running on the manager's loop) that calls the SyncTaskManager gets a
    RuntimeError at once; the task fails with that reason instead of hanging."""

    class Reentrant(FakeProvider):
        manager: SyncTaskManager | None = None

        async def generate(self, request):  # type: ignore[no-untyped-def]
            assert self.manager is not None
            self.manager.poll(request.task_id)
            return await super().generate(request)

    provider = Reentrant()
    with SyncTaskManager(db_path, provider=provider) as tm:
        provider.manager = tm
        done = tm.wait(tm.submit("calls back").id, timeout=10)
    assert done.error is not None and done.error.code == "internal_error"
    assert "own event loop" in done.error.message


def test_close_from_another_thread_ends_a_submit_that_is_copying_its_references(db_path):
    """close() while another thread's submit is copying its reference images: that thread is
    answered (ConfigError: closed while the call ran) instead of blocking forever, the copy is
    waited for and deleted, and no row is written."""
    from imagetask.testing import Faults
    from test_manager import png

    faults = Faults()
    copying, release = threading.Event(), threading.Event()
    faults.call("write_image", lambda: copying.set() or release.wait(10))
    tm = SyncTaskManager(db_path, provider=FakeProvider(), workers=False, faults=faults)
    outcome: list[BaseException | object] = []

    def submit() -> None:
        try:
            outcome.append(tm.submit("with a reference", images=[png()]))
        except BaseException as exc:
            outcome.append(exc)

    submitter = threading.Thread(target=submit, daemon=True)
    submitter.start()
    assert copying.wait(10)
    threading.Timer(0.2, release.set).start()
    tm.close()
    submitter.join(10)
    assert not submitter.is_alive()
    (got,) = outcome
    assert isinstance(got, ConfigError) and "closed while this call was running" in str(got)
    assert [p for p in tm.images_root.rglob("*") if p.is_file()] == []
    assert sql(db_path, "SELECT count(*) FROM tasks") == [(0,)]


def test_close_waits_for_running_attempts_by_default(db_path):
    """close() lets the attempt already generating finish, and leaves tasks it did not start queued."""
    provider = FakeProvider(latency=0.8)
    tm = SyncTaskManager(db_path, provider=provider, concurrency=1, per_owner=5)
    first = tm.submit("running at close")
    second = tm.submit("queued at close")
    deadline = threading.Event()
    while provider.active == 0 and not deadline.wait(0.01):
        pass
    tm.close()
    statuses = dict(sql(db_path, "SELECT id, status FROM tasks"))
    assert statuses == {first.id: "succeeded", second.id: "queued"}
    assert provider.calls == 1


def test_close_cancel_running_hands_them_back_at_once(db_path):
    """close(cancel_running=True) hands the running attempt back: queued, no attempt counted."""
    provider = FakeProvider(outcomes=["hang"])
    tm = SyncTaskManager(db_path, provider=provider)
    task = tm.submit("handed back")
    while provider.active == 0:
        threading.Event().wait(0.01)
    tm.close(cancel_running=True)
    assert sql(db_path, "SELECT status, attempt - released FROM tasks WHERE id = ?", task.id) == [
        ("queued", 0)
    ]


def test_an_unclosed_manager_warns_when_collected(db_path):
    """A SyncTaskManager dropped without close() warns with ResourceWarning and closes itself:
    its running attempt is handed back to the queue and no connection to the file stays open."""
    tm = SyncTaskManager(db_path, provider=FakeProvider(outcomes=["hang"]))
    task = tm.submit("dropped while running")
    wait_until(lambda: sql(db_path, "SELECT status FROM tasks WHERE id = ?", task.id) == [("running",)])
    del tm
    with pytest.warns(ResourceWarning, match="never closed"):
        gc.collect()
    wait_until(
        lambda: sql(db_path, "SELECT status FROM tasks WHERE id = ?", task.id) == [("queued",)],
        timeout=10,
        what="the running attempt handed back",
    )
    # Leaving WAL mode is refused while any other connection is open.
    wait_until(lambda: _alone_on(db_path), timeout=10, what="every connection closed")


def _alone_on(db_path) -> bool:
    conn = sqlite3.connect(db_path, timeout=0)
    try:
        return conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0] == "delete"
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


async def test_with_on_the_async_manager_says_what_to_use(db_path):
    """`with TaskManager(...)` (no async) is a TypeError naming `async with` and SyncTaskManager."""
    with pytest.raises(TypeError, match=r"async with.*SyncTaskManager"), TaskManager(db_path):
        pass
