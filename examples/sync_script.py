"""A plain script, no asyncio: SyncTaskManager submits, keeps working in the background, and waits.

Runs offline on FakeProvider; remove `provider=` and set GEMINI_API_KEY to use Gemini.
"""

from imagetask import SyncTaskManager, default_home
from imagetask.providers import GEMINI_MODELS, FakeProvider

with SyncTaskManager(
    default_home() / "sync-example.db", provider=FakeProvider(0.2, models=GEMINI_MODELS)
) as tm:
    ids = [tm.submit(prompt, aspect_ratio="1:1").id for prompt in ("a teapot", "a kite", "a comet")]
    print("submitted", len(ids), "tasks; the script is free meanwhile")
    for task in tm.as_completed(ids, timeout=60):  # each as it finishes
        print(task.status.value, task.prompt, [str(im.path) for im in task.images])
