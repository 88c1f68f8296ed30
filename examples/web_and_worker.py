"""The production set-up: a web process that only submits and polls, and a worker process.

The web side opens `TaskManager(..., workers=False)`: it needs no API key and runs no
generation. `imagetask worker` runs the work in its own process (here started for you, with
`--provider fake` to stay offline), and SIGTERM stops it gracefully.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from imagetask import TaskManager, default_home
from imagetask.providers import GEMINI_MODELS, FakeProvider

HOME = default_home() / "web-and-worker"


async def main() -> None:
    # `python -m imagetask` is the `imagetask` command, whichever environment runs this file.
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imagetask",
        "--home",
        str(HOME),
        "worker",
        "--provider",
        "fake",
        "--latency",
        "0.3",
    )
    try:
        # The web process: submit and poll only. Its provider only validates requests against
        # the model table; in production pass GeminiProvider(), which needs no key for that.
        web = TaskManager(HOME / "tasks.db", provider=FakeProvider(models=GEMINI_MODELS), workers=False)
        async with web as tm:
            ids = [(await tm.submit(f"poster {i}", owner="shop")).id for i in range(3)]
            print("the web process submitted", ids)
            done = [await tm.wait(task_id, timeout=60) for task_id in ids]  # the worker ran them
            print("the worker finished:", [t.status.value for t in done])
            assert all(t.ok for t in done)
    finally:
        worker.send_signal(signal.SIGTERM)  # graceful: running attempts finish first
        print("worker exited with", await asyncio.wait_for(worker.wait(), 60))


if __name__ == "__main__":
    asyncio.run(main())
