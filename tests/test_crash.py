"""Crash safety with real processes killed by SIGKILL (guarantees 1, 2 and 7)."""

from __future__ import annotations

import hashlib
import signal
import time

import pytest

from imagetask import TaskManager, TaskStatus
from imagetask.providers import FakeProvider

from conftest import RETAKEN_THEN_SUCCEEDED, check_attempts_exclusive, sql, trail, wait_until

pytestmark = pytest.mark.slow


def status_of(db, task_id=None):
    if task_id is None:
        return [r[0] for r in sql(db, "SELECT status FROM tasks ORDER BY id")]
    rows = sql(db, "SELECT status FROM tasks WHERE id = ?", task_id)
    return rows[0][0] if rows else None


def kill(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL


async def test_acknowledged_submits_survive_sigkill(db_path, spawn):
    """Tasks whose submit() returned in a process killed right after are all run by a new process."""
    child = spawn("submit", str(db_path), "20")
    ids = []
    for line in child.stdout:
        line = line.strip()
        if line == "submitted":
            break
        ids.append(line)
    kill(child)
    assert len(ids) == 20
    async with TaskManager(db_path, provider=FakeProvider(), retry_delay=0.01) as tm:
        for task_id in ids:
            assert (await tm.wait(task_id, timeout=20)).ok


async def test_mid_generation_kill_is_rerun_after_the_lease(db_path, spawn):
    """A task whose worker is killed mid-generation is taken back after its lease and re-run."""
    child = spawn("work", str(db_path), "--latency", "60", "--lease", "1")
    assert child.stdout.readline().strip() == "ready"
    async with TaskManager(db_path, provider=FakeProvider(), workers=False) as submitter:
        task = await submitter.submit("interrupted mid-generation")
    wait_until(lambda: status_of(db_path, task.id) == "running", what="the child to claim the task")
    kill(child)
    async with TaskManager(db_path, provider=FakeProvider(), lease=1, poll_interval=0.05) as tm:
        done = await tm.wait(task.id, timeout=20)
        events = trail(await tm.events(task.id))
    assert done.ok and done.attempts == 2
    assert events == RETAKEN_THEN_SUCCEEDED


async def test_dead_worker_with_no_attempts_left_fails_interrupted_within_a_lease(db_path, spawn):
    """With attempts spent, a dead worker's task fails `interrupted` (refunded) about one lease later."""
    lease = 1.5
    async with TaskManager(db_path, provider=FakeProvider(), workers=False, credits=True) as tm:
        await tm.credits.grant("alice", 3)
    child = spawn(
        "work", str(db_path), "--latency", "60", "--lease", str(lease), "--max-attempts", "1", "--credits"
    )
    assert child.stdout.readline().strip() == "ready"
    async with TaskManager(
        db_path, provider=FakeProvider(), workers=False, credits=True, max_attempts=1
    ) as submitter:
        task = await submitter.submit("no second chance", owner="alice")
    wait_until(lambda: status_of(db_path, task.id) == "running", what="the child to claim the task")
    # A second worker, alive before the kill and after it, is the one that notices.
    async with TaskManager(
        db_path, provider=FakeProvider(), lease=lease, poll_interval=0.05, credits=True
    ) as watcher:
        killed_at = time.time()
        kill(child)
        done = await watcher.wait(task.id, timeout=20)
        assert done.status is TaskStatus.FAILED
        assert done.error is not None and done.error.code == "interrupted"
        # Guarantee 2: no row stays running longer than one lease after its worker is gone
        # (plus the sweep interval and scheduling slack on a busy machine).
        assert done.finished_at is not None
        assert done.finished_at.timestamp() - killed_at < lease + 1.0
        assert await watcher.credits.balance("alice") == 3


async def test_kill_between_image_write_and_commit_leaves_only_an_orphan(db_path, spawn):
    """Killed after the files are written but before the commit: the row never names them, the task
    re-runs, and prune removes the orphan files."""
    child = spawn("crash-before-commit", str(db_path), "--lease", "1")
    assert child.stdout.readline().strip() == "ready"
    async with TaskManager(db_path, provider=FakeProvider(), workers=False) as submitter:
        task = await submitter.submit("almost done", n=2)
    child.wait(timeout=20)
    assert child.returncode == -signal.SIGKILL
    images = db_path.parent / "images"
    orphans = sorted(images.rglob("a1-*.png"))
    assert len(orphans) == 2  # written and fsynced, never committed
    assert status_of(db_path, task.id) == "running"
    assert sql(db_path, "SELECT count(*) FROM task_images") == [(0,)]
    async with TaskManager(db_path, provider=FakeProvider(), lease=1) as tm:
        done = await tm.wait(task.id, timeout=20)
        assert done.ok and done.attempts == 2
        assert [im.path.name for im in done.images] == ["a2-0.png", "a2-1.png"]
        for im in done.images:
            assert hashlib.sha256(im.path.read_bytes()).hexdigest() == im.sha256
        report = await tm.prune(older_than=3600)
        assert report.tasks == 0 and report.orphans == 2
        assert not any(p.exists() for p in orphans)
        assert all(im.path.exists() for im in done.images)
    check_attempts_exclusive(db_path)
