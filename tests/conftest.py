"""Shared fixtures: a clean environment, a manager factory, ledger checks, child processes."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from imagetask import TaskEvent, TaskManager
from imagetask.providers import FakeProvider

HERE = Path(__file__).parent
CHILD = HERE / "child.py"


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No API keys or Google settings leak in; the default home is a temp folder."""
    for name in list(os.environ):
        if name in ("GEMINI_API_KEY", "GOOGLE_API_KEY") or name.startswith(("GOOGLE_", "IMAGETASK_")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IMAGETASK_HOME", str(tmp_path / "home"))


def check_ledger(db: Path) -> None:
    """Every owner's balance equals the sum of their ledger; charges and refunds are unique."""
    if not db.exists():
        return
    conn = sqlite3.connect(db)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "ledger" not in tables:
            return
        sums = dict(conn.execute("SELECT owner, sum(amount) FROM ledger GROUP BY owner").fetchall())
        balances = dict(conn.execute("SELECT owner, balance FROM accounts").fetchall())
        for owner in set(sums) | set(balances):
            assert balances.get(owner, 0) == sums.get(owner, 0), f"ledger mismatch for {owner}"
        dupes = conn.execute(
            "SELECT task_id, kind, count(*) FROM ledger WHERE task_id IS NOT NULL"
            " GROUP BY task_id, kind HAVING count(*) > 1"
        ).fetchall()
        assert dupes == []
        # A refund only ever follows a charge, and only for a failed or cancelled task.
        bad = conn.execute(
            "SELECT r.task_id FROM ledger r LEFT JOIN ledger c ON c.task_id = r.task_id AND c.kind = 'charge'"
            " LEFT JOIN tasks t ON t.id = r.task_id"
            " WHERE r.kind = 'refund' AND (c.id IS NULL OR t.status NOT IN ('failed', 'cancelled'))"
        ).fetchall()
        assert bad == []
    finally:
        conn.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Iterator[Path]:
    """The database file of the test; its ledger is checked after the test."""
    path = tmp_path / "data" / "tasks.db"
    yield path
    check_ledger(path)


@pytest.fixture
async def make_manager(db_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Build and open managers on the test's database (FakeProvider by default); close them after."""
    managers: list[TaskManager] = []

    async def make(**options: Any) -> TaskManager:
        options.setdefault("provider", FakeProvider())
        options.setdefault("path", db_path)
        options.setdefault("retry_delay", 0.01)
        options.setdefault("poll_interval", 0.05)
        tm = TaskManager(**options)
        await tm.open()
        managers.append(tm)
        return tm

    yield make
    for tm in managers:
        await tm.aclose()


def sql(db: Path, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run one query on the database with plain sqlite3 (the test's independent view)."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        rows = conn.execute(query, args).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start ``tests/child.py`` in new Python processes; kill and reap them after the test."""
    children: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        children.append(proc)
        return proc

    yield start
    for proc in children:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it is true (for conditions in another process)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


#: The event trail of a task whose first worker died and whose second attempt succeeded.
RETAKEN_THEN_SUCCEEDED = [("claimed", 1), ("lease_expired", 1), ("claimed", 2), ("succeeded", 2)]


def trail(events: Sequence[TaskEvent]) -> list[tuple[str, int]]:
    """A task's events (from ``events()``) as (kind, attempt) pairs."""
    return [(e.kind, e.attempt) for e in events]


ATTEMPT_ENDS = ("succeeded", "failed", "retry", "released", "lease_expired", "cancelled")


def max_overlap(db: Path, owner: str | None = None) -> int:
    """The most tasks that held a live claim at once, replayed from the event log in commit order."""
    query = "SELECT e.task_id, e.event FROM task_events e JOIN tasks t ON t.id = e.task_id"
    if owner is not None:
        query += " WHERE t.owner = ?"
    live: set[str] = set()
    peak = 0
    for task_id, event in sql(db, query + " ORDER BY e.id", *([owner] if owner else [])):
        if event == "claimed":
            live.add(task_id)
            peak = max(peak, len(live))
        elif event in ATTEMPT_ENDS:
            live.discard(task_id)
    return peak


def check_attempts_exclusive(db: Path) -> None:
    """Per task, every claim ends (or the task is cancelled) before the next claim starts."""
    rows = sql(db, "SELECT task_id, attempt, event FROM task_events ORDER BY id")
    live: dict[str, int | None] = {}
    for task_id, attempt, event in rows:
        if event == "claimed":
            assert live.get(task_id) is None, f"task {task_id}: attempt {attempt} claimed while one was live"
            live[task_id] = attempt
        elif event in ATTEMPT_ENDS:
            holder = live.get(task_id)
            if holder is not None:
                assert holder == attempt, f"task {task_id}: attempt {attempt} ended attempt {holder}'s claim"
            live[task_id] = None


class Tmpfs:
    """A small tmpfs mounted at ``path`` for the length of one test."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._filler = 0

    def free(self) -> int:
        """Bytes an unprivileged writer can still use."""
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave_bytes: int) -> None:
        """Write filler files until at most ``leave_bytes`` are free."""
        self._filler += 1
        with open(self.path / f".filler-{self._filler}", "wb", buffering=0) as f:
            while (free := self.free()) > leave_bytes:
                try:
                    f.write(b"\0" * min(free - leave_bytes, 1 << 20))
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break

    def remount(self, ro: bool) -> None:
        """Make the file system read-only (``ro=True``) or writable again."""
        _run("mount", "-o", "remount," + ("ro" if ro else "rw"), str(self.path))


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def tmpfs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Tmpfs]:
    """A fresh tmpfs (64 KiB, or ``request.param`` as a mount ``size=`` value through
    indirect parametrization), unmounted afterwards; skips when mounting is not allowed."""
    size = getattr(request, "param", "64k")
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("mount/umount not installed")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mnt))
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {(getattr(exc, 'stderr', '') or exc)!s}".strip())
    try:
        yield Tmpfs(mnt)
    finally:
        try:
            _run("umount", str(mnt))
        except subprocess.CalledProcessError:
            _run("umount", "-l", str(mnt))  # still busy: detach it now, freed when let go


@contextlib.asynccontextmanager
async def uvicorn_serving(app: Any, **config: Any) -> AsyncIterator[str]:
    """``app`` on a real uvicorn server on a free port of 127.0.0.1, in this test's loop; its
    base URL. Stopped (its connections given a second) on the way out."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config.setdefault("timeout_graceful_shutdown", 1)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await serving
        sock.close()
