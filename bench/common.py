"""Helpers shared by the benchmark cases: timing, schemas, cached big databases."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imagetask._ids import new_task_id
from imagetask._models import now_ms
from imagetask._store import MIGRATIONS

CACHE = Path(__file__).parent / ".cache"

INSERT_TASK = (
    "INSERT INTO tasks (id, owner, prompt, model, params, status, attempt, max_attempts, cost,"
    " idempotency_key, fingerprint, metadata, run_after, created_at, updated_at)"
    " VALUES (?, ?, ?, 'fake', ?, 'queued', 0, 3, 1, NULL, ?, '{}', ?, ?, ?)"
)
INSERT_EVENT = (
    "INSERT INTO task_events (task_id, at, attempt, event, status) VALUES (?, ?, 0, 'submitted', 'queued')"
)
PARAMS = json.dumps({"aspect_ratio": None, "n": 1, "size": None}, sort_keys=True)


def connect(path: Path, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """A stdlib connection with imagetask's settings."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def create_schema(path: Path) -> None:
    """imagetask's schema, created with stdlib sqlite3 (for the floors)."""
    conn = connect(path)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
        " description TEXT NOT NULL, applied_at INTEGER NOT NULL)"
    )
    for version, description, statements in MIGRATIONS:
        for statement in statements:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (version, description))
    conn.close()


def submit_args(i: int, owner: str = "alice") -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    task_id = new_task_id()
    now = now_ms()
    return (
        (task_id, owner, f"prompt {i}", PARAMS, f"fp{i}", now, now, now),
        (task_id, now),
    )


def finished_db(rows: int) -> Path:
    """A cached database holding ``rows`` succeeded tasks (built once, then copied)."""
    CACHE.mkdir(exist_ok=True)
    # Keyed by the schema's text, not just its version: a cache built from another schema
    # must never be reused.
    schema = hashlib.sha256(repr(MIGRATIONS).encode()).hexdigest()[:12]
    path = CACHE / f"finished-{rows}-{schema}.db"
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    for p in (tmp, Path(str(tmp) + "-wal"), Path(str(tmp) + "-shm")):
        p.unlink(missing_ok=True)
    create_schema(tmp)
    conn = connect(tmp, synchronous="OFF")
    base = now_ms() - 10 * 24 * 3600 * 1000
    conn.execute("BEGIN")
    batch = []
    for i in range(rows):
        t = base + i
        batch.append((new_task_id(), f"user{i % 1000}", f"p{i}", PARAMS, f"f{i}", t, t, t, t, t))
        if len(batch) == 10_000:
            _insert_finished(conn, batch)
            batch = []
    _insert_finished(conn, batch)
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    for suffix in ("-wal", "-shm"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    tmp.rename(path)
    return path


def _insert_finished(conn: sqlite3.Connection, batch: list[tuple[Any, ...]]) -> None:
    conn.executemany(
        "INSERT INTO tasks (id, owner, prompt, model, params, status, attempt, max_attempts, cost,"
        " fingerprint, metadata, run_after, created_at, started_at, finished_at, updated_at)"
        " VALUES (?, ?, ?, 'fake', ?, 'succeeded', 1, 3, 1, ?, '{}', ?, ?, ?, ?, ?)",
        batch,
    )


def copy_db(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def summarize(samples: list[float]) -> dict[str, float]:
    """Per-op latency samples (seconds) -> p50/p99 in microseconds."""
    ordered = sorted(samples)
    n = len(ordered)
    return {
        "p50_us": ordered[n // 2] * 1e6,
        "p99_us": ordered[min(n - 1, int(n * 0.99))] * 1e6,
    }


def timed_loop(n: int, op: Callable[[int], object]) -> dict[str, float]:
    """Run ``op(i)`` n times; ops/s and p50/p99 per op."""
    samples = []
    start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        op(i)
        samples.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    return {"ops": n / total, **summarize(samples)}


async def atimed_loop(n: int, op: Callable[[int], Any]) -> dict[str, float]:
    """Async ``timed_loop``."""
    samples = []
    start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        await op(i)
        samples.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    return {"ops": n / total, **summarize(samples)}


def rss_peak_mb() -> float:
    """Peak resident set size of this process, in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_now_mb() -> float:
    """Current resident set size of this process, in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def median_of(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Median of each metric over repetitions, with min and max of ops/s."""
    keys = runs[0].keys()
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    if "ops" in keys:
        out["ops_min"] = min(r["ops"] for r in runs)
        out["ops_max"] = max(r["ops"] for r in runs)
    out["reps"] = len(runs)
    return out
