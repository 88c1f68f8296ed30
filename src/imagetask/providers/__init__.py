"""Image generation backends: the `Provider` protocol and the built-in providers."""

from __future__ import annotations

from .._exceptions import ProviderError as ProviderError
from .base import ImageRequest as ImageRequest
from .base import ImageResult as ImageResult
from .base import ModelInfo as ModelInfo
from .base import Provider as Provider
from .base import ReferenceImage as ReferenceImage
from .fake import FakeProvider as FakeProvider
from .gemini import GEMINI_MODELS as GEMINI_MODELS
from .gemini import GeminiProvider as GeminiProvider

__all__ = [
    "GEMINI_MODELS",
    "FakeProvider",
    "GeminiProvider",
    "ImageRequest",
    "ImageResult",
    "ModelInfo",
    "Provider",
    "ProviderError",
    "ReferenceImage",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) and _obj.__module__.startswith("imagetask.providers."):
        _obj.__module__ = "imagetask.providers"
del _name, _obj
