"""Generate an image with Gemini, then edit it with a second prompt (the first image as reference).

    GEMINI_API_KEY=... python examples/gemini_generate_and_edit.py

Without GEMINI_API_KEY this says how to set one and runs the same flow on the offline
FakeProvider, so the example always runs.
"""

from __future__ import annotations

import asyncio
import os
import sys

from imagetask import TaskManager
from imagetask.providers import FakeProvider, GeminiProvider, Provider


def choose_provider() -> Provider:
    if os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY"):
        return GeminiProvider(model="gemini-2.5-flash-image")
    print(
        "GEMINI_API_KEY is not set, so this runs on the offline FakeProvider.\n"
        "To use Gemini: get a key at https://aistudio.google.com/apikey, then\n"
        "  export GEMINI_API_KEY=your-key\n"
        "and run this example again.\n",
        file=sys.stderr,
    )
    return FakeProvider(latency=0.3)


async def main() -> None:
    provider = choose_provider()
    async with TaskManager(provider=provider, attempt_timeout=300) as tm:
        first = await tm.submit("a watercolor lighthouse at dusk", aspect_ratio="16:9")
        first = await tm.wait(first.id, timeout=600)
        if not first.ok:
            assert first.error is not None
            sys.exit(f"generation failed: {first.error.code}: {first.error.message}")
        print("generated:", first.images[0].path)
        edit = await tm.submit(
            "the same lighthouse, now in a snowstorm", images=[first.images[0].path], aspect_ratio="16:9"
        )
        edit = await tm.wait(edit.id, timeout=600)
        if not edit.ok:
            assert edit.error is not None
            sys.exit(f"edit failed: {edit.error.code}: {edit.error.message}")
        print("edited:   ", edit.images[0].path)
        print("provenance:", dict(edit.images[0].provenance))


if __name__ == "__main__":
    asyncio.run(main())
