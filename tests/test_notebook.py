"""Notebooks: tasks display as cards with inline thumbnails; the gallery updates in place from a
real kernel; the example notebook runs headless; a kernel restart resumes at once."""

from __future__ import annotations

import json
import os
import queue
import time
from pathlib import Path
from typing import Any

import pytest

from imagetask import ConfigError
from imagetask.providers import FakeProvider

ROOT = Path(__file__).parent.parent
#: A skeleton card in the HTML (the class name alone also appears in the style sheet).
SKELETON = '<div class="imagetask-skeleton"'


async def test_tasks_show_as_cards_with_inline_previews(make_manager):
    """A pending task shows an animated skeleton, a finished one its images as downscaled
    data-URI thumbnails (never file:// links), a failed one its error; lists show a grid."""
    tm = await make_manager(provider=FakeProvider(outcomes=["hang", "refusal"]))
    pending = await tm.submit("still drawing")
    failed = await tm.wait((await tm.submit("refused")).id, timeout=10)
    assert SKELETON in pending._repr_html_() and "file://" not in pending._repr_html_()
    assert "safety_blocked" in failed._repr_html_()
    await tm.cancel(pending.id)
    done = await tm.wait((await tm.submit("a big picture", size="4K")).id, timeout=10)
    html = done._repr_html_()
    assert "data:image/jpeg;base64," in html and "file://" not in html
    assert len(html) < done.images[0].size  # a preview, not the file
    assert "data:image/jpeg" in done.images[0]._repr_html_()
    listing = await tm.list()
    assert listing._repr_html_().count('class="imagetask-card') == 3
    first_event = (await tm.events(done.id))[0]._repr_html_()
    assert "<b>claimed</b>" in first_event and "attempt 1" in first_event


async def test_a_task_whose_image_file_is_gone_never_shows_a_file_link(make_manager):
    """A finished task whose image file was deleted shows a placeholder, in its card and in the
    image's own display, never a file:// link to the missing file."""
    tm = await make_manager()
    done = await tm.wait((await tm.submit("deleted later")).id, timeout=10)
    done.images[0].path.unlink()
    again = await tm.poll(done.id)
    for html in (again._repr_html_(), again.images[0]._repr_html_()):
        assert "file://" not in html and "data:image" not in html
    assert "image file missing" in again._repr_html_()


async def test_gallery_outside_a_notebook_says_what_to_use(make_manager):
    """gallery() in a plain process raises ConfigError naming what to use instead."""
    tm = await make_manager()
    with pytest.raises(ConfigError, match="imagetask sheet"):
        tm.gallery()


# -- a real kernel --------------------------------------------------------------------------


@pytest.fixture
def kernel_env(tmp_path, monkeypatch) -> Path:
    """Jupyter's and IPython's folders in the test's temp folder, and the data home."""
    for name in ("JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "JUPYTER_CONFIG_DIR", "IPYTHONDIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    home = tmp_path / "home"
    monkeypatch.setenv("IMAGETASK_HOME", str(home))
    return home


class Kernel:
    """A real ipykernel driven like a notebook front end: run cells, collect output messages."""

    def __init__(self) -> None:
        from jupyter_client.manager import start_new_kernel

        self.km, self.kc = start_new_kernel(kernel_name="python3", env=dict(os.environ))
        self.messages: list[dict[str, Any]] = []

    def run(self, code: str, timeout: float = 60) -> dict[str, Any]:
        """Run one cell; returns its execute_reply (raises if the cell raised)."""
        msg_id = self.kc.execute(code)
        reply = self.kc.get_shell_msg(timeout=timeout)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.kc.get_shell_msg(timeout=timeout)
        self.drain()
        assert reply["content"]["status"] == "ok", reply["content"]
        return reply

    def drain(self, seconds: float = 0.2) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.messages.append(self.kc.get_iopub_msg(timeout=0.05))
            except queue.Empty:
                continue

    def kill(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)

    def displays(self, display_id: str) -> list[tuple[str, str]]:
        """(message type, HTML) of every output with this display id, in order."""
        out = []
        for m in self.messages:
            shown_id = (m["content"].get("transient") or {}).get("display_id")
            if m["msg_type"] in ("display_data", "update_display_data") and shown_id == display_id:
                out.append((m["msg_type"], m["content"]["data"].get("text/html", "")))
        return out

    def first_display_id(self) -> str:
        for m in self.messages:
            if m["msg_type"] == "display_data" and (m["content"].get("transient") or {}).get("display_id"):
                return str(m["content"]["transient"]["display_id"])
        raise AssertionError("no display with an id")


OPEN = {
    "async": "from imagetask import TaskManager\n"
    "from imagetask.providers import FakeProvider\n"
    "tm = await TaskManager(\n"
    "    {db!r}, provider=FakeProvider(latency={latency}), lease=60, poll_interval=0.1\n"
    ").open()\n",
    "sync": "from imagetask import SyncTaskManager\n"
    "from imagetask.providers import FakeProvider\n"
    "tm = SyncTaskManager({db!r}, provider=FakeProvider(latency={latency}), lease=60, poll_interval=0.1)\n",
}
SUBMIT = {
    "async": "ids = [(await tm.submit(f'card {{i}}')).id for i in range({n})]\n",
    "sync": "ids = [tm.submit(f'card {{i}}').id for i in range({n})]\n",
}


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["async", "sync"])
def test_the_gallery_replaces_its_skeletons_in_place(kernel_env, kind):
    """In a real kernel, gallery() shows skeleton cards, and after the cell that made it has
    finished, updates that same output (same display id) until every card is an image."""
    kernel = Kernel()
    try:
        db = str(kernel_env / "gallery.db")
        kernel.run(OPEN[kind].format(db=db, latency=1.0) + SUBMIT[kind].format(n=3) + "tm.gallery()\n")
        kernel.run("import asyncio\nawait asyncio.sleep(3)\n")
        kernel.drain(1.0)
        shown = kernel.displays(kernel.first_display_id())
        assert shown[0][0] == "display_data"
        assert SKELETON in shown[0][1] or "loading" in shown[0][1]
        updates = [html for kind_, html in shown if kind_ == "update_display_data"]
        assert updates, "the gallery never updated its output"
        assert updates[-1].count("data:image/jpeg") == 3 and SKELETON not in updates[-1]
    finally:
        kernel.kill()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_kernel_restart_resumes_at_once(kernel_env):
    """Tasks running when their kernel is killed (a restart) are taken back at once by the next
    kernel's manager, not after their 60 s lease, and its gallery shows them finish."""
    db = str(kernel_env / "restart.db")
    first = Kernel()
    try:
        first.run(OPEN["async"].format(db=db, latency=60) + SUBMIT["async"].format(n=2))
        first.run(
            "import asyncio\n"
            "while sum(t.status.value == 'running' for t in await tm.pending()) < 2:\n"
            "    await asyncio.sleep(0.05)\n"
        )
    finally:
        first.kill()
    second = Kernel()
    try:
        second.run(OPEN["async"].format(db=db, latency=0.5) + "tm.gallery()\n")
        second.run(
            "import asyncio\n"
            "tasks = await tm.list()\n"
            "done = [await tm.wait(t.id, timeout=20) for t in tasks]\n"
            "assert [t.status.value for t in done] == ['succeeded', 'succeeded'], done\n"
            # Taken back because their holder was gone, not once their 60 s lease ran out.
            "for t in done:\n"
            "    taken = [(e.kind, e.detail) for e in await tm.events(t.id)][1]\n"
            "    assert taken == ('lease_expired', 'holder_gone'), taken\n"
            "await asyncio.sleep(1)\n"
        )
        second.drain(0.5)
        shown = second.displays(second.first_display_id())
        assert shown[-1][1].count("data:image/jpeg") == 2
    finally:
        second.kill()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_example_notebook_runs_headless(kernel_env):
    """examples/notebook.ipynb runs top to bottom in a real kernel with no cell raising."""
    import nbformat
    from nbclient import NotebookClient

    kernel_env.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(ROOT / "examples" / "notebook.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("data:image/jpeg" in json.dumps(o.get("data", {})) for o in outputs)
