"""GeminiProvider: Google's Gemini image models ("Nano Banana") through google-genai.

Every way a call can end becomes either one image or a `ProviderError` with a precise code
(docs/providers.md lists each rule and why). google-genai's own retries stay off:
retries happen in the task layer, where they are durable and logged. Nothing above this
module imports google-genai.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .. import _config
from .._exceptions import ConfigError, ProviderError
from .base import GEMINI_ASPECT_RATIOS, ImageRequest, ImageResult, ModelInfo

if TYPE_CHECKING:
    from google import genai

__all__ = ["GEMINI_MODELS", "GeminiProvider"]

log = logging.getLogger("imagetask")

#: The image models imagetask knows, with what each accepts and its price in credits per
#: image. Prices are relative units, roughly following Google's per-image prices (Flash about
#: $0.04, Pro about $0.13 at 1K/2K and $0.24 at 4K). Capabilities of the newer ids are taken
#: from Google's documentation and not verified against the live API.
_PRO = {"sizes": ("1K", "2K", "4K"), "max_reference_images": 14, "price": 3, "size_prices": {"4K": 6}}
GEMINI_MODELS: dict[str, ModelInfo] = {
    m.id: m
    for m in (
        ModelInfo("gemini-2.5-flash-image", GEMINI_ASPECT_RATIOS, (), max_reference_images=3, price=1),
        ModelInfo("gemini-3-pro-image-preview", GEMINI_ASPECT_RATIOS, **_PRO),  # type: ignore[arg-type]
        ModelInfo("gemini-3-pro-image", GEMINI_ASPECT_RATIOS, **_PRO),  # type: ignore[arg-type]
        ModelInfo(
            "gemini-3.1-flash-image-preview",
            GEMINI_ASPECT_RATIOS,
            ("1K", "2K", "4K"),
            max_reference_images=14,
            price=2,
            size_prices={"4K": 4},
        ),
    )
}

#: Finish reasons and prompt block reasons that mean "refused for its content".
SAFETY_REASONS = frozenset(
    {
        "SAFETY",
        "IMAGE_SAFETY",
        "PROHIBITED_CONTENT",
        "IMAGE_PROHIBITED_CONTENT",
        "BLOCKLIST",
        "SPII",
        "RECITATION",
        "IMAGE_RECITATION",
    }
)
_RETRYABLE_HTTP = {408: "timeout", 429: "rate_limited", 500: "server_error", 502: "server_error",
                   503: "server_error", 504: "server_error"}  # fmt: skip


class GeminiProvider:
    """Gemini image generation over google-genai's async client.

    Args:
        api_key: The key. Default: ``GOOGLE_API_KEY``, else ``GEMINI_API_KEY`` (google-genai's
            precedence). It is never logged, stored or shown in a repr.
        model: The default model for tasks that name none.
        base_url: Another endpoint (a proxy, or a fake server in tests).
        api_version: The API version; preview image models are served on ``v1beta``.
        timeout: Seconds one HTTP call may take (google-genai waits forever by default). The
            manager's ``attempt_timeout`` bounds the whole attempt on top of this.
        extra_models: More `ModelInfo` entries, for model ids newer than this release;
            ``submit`` refuses ids that are in neither table.
    """

    name = "gemini"

    def __init__(
        self,
        api_key: str | None = None,
        *,
        model: str = "gemini-2.5-flash-image",
        base_url: str | None = None,
        api_version: str = "v1beta",
        timeout: float = 180.0,
        extra_models: Iterable[ModelInfo] = (),
    ) -> None:
        self._models = {**GEMINI_MODELS, **{m.id: m for m in extra_models}}
        if model not in self._models:
            raise ConfigError(
                f"model: unknown Gemini image model {model!r}; known: {', '.join(self._models)}. "
                "Pass extra_models=[ModelInfo(...)] to use a newer one."
            )
        if not timeout > 0:
            raise ConfigError(f"timeout: must be a number of seconds > 0, got {timeout!r}")
        self._api_key = api_key.strip() if api_key else None
        self._model = model
        self.base_url = base_url
        self.api_version = api_version
        self.timeout = float(timeout)
        self._client: genai.Client | None = None

    def __repr__(self) -> str:
        key = "set" if self._key() else "missing"
        return (
            f"GeminiProvider(model={self._model!r}, api_version={self.api_version!r}, "
            f"base_url={self.base_url!r}, api_key={key})"
        )

    @property
    def models(self) -> Mapping[str, ModelInfo]:
        """The image models served, by id."""
        return self._models

    @property
    def default_model(self) -> str:
        """The model for tasks that name none."""
        return self._model

    @staticmethod
    def key_in_environment() -> str | None:
        """The name of the environment variable that holds a Gemini API key
        (``GOOGLE_API_KEY`` first, as google-genai reads them), or None; never the key itself."""
        for name in _config.API_KEY_ENVS:
            if os.environ.get(name, "").strip():
                return name
        return None

    def _key(self) -> str | None:
        return self._api_key or _config.api_key_from_env()

    async def start(self) -> None:
        """Check that a key is available (the client itself is made on first use).

        Raises:
            ConfigError: no key was given or found in the environment.
        """
        if not self._key():
            raise ConfigError(
                "GeminiProvider has no API key: set GEMINI_API_KEY (or GOOGLE_API_KEY), or pass "
                "GeminiProvider(api_key=...). To run offline, use FakeProvider()."
            )

    def _get_client(self) -> genai.Client:
        if self._client is None:
            from google import genai
            from google.genai import types

            key = self._key()
            if not key:
                raise ProviderError("auth_failed", "no API key: set GEMINI_API_KEY or pass api_key=")
            self._client = genai.Client(
                api_key=key,
                http_options=types.HttpOptions(
                    base_url=self.base_url,
                    api_version=self.api_version,
                    timeout=math.ceil(self.timeout * 1000),  # google-genai wants milliseconds
                    retry_options=None,  # retries live in the task layer
                ),
            )
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP clients."""
        client, self._client = self._client, None
        if client is not None:
            await client.aio.aclose()
            client.close()

    async def generate(self, request: ImageRequest) -> ImageResult:
        """Make one image, or raise `ProviderError` saying precisely why not."""
        from google.genai import errors, types

        client = self._get_client()
        contents: list[Any] = [request.prompt]
        contents += [types.Part.from_bytes(data=ref.data, mime_type=ref.mime) for ref in request.references]
        image_config = None
        if request.aspect_ratio or request.size:
            image_config = types.ImageConfig(aspect_ratio=request.aspect_ratio, image_size=request.size)
        config = types.GenerateContentConfig(
            response_modalities=["TEXT", "IMAGE"],
            image_config=image_config,
            candidate_count=None,  # >1 is refused by image models: n images are n calls
        )
        try:
            response = await client.aio.models.generate_content(
                model=request.model, contents=contents, config=config
            )
        except errors.APIError as exc:
            raise classify_api_error(exc, request.model, self.api_version) from None
        except Exception as exc:
            transport = classify_transport_error(exc)
            if transport is None:
                raise
            raise transport from None
        return classify_response(response)


def classify_api_error(exc: Any, model: str, api_version: str) -> ProviderError:
    """Turn a google-genai ``APIError`` (an HTTP error answer) into a `ProviderError`."""
    code = int(getattr(exc, "code", 0) or 0)
    status = getattr(exc, "status", None) or ""
    message = getattr(exc, "message", None) or str(exc)
    body = getattr(exc, "details", None)
    details = _error_details(body)
    where = f"HTTP {code} {status}".strip()
    if code == 429:
        if _per_day_quota(details):
            return ProviderError(
                "rate_limited",
                f"{where}: the daily quota is used up ({message}); it resets tomorrow, so this "
                "task is not retried",
                retryable=False,
            )
        return ProviderError(
            "rate_limited", f"{where}: {message}", retryable=True, retry_after=_retry_after(exc, details)
        )
    if code in _RETRYABLE_HTTP:
        return ProviderError(_RETRYABLE_HTTP[code], f"{where}: {message}", retryable=True)
    if code >= 500:
        return ProviderError("server_error", f"{where}: {message}", retryable=True)
    if code in (401, 403) or (code == 400 and _invalid_key(message, details)):
        return ProviderError(
            "auth_failed",
            f"{where}: {message} (check GEMINI_API_KEY: is it valid, and enabled for this API?)",
        )
    if code == 404:
        return ProviderError(
            "model_not_found",
            f"{where}: {message} (is {model!r} served on API version {api_version!r}? preview "
            "image models need 'v1beta')",
        )
    return ProviderError("invalid_request", f"{where}: {message}")


def classify_transport_error(exc: BaseException) -> ProviderError | None:
    """Timeouts and connection failures of any transport google-genai may use
    (httpx2 by default, httpx, or aiohttp when it is installed); None for other errors."""
    timeouts: list[type[BaseException]] = [TimeoutError]
    transports: list[type[BaseException]] = [ConnectionError]
    # (module, its timeout base class, its transport/connection base class)
    for module_name, timeout_name, transport_name in (
        ("httpx2", "TimeoutException", "TransportError"),
        ("httpx", "TimeoutException", "TransportError"),
        ("aiohttp", "ServerTimeoutError", "ClientError"),
    ):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        timeouts.append(getattr(module, timeout_name))
        transports.append(getattr(module, transport_name))
    name = type(exc).__name__
    if isinstance(exc, tuple(timeouts)):
        return ProviderError("timeout", f"the request timed out ({name})", retryable=True)
    if isinstance(exc, tuple(transports)):
        return ProviderError("connection_error", f"{name}: {exc}", retryable=True)
    return None


def classify_response(response: Any) -> ImageResult:
    """Take the last non-thought image of a 200 answer, or say precisely why there is none."""
    feedback = getattr(response, "prompt_feedback", None)
    block = _enum_name(getattr(feedback, "block_reason", None))
    if block:
        detail = getattr(feedback, "block_reason_message", None) or ""
        raise ProviderError(
            "safety_blocked", f"the prompt was blocked ({block}){': ' + detail if detail else ''}"
        )
    candidates = getattr(response, "candidates", None) or []
    if not candidates:
        raise ProviderError("no_image", "the answer had no candidates and no block reason", retryable=True)
    candidate = candidates[0]
    finish = _enum_name(getattr(candidate, "finish_reason", None))
    parts = getattr(getattr(candidate, "content", None), "parts", None) or []
    texts = [p.text for p in parts if getattr(p, "text", None) and not getattr(p, "thought", False)]
    images = [
        p.inline_data
        for p in parts
        if getattr(p, "inline_data", None) is not None
        and getattr(p.inline_data, "data", None)
        and not getattr(p, "thought", False)
    ]
    text = "\n".join(texts) or None
    said = f": {text}" if text else ""
    if finish in SAFETY_REASONS:
        raise ProviderError("safety_blocked", f"finish reason {finish}{said}")
    if not images:
        reason = f"finish reason {finish}" if finish else "no finish reason"
        raise ProviderError(
            "no_image", f"the model answered without an image ({reason}){said}", retryable=True
        )
    final = images[-1]
    usage = getattr(response, "usage_metadata", None)
    provenance = {
        "finish_reason": finish,
        "model_version": getattr(response, "model_version", None),
        "response_id": getattr(response, "response_id", None),
        "usage": usage.model_dump(mode="json", exclude_none=True) if usage is not None else None,
        "text": text,
        "thought_images": sum(
            1 for p in parts if getattr(p, "thought", False) and getattr(p, "inline_data", None)
        ),
    }
    return ImageResult(data=final.data, mime=final.mime_type or "image/png", provenance=provenance)


def _enum_name(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "name", None) or getattr(value, "value", None) or value)


def _error_details(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, dict):
        error = body.get("error", body)
        details = error.get("details") if isinstance(error, dict) else None
        if isinstance(details, list):
            return [d for d in details if isinstance(d, dict)]
    return []


def _per_day_quota(details: list[dict[str, Any]]) -> bool:
    for detail in details:
        for violation in detail.get("violations", []) or []:
            if isinstance(violation, dict) and "PerDay" in str(violation.get("quotaId", "")):
                return True
    return False


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


def _retry_after(exc: Any, details: list[dict[str, Any]]) -> float | None:
    """The server's requested delay: RetryInfo.retryDelay ("47s"), else a Retry-After header."""
    for detail in details:
        if str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            m = _DURATION.match(str(detail.get("retryDelay", "")))
            if m:
                return float(m.group(1))
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is not None:
        value = headers.get("retry-after")
        if value:
            try:
                return float(value)
            except ValueError:
                return None
    return None


def _invalid_key(message: str, details: list[dict[str, Any]]) -> bool:
    if "API key not valid" in message or "API_KEY_INVALID" in message:
        return True
    return any(d.get("reason") == "API_KEY_INVALID" for d in details)
