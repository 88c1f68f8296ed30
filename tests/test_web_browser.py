"""The page at ``/`` in a real browser (Debian's Chromium driven by Playwright) against a real
uvicorn server: skeleton cards at once, surviving a reload, turning into images, failures."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imagetask import TaskManager
from imagetask.providers import FakeProvider

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: How long the fake model takes per image: long enough to reload the page mid-generation.
LATENCY = 3.0
OWNER = "alice"
CREDITS = 10

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"needs Chromium at {CHROMIUM} (apt-get install chromium)"
)

# Records, in the page, when each click on #create happens (capture phase: before the page's
# own handler) and when each skeleton card is added to #gallery.
INSTRUMENT = """() => {
  window.__clicks = [];
  window.__skeletons = [];
  document.addEventListener("click", (ev) => {
    if (ev.target instanceof Element && ev.target.closest("#create")) window.__clicks.push(performance.now());
  }, true);
  new MutationObserver((records) => {
    const now = performance.now();
    for (const record of records)
      for (const node of record.addedNodes)
        if (node instanceof Element && node.matches(".card.skeleton")) window.__skeletons.push(now);
  }).observe(document.getElementById("gallery"), { childList: true });
}"""

IMAGES_DECODED = """() => {
  const imgs = [...document.querySelectorAll("#gallery .card img")];
  return imgs.length > 0 && imgs.every((img) => img.complete && img.naturalWidth > 0);
}"""


@dataclass
class Site:
    url: str
    provider: FakeProvider
    token: str


async def _prepare(db: Path) -> str:
    """A token for OWNER and some credits, written by a short-lived manager on the same file."""
    async with TaskManager(db, provider=FakeProvider()) as tm:
        await tm.credits.grant(OWNER, CREDITS)
        return await tm.tokens.create(OWNER)


@pytest.fixture
def site(db_path: Path) -> Iterator[Site]:
    """The app on a real uvicorn server in a thread (its lifespan opens and closes the manager)."""
    import uvicorn

    from imagetask.web import create_app

    token = asyncio.run(_prepare(db_path))
    provider = FakeProvider(latency=LATENCY)
    app = create_app(TaskManager(db_path, provider=provider, poll_interval=0.2, credits=True))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield Site(f"http://127.0.0.1:{port}/", provider, token)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium (Debian's, never a downloaded one), with its config in a temp folder."""
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _is_submit(response: Any) -> bool:
    return response.request.method == "POST" and response.url.split("?")[0].endswith("/api/tasks")


def _card_ids(page: Any) -> list[str | None]:
    return page.eval_on_selector_all(
        "#gallery .card", "cards => cards.map((c) => c.getAttribute('data-task-id'))"
    )


def test_gallery_skeletons_survive_reload_and_become_images(site: Site, browser: Any, tmp_path: Path) -> None:
    """Two Creates show two skeleton cards, each within 100 ms of its click; after both
    submits are answered a reload mid-generation shows both skeletons again (same task ids,
    newest first); each then turns into a decoded image (a blob: URL, fetched with the token);
    the balance shows the owner and follows the charges; a submit the server refuses (422) and
    a generation scripted to fail both end as failed cards showing the reason."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1100, "height": 820})
    context.add_init_script(f"localStorage.setItem('imagetask.token', {json.dumps(site.token)})")
    page = context.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    try:
        page.goto(site.url)
        balance = page.locator("#balance")
        expect(balance).to_contain_text(OWNER)
        expect(balance).to_contain_text(f"{CREDITS} credits")
        page.evaluate(INSTRUMENT)

        skeletons = page.locator("#gallery .card.skeleton")
        ids: list[str] = []
        for prompt in ("a red fox in the snow", "a blue whale at dusk"):
            page.fill("#prompt", prompt)
            with page.expect_response(_is_submit) as answer:
                page.click("#create")
            assert answer.value.status == 202, answer.value.text()
            ids.append(answer.value.json()["id"])
        expect(skeletons).to_have_count(2)

        clicks, shown = page.evaluate("[window.__clicks, window.__skeletons]")
        assert len(clicks) == 2 and len(shown) == 2, (clicks, shown)
        delays = [after - before for before, after in zip(clicks, shown, strict=True)]
        assert all(0 <= d < 100 for d in delays), f"skeletons appeared {delays} ms after the clicks"

        # Each card carries its task id from the answer; charged 1 credit per image.
        expect(page.locator("#gallery .card.skeleton[data-task-id]")).to_have_count(2)
        assert _card_ids(page) == ids[::-1]
        expect(balance).to_contain_text(f"{CREDITS - 2} credits")

        # Reload while both are still generating: the pending tasks come back as skeletons.
        page.reload()
        expect(page.locator("#gallery .card.skeleton[data-task-id]")).to_have_count(2)
        assert _card_ids(page) == ids[::-1]
        expect(balance).to_contain_text(OWNER)

        # Both turn into images (pushed by the stream or polled), really decoded.
        expect(page.locator("#gallery .card.done img")).to_have_count(2, timeout=15_000)
        expect(skeletons).to_have_count(0)
        page.wait_for_function(IMAGES_DECODED, timeout=10_000)
        sources = page.eval_on_selector_all("#gallery .card img", "imgs => imgs.map((i) => i.src)")
        assert all(src.startswith("blob:") for src in sources), sources

        # A submit the server refuses: the card fails at once with the server's message.
        page.fill("#model", "no-such-model")
        page.fill("#prompt", "a refused request")
        with page.expect_response(_is_submit) as answer:
            page.click("#create")
        assert answer.value.status == 422, answer.value.text()
        refused = page.locator("#gallery .card").first
        expect(refused).to_have_class("card failed")
        expect(refused.locator(".error")).to_contain_text("model")
        page.fill("#model", "")

        # A generation scripted to fail: the card ends failed with the provider's reason.
        site.provider.latency = 0.3
        site.provider.script("permanent")
        page.fill("#prompt", "a picture the fake will not draw")
        with page.expect_response(_is_submit) as answer:
            page.click("#create")
        assert answer.value.status == 202, answer.value.text()
        failed = page.locator(f'#gallery .card[data-task-id="{answer.value.json()["id"]}"]')
        expect(failed).to_have_class("card failed", timeout=10_000)
        expect(failed.locator(".error")).to_contain_text("the fake rejects this request")
        # Its charge is refunded: the balance is back to two images' worth spent.
        expect(balance).to_contain_text(f"{CREDITS - 2} credits")

        expect(page.locator("#gallery .card.done")).to_have_count(2)
        expect(page.locator("#gallery .card.failed")).to_have_count(2)
        shot = tmp_path / "gallery.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot}")
        assert page_errors == []
    finally:
        context.close()


def test_token_form_after_401_then_reference_upload(site: Site, browser: Any) -> None:
    """Without a stored token the API answers 401 and the page shows the token form; saving a
    token stores it (localStorage ``imagetask.token``) and reloads signed in as the owner; a
    Create with a reference image sends a multipart submit and its card becomes an image."""
    from PIL import Image
    from playwright.sync_api import expect

    site.provider.latency = 0.3
    context = browser.new_context()
    page = context.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    try:
        page.goto(site.url)
        expect(page.locator("#token")).to_be_visible()
        page.fill("#token", site.token)
        page.click("#save-token")
        expect(page.locator("#balance")).to_contain_text(OWNER)
        expect(page.locator("#token")).to_be_hidden()
        assert page.evaluate("localStorage.getItem('imagetask.token')") == site.token

        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (200, 60, 60)).save(buf, format="PNG")
        page.set_input_files(
            "#images", files=[{"name": "ref.png", "mimeType": "image/png", "buffer": buf.getvalue()}]
        )
        page.fill("#prompt", "a cat like this one")
        with page.expect_response(_is_submit) as answer:
            page.click("#create")
        assert answer.value.status == 202, answer.value.text()
        assert answer.value.request.headers["content-type"].startswith("multipart/form-data")
        assert len(answer.value.json()["references"]) == 1
        expect(page.locator("#gallery .card.done img")).to_have_count(1, timeout=10_000)
        page.wait_for_function(IMAGES_DECODED, timeout=10_000)
        assert page_errors == []
    finally:
        context.close()
