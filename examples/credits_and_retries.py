"""Credits, idempotency, retries and refunds on the offline FakeProvider.

python examples/credits_and_retries.py
"""

from __future__ import annotations

import asyncio

from imagetask import InsufficientCredits, TaskManager
from imagetask.providers import FakeProvider


async def main() -> None:
    # The fake fails the first call transiently (a 503), then refuses one (a safety block).
    provider = FakeProvider(latency=0.2, outcomes=["transient", "refusal"])
    async with TaskManager(provider=provider, credits=True, retry_delay=0.1) as tm:
        await tm.credits.grant("alice", 5)
        # A double click: the same key returns the same task and charges once.
        first = await tm.submit("a red bicycle", owner="alice", idempotency_key="click-1")
        again = await tm.submit("a red bicycle", owner="alice", idempotency_key="click-1")
        assert first.id == again.id
        refused = await tm.submit("something the model refuses", owner="alice")
        print("balance after two submits:", await tm.credits.balance("alice"))
        done = await tm.wait(first.id, timeout=60)
        print(f"{done.id}: {done.status} after {done.attempts} attempts (the first hit a 503)")
        failed = await tm.wait(refused.id, timeout=60)
        assert failed.error is not None
        print(f"{failed.id}: {failed.status} ({failed.error.code}), refunded")
        print("balance now:", await tm.credits.balance("alice"))
        try:
            await tm.submit("too many", n=8, owner="alice")
        except InsufficientCredits as exc:
            print("refused:", exc)


if __name__ == "__main__":
    asyncio.run(main())
