"""The provider protocol: what imagetask needs from an image generation backend."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import attrs

from .._exceptions import ProviderError

__all__ = ["ImageRequest", "ImageResult", "ModelInfo", "Provider", "ProviderError", "ReferenceImage"]

#: Aspect ratios the Gemini image models document.
GEMINI_ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")


@attrs.frozen
class ModelInfo:
    """One model a provider serves, and what it accepts.

    Attributes:
        id: The model id passed to the API (``"gemini-2.5-flash-image"``).
        aspect_ratios: Accepted ``aspect_ratio`` values.
        sizes: Accepted ``size`` values (``"1K"``, ``"2K"``, ``"4K"``); empty when the
            model takes no size option.
        max_reference_images: How many reference images one request may carry.
        price: Credits charged per generated image.
        size_prices: Credits per image for particular sizes, where they differ from
            ``price`` (``{"4K": 8}``).
    """

    id: str
    aspect_ratios: tuple[str, ...] = GEMINI_ASPECT_RATIOS
    sizes: tuple[str, ...] = ()
    max_reference_images: int = 3
    price: int = 1
    size_prices: Mapping[str, int] = attrs.field(factory=dict)

    def price_for(self, size: str | None) -> int:
        """Credits per image at ``size`` (None: the model's default size)."""
        if size is None:
            return self.price
        return self.size_prices.get(size, self.price)


@attrs.frozen
class ReferenceImage:
    """A reference image to send with a request (bytes as stored, and their MIME type)."""

    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")
    mime: str


@attrs.frozen
class ImageRequest:
    """One call to a provider: it asks for exactly one image.

    Attributes:
        prompt: The text prompt.
        model: A model id from the provider's table.
        aspect_ratio: Requested aspect ratio, or None for the model's default.
        size: Requested size, or None for the model's default.
        references: Reference images, in the order given to ``submit``.
        task_id: The task this call belongs to (for logs and provenance).
        attempt: The attempt number of the task.
        index: Which of the task's ``n`` images this is.
    """

    prompt: str
    model: str
    aspect_ratio: str | None = None
    size: str | None = None
    references: tuple[ReferenceImage, ...] = ()
    task_id: str = ""
    attempt: int = 1
    index: int = 0


@attrs.frozen
class ImageResult:
    """What one successful call returned.

    Attributes:
        data: The image bytes (validated with Pillow by imagetask before storing).
        mime: The MIME type the provider claimed.
        provenance: What explains this image later: finish reason, model version,
            response id, token usage, any text the model returned.
    """

    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")
    mime: str = "image/png"
    provenance: Mapping[str, Any] = attrs.field(factory=dict)


@runtime_checkable
class Provider(Protocol):
    """An image generation backend.

    ``generate`` makes one image per call or raises `ProviderError` with a code from
    ``Task.error.code`` and whether a retry may help. Providers create their network
    clients lazily, so a process that only submits and polls needs no credentials;
    ``start`` is called when a manager is about to run workers and must raise
    `imagetask.ConfigError` if the provider cannot work (no API key, say).
    """

    name: str

    @property
    def models(self) -> Mapping[str, ModelInfo]:
        """The models served, by id."""
        ...

    @property
    def default_model(self) -> str:
        """The model used when ``submit`` names none."""
        ...

    async def start(self) -> None:
        """Check the provider can run; raise ConfigError if not."""
        ...

    async def generate(self, request: ImageRequest) -> ImageResult:
        """Generate one image."""
        ...

    async def aclose(self) -> None:
        """Release network clients."""
        ...
