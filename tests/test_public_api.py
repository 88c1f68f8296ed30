"""The public names are a contract: this list changes only on purpose."""

from __future__ import annotations

import imagetask
import imagetask.providers


def test_top_level_exports():
    """imagetask exports exactly these names, sorted."""
    assert imagetask.__all__ == [
        "ConfigError",
        "Credits",
        "GenerationRequest",
        "ImageTaskError",
        "InsufficientCredits",
        "ProviderError",
        "PruneReport",
        "StoreError",
        "Task",
        "TaskError",
        "TaskManager",
        "TaskNotFound",
        "TaskStatus",
        "ValidationError",
        "WaitTimeout",
        "__version__",
    ]
    assert imagetask.__all__ == sorted(imagetask.__all__)
    for name in imagetask.__all__:
        assert hasattr(imagetask, name)


def test_provider_exports():
    """imagetask.providers exports the protocol, its records and the providers (ruff keeps the
    list sorted, constants first)."""
    assert imagetask.providers.__all__ == [
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
    for name in imagetask.providers.__all__:
        assert hasattr(imagetask.providers, name)


def test_public_classes_show_their_public_module():
    """Tracebacks and reprs say imagetask.X, not imagetask._private.X."""
    for name in imagetask.__all__:
        obj = getattr(imagetask, name)
        if isinstance(obj, type):
            assert obj.__module__ == "imagetask", name
    assert imagetask.providers.FakeProvider.__module__ == "imagetask.providers"


def test_errors_mix_in_the_builtins_callers_catch():
    """Errors derive from ImageTaskError and the builtin a caller would catch."""
    assert issubclass(imagetask.ValidationError, ValueError)
    assert issubclass(imagetask.TaskNotFound, LookupError)
    assert issubclass(imagetask.WaitTimeout, TimeoutError)
    for name in ("ConfigError", "InsufficientCredits", "ProviderError", "StoreError"):
        assert issubclass(getattr(imagetask, name), imagetask.ImageTaskError)


def test_fake_provider_satisfies_the_protocol():
    """FakeProvider is a Provider."""
    assert isinstance(imagetask.providers.FakeProvider(), imagetask.providers.Provider)


def test_typed_package():
    """The package ships py.typed."""
    from importlib.resources import files

    assert files("imagetask").joinpath("py.typed").is_file()
