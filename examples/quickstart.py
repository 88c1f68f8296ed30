"""Submit a few tasks, watch them finish, and print where the images are.

Runs offline on FakeProvider unless GEMINI_API_KEY is set. Data goes to $IMAGETASK_HOME
(or the platform's user data folder).

    python examples/quickstart.py
"""

from __future__ import annotations

import asyncio
import os

from imagetask import TaskManager
from imagetask.providers import FakeProvider


async def main() -> None:
    provider = None if os.environ.get("GEMINI_API_KEY") else FakeProvider(latency=0.5)
    async with TaskManager(provider=provider) as tm:
        prompts = ["a lighthouse at dusk", "a nano banana on a plate", "a fox in the rain"]
        tasks = [await tm.submit(p, owner="example", aspect_ratio="16:9") for p in prompts]
        print("submitted:", ", ".join(t.id for t in tasks))
        async for task in tm.as_completed([t.id for t in tasks], timeout=600):
            if task.ok:
                print(f"{task.prompt!r}: {task.images[0].path}")
            else:
                assert task.error is not None
                print(f"{task.prompt!r} failed: {task.error.code}: {task.error.message}")


if __name__ == "__main__":
    asyncio.run(main())
