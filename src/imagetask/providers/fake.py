"""FakeProvider: deterministic pictures drawn locally, for tests, demos and offline use."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import random
import textwrap
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from .._exceptions import ProviderError
from .base import GEMINI_ASPECT_RATIOS, ImageRequest, ImageResult, ModelInfo

__all__ = ["FakeProvider"]

#: Scripted outcomes `FakeProvider` understands, and what each does.
OUTCOMES = {
    "ok": "draw and return the picture",
    "transient": "raise a retryable server_error (like a 503)",
    "rate_limited": "raise a retryable rate_limited error (like a 429)",
    "permanent": "raise a non-retryable invalid_request error (like a 400)",
    "refusal": "raise safety_blocked (like finishReason IMAGE_SAFETY)",
    "no_image": "raise no_image (the model answered with text only)",
    "hang": "never answer (until the attempt times out or is cancelled)",
    "bad_image": "return bytes that are not an image",
}

#: How many of the latest requests `FakeProvider.requests` keeps.
HISTORY = 1000

_BASE_PIXELS = 128  # the 1K, 1:1 picture is 128 x 128: cheap to draw, encode and validate


class FakeProvider:
    """A provider that draws a deterministic picture of the prompt with Pillow.

    It serves the model ``"fake"`` at 1 credit per image and needs no network and no
    key. The same prompt (and image index) always gives the same picture. To run code
    written for Gemini offline, pass ``models=GEMINI_MODELS``: it then serves Gemini's
    model table (the same ids, aspect ratios, sizes, reference limits and prices), so the
    same requests validate and cost the same.

    Args:
        latency: Seconds each call takes before answering.
        outcomes: Scripted outcomes consumed one per call, in call order; when they run
            out every call succeeds. Each is a name from ``OUTCOMES`` (``"transient"``,
            ``"hang"``, ``"refusal"``, ...) or a `ProviderError` to raise.
        models: The model table to serve instead of ``"fake"`` (e.g. ``GEMINI_MODELS``);
            the first model is the default.

    Attributes:
        calls: How many times ``generate`` was called.
        requests: The latest requests received, in order (at most 1,000).
        max_active: The most calls that were in flight at once.
    """

    name = "fake"

    def __init__(
        self,
        latency: float = 0.0,
        outcomes: Iterable[str | ProviderError] = (),
        models: Mapping[str, ModelInfo] | None = None,
    ) -> None:
        if (
            isinstance(latency, bool)
            or not isinstance(latency, int | float)
            or not 0 <= latency < float("inf")
        ):
            raise ValueError(f"latency: must be a finite number of seconds >= 0, got {latency!r}")
        if models is not None and (not isinstance(models, Mapping) or not models):
            raise ValueError(
                "models: must be a non-empty mapping of model id to ModelInfo (e.g. GEMINI_MODELS)"
            )
        self.latency = latency
        self._outcomes: deque[str | ProviderError] = deque()
        self.script(*outcomes)
        self.calls = 0
        #: The latest requests (at most `HISTORY`): a long offline run stays flat in memory.
        self.requests: deque[ImageRequest] = deque(maxlen=HISTORY)
        self.active = 0
        self.max_active = 0
        self._models: dict[str, ModelInfo] = (
            dict(models)
            if models is not None
            else {
                "fake": ModelInfo(
                    "fake",
                    aspect_ratios=GEMINI_ASPECT_RATIOS,
                    sizes=("1K", "2K", "4K"),
                    max_reference_images=14,
                    price=1,
                )
            }
        )
        self._default = next(iter(self._models))

    def __repr__(self) -> str:
        return f"FakeProvider(latency={self.latency!r}, scripted={len(self._outcomes)})"

    @property
    def models(self) -> Mapping[str, ModelInfo]:
        """The models served: ``"fake"``, or the table given as ``models``."""
        return self._models

    @property
    def default_model(self) -> str:
        """``"fake"``, or the first model of the table given as ``models``."""
        return self._default

    def script(self, *outcomes: str | ProviderError) -> None:
        """Queue outcomes for the next calls, in order (see ``OUTCOMES``)."""
        for outcome in outcomes:
            if isinstance(outcome, str) and outcome not in OUTCOMES:
                raise ValueError(f"outcomes: unknown outcome {outcome!r}; use one of {', '.join(OUTCOMES)}")
            self._outcomes.append(outcome)

    async def start(self) -> None:
        """Nothing to check: the fake always works."""

    async def aclose(self) -> None:
        """Nothing to close."""

    async def generate(self, request: ImageRequest) -> ImageResult:
        """Draw one picture, or act out the next scripted outcome, after ``latency`` seconds.

        The picture is drawn in a thread while the latency elapses, so a call takes
        ``latency`` (not latency plus drawing time) and never blocks the event loop.
        """
        self.calls += 1
        self.requests.append(request)
        outcome = self._outcomes.popleft() if self._outcomes else "ok"
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if outcome == "hang":
                await asyncio.Event().wait()  # forever, until the attempt is cancelled
            if outcome != "ok":
                if self.latency:
                    await asyncio.sleep(self.latency)
                return self._act(outcome, request)
            drawing = asyncio.get_running_loop().run_in_executor(
                None, draw, request.prompt, request.aspect_ratio, request.size, request.index
            )
            try:
                if self.latency:
                    await asyncio.sleep(self.latency)
                data = await drawing
            except BaseException:
                drawing.cancel()  # not started yet: never runs; else its result is dropped
                raise
            return ImageResult(
                data, "image/png", {"finish_reason": "STOP", "model_version": "fake-1", "text": None}
            )
        finally:
            self.active -= 1

    def _act(self, outcome: str | ProviderError, request: ImageRequest) -> ImageResult:
        if isinstance(outcome, ProviderError):
            raise outcome
        if outcome == "transient":
            raise ProviderError(
                "server_error", "503 UNAVAILABLE: the fake model is overloaded", retryable=True
            )
        if outcome == "rate_limited":
            raise ProviderError(
                "rate_limited", "429 RESOURCE_EXHAUSTED: fake quota", retryable=True, retry_after=0.0
            )
        if outcome == "permanent":
            raise ProviderError("invalid_request", "400 INVALID_ARGUMENT: the fake rejects this request")
        if outcome == "refusal":
            raise ProviderError("safety_blocked", "finish reason IMAGE_SAFETY: the fake refuses to draw this")
        if outcome == "no_image":
            raise ProviderError("no_image", "the fake answered with text only", retryable=False)
        if outcome == "bad_image":
            return ImageResult(b"this is not an image", "image/png", {"finish_reason": "STOP"})
        raise AssertionError(f"unhandled outcome {outcome!r}")


@functools.cache
def _font() -> Any:
    from PIL import ImageFont

    return ImageFont.load_default()


def draw(prompt: str, aspect_ratio: str | None, size: str | None, index: int = 0) -> bytes:
    """A deterministic PNG picture of ``prompt``."""
    from PIL import Image, ImageDraw

    w_ratio, h_ratio = (int(x) for x in (aspect_ratio or "1:1").split(":"))
    scale = {"2K": 2, "4K": 4}.get(size or "1K", 1)
    side = _BASE_PIXELS * scale
    if w_ratio >= h_ratio:
        width, height = side * w_ratio // h_ratio, side
    else:
        width, height = side, side * h_ratio // w_ratio
    seed = hashlib.sha256(f"{prompt}\x00{index}".encode()).digest()
    rng = random.Random(seed)
    bg = tuple(rng.randrange(40, 200) for _ in range(3))
    img = Image.new("RGB", (width, height), bg)
    pen = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(side // 16, side // 4)
        color = tuple(rng.randrange(256) for _ in range(3))
        pen.ellipse((x - r, y - r, x + r, y + r), fill=color)
    text = "\n".join(textwrap.wrap(prompt, width=max(12, width // 7))[:4])
    pen.multiline_text((4, 4), text, fill=(255, 255, 255), font=_font())
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # fast to encode; size does not matter here
    return buf.getvalue()
