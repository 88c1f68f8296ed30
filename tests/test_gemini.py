"""GeminiProvider: the real google-genai client (its async path) against a fake Gemini server."""

from __future__ import annotations

import base64
import hashlib
import json
import logging

import pytest

from imagetask import ConfigError, TaskManager, TaskStatus, ValidationError
from imagetask.providers import GeminiProvider, ModelInfo

from fake_gemini import (
    HTML_502,
    FakeGemini,
    Reply,
    blocked_reply,
    error_reply,
    finish_reply,
    image_reply,
    picture,
    rate_limit_reply,
)

KEY = "test-key-not-a-secret-12345"


@pytest.fixture
def server():
    with FakeGemini() as fake:
        yield fake


@pytest.fixture
def gemini(server):
    def make(**kw):
        kw.setdefault("api_key", KEY)
        kw.setdefault("base_url", server.url)
        kw.setdefault("timeout", 5)
        return GeminiProvider(**kw)

    return make


async def run_one(make_manager, provider, **submit):
    tm = await make_manager(provider=provider, retry_delay=0.01, max_attempts=3)
    task = await tm.submit(submit.pop("prompt", "a nano banana"), **submit)
    return tm, await tm.wait(task.id, timeout=30)


# --- the request ------------------------------------------------------------------------------


async def test_request_shape_on_the_wire(make_manager, server, gemini):
    """The server receives the documented path, key header, modalities, image config and inline
    reference images."""
    ref = picture("green")
    _tm, done = await run_one(
        make_manager,
        gemini(),
        model="gemini-3-pro-image-preview",
        aspect_ratio="16:9",
        size="2K",
        images=[ref],
    )
    assert done.ok
    (req,) = server.requests
    assert req.path == "/v1beta/models/gemini-3-pro-image-preview:generateContent"
    assert req.headers["x-goog-api-key"] == KEY
    config = req.body["generationConfig"]
    assert "IMAGE" in config["responseModalities"]
    assert config["imageConfig"] == {"aspectRatio": "16:9", "imageSize": "2K"}
    assert "candidateCount" not in config
    parts = req.body["contents"][0]["parts"]
    assert parts[0] == {"text": "a nano banana"}
    inline = parts[1]["inlineData"]
    assert inline.get("mimeType", inline.get("mime_type")) == "image/png"
    assert base64.b64decode(inline["data"]) == ref


async def test_n_images_are_n_requests(make_manager, server, gemini):
    """n=3 makes three calls, each for one image, and stores three images."""
    server.add(image_reply(picture("red")), image_reply(picture("blue")), image_reply(picture("white")))
    _, done = await run_one(make_manager, gemini(), n=3)
    assert done.ok and len(done.images) == 3 and len(server.requests) == 3
    assert len({im.sha256 for im in done.images}) == 3


# --- success ----------------------------------------------------------------------------------


async def test_keeps_the_last_non_thought_image_and_its_provenance(make_manager, server, gemini):
    """Thought drafts are skipped; the final image is stored with finish reason, model version,
    response id, usage and text."""
    final = picture("orange", size=(40, 20))
    server.add(image_reply(final, thoughts=[picture("gray"), picture("black")], text="Here it is"))
    _, done = await run_one(make_manager, gemini())
    (image,) = done.images
    assert image.sha256 == hashlib.sha256(final).hexdigest()
    assert (image.width, image.height) == (40, 20)
    p = image.provenance
    assert p["finish_reason"] == "STOP" and p["model_version"] == "gemini-fake-version"
    assert p["response_id"] == "resp-123" and p["text"] == "Here it is" and p["thought_images"] == 2
    assert p["usage"]["total_token_count"] == 1296


async def test_jpeg_answers_are_stored_as_jpeg(make_manager, server, gemini):
    """A JPEG answer is stored with its real MIME type and extension."""
    server.add(image_reply(picture(fmt="JPEG"), mime="image/jpeg"))
    _, done = await run_one(make_manager, gemini())
    assert done.images[0].mime == "image/jpeg" and done.images[0].path.suffix == ".jpg"


# --- refusals and empty answers ---------------------------------------------------------------


@pytest.mark.parametrize(
    "reason", ["IMAGE_SAFETY", "SAFETY", "PROHIBITED_CONTENT", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION"]
)
async def test_safety_finish_reasons_fail_at_once(make_manager, server, gemini, reason):
    """A safety finish reason is safety_blocked with the reason, after one request."""
    server.add(finish_reply(reason))
    _, done = await run_one(make_manager, gemini())
    assert done.status is TaskStatus.FAILED and done.error.code == "safety_blocked"
    assert reason in done.error.message and len(server.requests) == 1


@pytest.mark.parametrize("reason", ["IMAGE_SAFETY", "PROHIBITED_CONTENT"])
async def test_a_refusal_that_still_carries_an_image_is_a_failure(make_manager, server, gemini, reason):
    """A safety finish reason fails the task as safety_blocked even when the candidate also
    carries an image: no image is stored, nothing is retried, never a success."""
    server.add(image_reply(finish=reason))
    tm, done = await run_one(make_manager, gemini())
    assert done.status is TaskStatus.FAILED and done.error.code == "safety_blocked"
    assert not done.images and len(server.requests) == 1
    assert not any(p.is_file() for p in tm.images_root.rglob("*"))


async def test_a_blocked_prompt_with_an_image_candidate_is_a_failure(make_manager, server, gemini):
    """promptFeedback.blockReason fails the task as safety_blocked even beside a candidate
    with an image."""
    reply = image_reply()
    body = json.loads(reply.body)
    body["promptFeedback"] = {"blockReason": "OTHER"}
    server.add(Reply.json(200, body))
    tm, done = await run_one(make_manager, gemini())
    assert done.status is TaskStatus.FAILED and done.error.code == "safety_blocked"
    assert "OTHER" in done.error.message and not done.images and len(server.requests) == 1
    assert not any(p.is_file() for p in tm.images_root.rglob("*"))


async def test_refusal_text_is_kept_in_the_error(make_manager, server, gemini):
    """IMAGE_SAFETY with a refusal text part reports that text."""
    server.add(finish_reply("IMAGE_SAFETY", text="I can't create that image."))
    _, done = await run_one(make_manager, gemini())
    assert done.error.code == "safety_blocked" and "I can't create that image." in done.error.message


async def test_blocked_prompt_is_safety_blocked(make_manager, server, gemini):
    """promptFeedback.blockReason fails the task as safety_blocked, not retried."""
    server.add(blocked_reply("PROHIBITED_CONTENT"))
    _, done = await run_one(make_manager, gemini())
    assert done.error.code == "safety_blocked" and "PROHIBITED_CONTENT" in done.error.message
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "reply",
    [
        finish_reply("NO_IMAGE"),
        finish_reply("IMAGE_OTHER"),
        finish_reply("STOP", text="A banana is a fruit."),
    ],
    ids=["NO_IMAGE", "IMAGE_OTHER", "text-only"],
)
async def test_no_image_is_retried_once_then_fails(make_manager, server, gemini, reply):
    """An answer without an image is asked once more, then fails as no_image (never a success)."""
    server.add(reply, reply, reply)
    _, done = await run_one(make_manager, gemini())
    assert done.status is TaskStatus.FAILED and done.error.code == "no_image"
    assert len(server.requests) == 2 and done.images == ()


async def test_no_image_then_success(make_manager, server, gemini):
    """If the retry draws an image, the task succeeds."""
    server.add(finish_reply("NO_IMAGE"))
    _, done = await run_one(make_manager, gemini())
    assert done.ok and done.attempts == 2


async def test_undecodable_image_bytes_are_bad_image(make_manager, server, gemini):
    """An inline 'image' Pillow cannot decode fails as bad_image."""
    server.add(image_reply(b"\x89PNG\r\n\x1a\n but then nothing"))
    _, done = await run_one(make_manager, gemini())
    assert done.error.code == "bad_image"


# --- HTTP errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "code", "hint"),
    [
        (
            error_reply(400, "INVALID_ARGUMENT", "Invalid value at 'contents'"),
            "invalid_request",
            "Invalid value",
        ),
        (
            error_reply(
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
                [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}],
            ),
            "auth_failed",
            "GEMINI_API_KEY",
        ),
        (error_reply(403, "PERMISSION_DENIED", "Permission denied"), "auth_failed", "GEMINI_API_KEY"),
        (
            error_reply(404, "NOT_FOUND", "models/x is not found for API version v1"),
            "model_not_found",
            "v1beta",
        ),
        (rate_limit_reply(quota_id="GenerateRequestsPerDayPerProject"), "rate_limited", "tomorrow"),
    ],
    ids=["400", "400-bad-key", "403", "404", "429-per-day"],
)
async def test_permanent_http_errors_fail_at_once(make_manager, server, gemini, reply, code, hint):
    """400, 401/403, 404 and a per-day 429 fail on the first request with a message saying what
    to check."""
    server.add(reply)
    _, done = await run_one(make_manager, gemini())
    assert done.status is TaskStatus.FAILED and done.error.code == code
    assert hint in done.error.message and len(server.requests) == 1


@pytest.mark.parametrize(
    "reply",
    [
        error_reply(500, "INTERNAL", "An internal error has occurred."),
        error_reply(503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
        error_reply(504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
        HTML_502,
    ],
    ids=["500", "503", "504", "502-html"],
)
async def test_server_errors_are_retried(make_manager, server, gemini, reply):
    """5xx answers (JSON or HTML) are retried in the task layer, which then succeeds."""
    server.add(reply)
    tm, done = await run_one(make_manager, gemini())
    assert done.ok and done.attempts == 2 and len(server.requests) == 2
    events = await tm.events(done.id)
    assert events[1].kind == "retry" and events[1].detail.startswith("server_error")


async def test_server_errors_exhaust_attempts(make_manager, server, gemini):
    """Three 503s with max_attempts=3 fail the task as server_error, retryable."""
    server.add(*[error_reply(503, "UNAVAILABLE", "overloaded")] * 3)
    _, done = await run_one(make_manager, gemini())
    assert done.error.code == "server_error" and done.error.retryable and len(server.requests) == 3


async def test_rate_limit_waits_for_retry_delay(make_manager, server, gemini):
    """A 429 with RetryInfo.retryDelay is retried no sooner than that delay."""
    server.add(rate_limit_reply(retry_delay="0.4s"))
    _, done = await run_one(make_manager, gemini())
    assert done.ok and len(server.requests) == 2
    assert server.requests[1].at - server.requests[0].at >= 0.4


async def test_slow_answer_times_out_and_is_retried(make_manager, server, gemini):
    """An answer slower than the provider's timeout is a retryable timeout."""
    server.add(image_reply(delay=3))
    tm, done = await run_one(make_manager, gemini(timeout=0.5))
    assert done.ok and done.attempts == 2
    assert (await tm.events(done.id))[1].detail.startswith("timeout")


async def test_dropped_connection_is_a_retryable_connection_error(make_manager, server, gemini):
    """A connection closed without an answer is a connection_error, retried."""
    server.add(Reply(drop=True))
    tm, done = await run_one(make_manager, gemini())
    assert done.ok and done.attempts == 2
    assert (await tm.events(done.id))[1].detail.startswith("connection_error")


async def test_refused_connection_is_a_connection_error(make_manager):
    """Nothing listening at base_url: every attempt fails as connection_error."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provider = GeminiProvider(api_key=KEY, base_url=f"http://127.0.0.1:{port}", timeout=2)
    _, done = await run_one(make_manager, provider)
    assert done.error.code == "connection_error" and done.attempts == 3


# --- keys and configuration -------------------------------------------------------------------


async def test_the_key_never_reaches_the_database_logs_or_repr(make_manager, server, gemini, caplog, db_path):
    """The API key is absent from the database file, every log record and the provider's repr."""
    caplog.set_level(logging.DEBUG)
    provider = gemini()
    server.add(error_reply(503, "UNAVAILABLE", "overloaded"))
    tm, done = await run_one(make_manager, provider)
    assert done.ok
    assert KEY not in repr(provider) and "api_key=set" in repr(provider)
    await tm.aclose()
    for path in db_path.parent.glob("tasks.db*"):
        assert KEY.encode() not in path.read_bytes()
    assert KEY not in caplog.text


async def test_no_key_fails_at_open_with_how_to_fix(tmp_path):
    """A worker manager with a keyless GeminiProvider refuses to open and says how to set a key."""
    with pytest.raises(ConfigError, match="GEMINI_API_KEY"):
        async with TaskManager(tmp_path / "t.db", provider=GeminiProvider()):
            pass


async def test_submit_only_manager_needs_no_key(tmp_path):
    """workers=False validates against the model table without any key."""
    async with TaskManager(tmp_path / "t.db", provider=GeminiProvider(), workers=False) as tm:
        task = await tm.submit("x", model="gemini-3-pro-image-preview", size="4K", n=2)
        assert task.cost == 12  # 6 credits per 4K image
        with pytest.raises(ValidationError, match="size"):
            await tm.submit("x", model="gemini-2.5-flash-image", size="2K")
        with pytest.raises(ValidationError, match="model"):
            await tm.submit("x", model="gemini-9-ultra-image")


async def test_unknown_models_need_an_explicit_table_entry(make_manager, server, gemini):
    """A model id newer than the table is accepted only when passed as extra_models."""
    provider = gemini(extra_models=[ModelInfo("gemini-9-image", sizes=("1K",), price=7)])
    _tm, done = await run_one(make_manager, provider, model="gemini-9-image")
    assert done.ok and done.cost == 7
    assert server.requests[0].path == "/v1beta/models/gemini-9-image:generateContent"


async def test_key_comes_from_the_environment(monkeypatch, tmp_path):
    """With GEMINI_API_KEY set, TaskManager() defaults to GeminiProvider, and it starts."""
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    async with TaskManager(tmp_path / "t.db") as tm:
        assert isinstance(tm.provider, GeminiProvider)


def test_bad_provider_options_are_config_errors():
    """An unknown default model or a non-positive timeout is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="model"):
        GeminiProvider(model="dall-e")
    with pytest.raises(ConfigError, match="timeout"):
        GeminiProvider(timeout=0)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (TimeoutError(), "timeout"),  # what client.aio raises when aiohttp is installed
        (ConnectionResetError("reset"), "connection_error"),
        (ValueError("a bug"), None),
    ],
)
def test_transport_errors_of_every_client_are_classified(exc, code):
    """Builtin timeouts and connection errors (aiohttp's path) are typed; other errors are not."""
    from imagetask.providers.gemini import classify_transport_error

    result = classify_transport_error(exc)
    assert (result.code if result else None) == code
    if result is not None:
        assert result.retryable


def test_transport_errors_of_httpx_and_httpx2():
    """httpx and httpx2 timeouts and transport errors are typed and retryable."""
    import httpx
    import httpx2

    from imagetask.providers.gemini import classify_transport_error

    for module in (httpx, httpx2):
        assert classify_transport_error(module.ReadTimeout("slow")).code == "timeout"
        assert classify_transport_error(module.RemoteProtocolError("dropped")).code == "connection_error"


async def test_fake_provider_stands_in_for_gemini(make_manager):
    """FakeProvider(models=GEMINI_MODELS) accepts Gemini's model ids and refuses what Gemini
    would (the same aspect ratios, sizes, reference limits and prices), offline."""
    from imagetask import ValidationError
    from imagetask.providers import GEMINI_MODELS, FakeProvider

    provider = FakeProvider(models=GEMINI_MODELS)
    assert provider.default_model == "gemini-2.5-flash-image"
    tm = await make_manager(provider=provider)
    task = await tm.submit("production code, offline", model="gemini-3-pro-image-preview", size="4K", n=2)
    assert task.cost == GEMINI_MODELS["gemini-3-pro-image-preview"].price_for("4K") * 2
    done = await tm.wait(task.id, timeout=10)
    assert done.ok and done.model == "gemini-3-pro-image-preview" and len(done.images) == 2
    with pytest.raises(ValidationError) as info:
        await tm.submit("flash has one size", model="gemini-2.5-flash-image", size="4K")
    assert info.value.field == "size"
    with pytest.raises(ValidationError, match="unknown model 'fake'"):
        await tm.submit("not a gemini id", model="fake")


async def test_fake_provider_keeps_a_bounded_history():
    """FakeProvider keeps its latest 1,000 requests, not every one: a long offline run stays flat."""
    from imagetask.providers import FakeProvider
    from imagetask.providers.base import ImageRequest

    provider = FakeProvider(outcomes=["permanent"] * 1500)
    for i in range(1500):
        with pytest.raises(Exception, match="400"):
            await provider.generate(ImageRequest(prompt="p", model="fake", task_id=f"t{i}"))
    assert provider.calls == 1500 and len(provider.requests) == 1000
    assert provider.requests[0].task_id == "t500" and provider.requests[-1].task_id == "t1499"
