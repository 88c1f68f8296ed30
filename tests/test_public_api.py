"""The public names are a contract: this list changes only on purpose."""

from __future__ import annotations

import pytest

import imagetask
import imagetask.providers


def test_top_level_exports():
    """imagetask exports exactly these names, sorted."""
    assert imagetask.__all__ == [
        "ConfigError",
        "Credits",
        "Feed",
        "GenerationRequest",
        "Health",
        "ImageTaskError",
        "InsufficientCredits",
        "ProviderError",
        "PruneReport",
        "RemoteCredits",
        "RemoteTaskManager",
        "StoreError",
        "SyncCredits",
        "SyncRemoteTaskManager",
        "SyncTaskManager",
        "Task",
        "TaskError",
        "TaskEvent",
        "TaskManager",
        "TaskNotFound",
        "TaskStatus",
        "TokenInfo",
        "Tokens",
        "TooManyPending",
        "ValidationError",
        "WaitTimeout",
        "__version__",
        "default_home",
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


def test_the_fast_task_builder_matches_init():
    """The builder the read path uses gives a Task equal to the one attrs' __init__ builds, with
    every field set (so a field added to Task cannot be silently left out), still frozen,
    picklable and evolvable."""
    import pickle
    from datetime import UTC, datetime

    import attrs
    import pytest

    from imagetask import Task, TaskError, TaskStatus
    from imagetask._models import _build_task

    fields = attrs.fields(Task)
    values = [f"value of {f.name}" for f in fields]
    as_dict = attrs.asdict(
        _build_task(**{f.name: v for f, v in zip(fields, values, strict=True)}), recurse=False
    )
    assert as_dict == {f.name: v for f, v in zip(fields, values, strict=True)}
    real = dict(
        id="01ABC", owner="alice", prompt="p", model="fake", params={"n": 1}, status=TaskStatus.FAILED,
        images=(), references=(), error=TaskError("timeout", "slow", True), attempts=2, max_attempts=3,
        cost=1, metadata={"k": "v"}, idempotency_key="key", created_at=datetime.now(UTC),
        started_at=None, finished_at=datetime.now(UTC),
    )  # fmt: skip
    built = _build_task(**real)
    assert built == Task(**real)
    # It behaves as any Task: frozen, picklable, and evolve() works on it.
    assert pickle.loads(pickle.dumps(built)) == built
    assert attrs.evolve(built, prompt="q").prompt == "q"
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        built.prompt = "changed"  # type: ignore[misc]
    # The submit's snapshot builder: the same task, with the fields a new task lacks fixed.
    from imagetask._models import _build_queued

    unset = {"status", "images", "error", "attempts", "started_at", "finished_at"}
    queued = _build_queued(**{k: v for k, v in real.items() if k not in unset})
    assert queued == Task(**{**real, "status": TaskStatus.QUEUED, "images": (), "error": None,
                             "attempts": 0, "started_at": None, "finished_at": None})  # fmt: skip


def test_the_testing_module_exports_the_fault_hook():
    """imagetask.testing exports Faults and its operation names; an unknown operation or a bad
    count is refused when planned, not ignored."""
    import imagetask.testing as testing

    assert testing.__all__ == ["OPERATIONS", "Faults"]
    assert {"submit", "claim", "heartbeat", "succeed", "write_image"} <= testing.OPERATIONS
    faults = testing.Faults()
    with pytest.raises(ValueError, match="operation"):
        faults.fail("commit", RuntimeError("x"))
    with pytest.raises(ValueError, match="times"):
        faults.fail("claim", RuntimeError("x"), times=0)
    assert repr(faults) == "Faults(planned={})"
