"""A separate Python process for crash and multi-process tests (run by tests/conftest.spawn).

child.py submit DB N                 submit N tasks (workers=False), print ids, sleep
child.py work DB [options]           run workers until killed, or until --until tasks end
child.py crash-before-commit DB      run workers; SIGKILL itself inside the success
                                     transaction, after the image files are written
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys

from imagetask import TaskManager
from imagetask.providers import FakeProvider
from imagetask.testing import Faults


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["submit", "work", "crash-before-commit"])
    p.add_argument("db")
    p.add_argument("count", nargs="?", type=int, default=0)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--lease", type=float, default=60.0)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--per-owner", type=int, default=4)
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--credits", action="store_true")
    p.add_argument("--owner", default="default")
    p.add_argument("--submit", type=int, default=0, help="also submit this many tasks while working")
    p.add_argument("--until", type=int, default=0, help="exit 0 once this many tasks are terminal")
    return p.parse_args()


def terminal_count(db: str) -> int:
    conn = sqlite3.connect(db, timeout=10)
    try:
        return int(
            conn.execute(
                "SELECT count(*) FROM tasks WHERE status IN ('succeeded', 'failed', 'cancelled')"
            ).fetchone()[0]
        )
    finally:
        conn.close()


async def main() -> int:
    args = parse()
    faults = Faults()
    if args.mode == "crash-before-commit":
        faults.kill("succeed")  # the UPDATE and image rows are written, not committed

    workers = args.mode != "submit"
    async with TaskManager(
        args.db,
        provider=FakeProvider(latency=args.latency),
        workers=workers,
        lease=args.lease,
        concurrency=args.concurrency,
        per_owner=args.per_owner,
        max_attempts=args.max_attempts,
        credits=args.credits,
        retry_delay=0.01,
        poll_interval=0.05,
        faults=faults,
    ) as tm:
        if args.mode == "submit":
            for i in range(args.count):
                task = await tm.submit(f"child task {i}", owner=args.owner)
                print(task.id, flush=True)
            print("submitted", flush=True)
            await asyncio.Event().wait()
        print("ready", flush=True)
        for i in range(args.submit):
            await tm.submit(f"{os.getpid()} task {i}", owner=f"owner{i % 5}")
        while True:
            await asyncio.sleep(0.05)
            if args.until and terminal_count(args.db) >= args.until:
                return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
