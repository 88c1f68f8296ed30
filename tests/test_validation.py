"""Bad input to submit() is a ValidationError naming the field, and nothing is written."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from imagetask import ValidationError
from imagetask._config import MAX_REFERENCE_BYTES

from conftest import sql


def _big_png() -> bytes:
    # Random pixels do not compress: a PNG over the 20 MB limit.
    import os

    img = Image.frombytes("RGB", (2700, 2700), os.urandom(2700 * 2700 * 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=0)
    data = buf.getvalue()
    assert len(data) > MAX_REFERENCE_BYTES
    return data


def nested(depth: int) -> list[object]:
    """A list nested ``depth`` levels deep, built without recursion."""
    value: list[object] = []
    for _ in range(depth - 1):
        value = [value]
    return value


#: 100,000 levels: json.dumps alone would raise RecursionError.
DEEP = nested(100_000)

CASES = [
    ("prompt", {"prompt": ""}),
    ("prompt", {"prompt": "   \n\t"}),
    ("prompt", {"prompt": "x" * 10_001}),
    ("prompt", {"prompt": 42}),
    ("n", {"n": 0}),
    ("n", {"n": 9}),
    ("n", {"n": "2"}),
    ("n", {"n": True}),
    ("model", {"model": "imagen-99"}),
    ("aspect_ratio", {"aspect_ratio": "7:3"}),
    ("size", {"size": "8K"}),
    ("size", {"size": "1k"}),
    ("owner", {"owner": ""}),
    ("owner", {"owner": "o" * 201}),
    ("idempotency_key", {"idempotency_key": ""}),
    ("idempotency_key", {"idempotency_key": "k" * 201}),
    ("metadata", {"metadata": {"when": object()}}),
    ("metadata", {"metadata": "not a dict"}),
    ("metadata", {"metadata": {1: 0}}),
    ("metadata", {"metadata": {"inner": {("a", "tuple"): 0}}}),
    ("metadata", {"metadata": {"deep": DEEP}}),
    ("metadata", {"metadata": {"just_too_deep": nested(32)}}),
    ("metadata", {"metadata": {"big": "x" * 70_000}}),
    ("prompt", {"prompt": "a lone \udc80 surrogate"}),
    ("owner", {"owner": "nul\x00inside"}),
    ("images[0]", {"images": [b"definitely not an image"]}),
    ("images[1]", {"images": [None, None]}),
    ("images[0]", {"images": ["/no/such/file.png"]}),
    ("images", {"images": 42}),
]


@pytest.mark.parametrize(("field", "kwargs"), CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
async def test_bad_input_names_the_field_and_writes_nothing(make_manager, field, kwargs):
    """Each bad argument raises ValidationError for that field; no row and no file appear."""
    tm = await make_manager(workers=False, credits=True)
    kwargs = {"prompt": "fine", **kwargs}
    if kwargs.get("images") == [None, None]:
        kwargs["images"] = [_png(), None]
    prompt = kwargs.pop("prompt")
    with pytest.raises(ValidationError) as err:
        await tm.submit(prompt, **kwargs)
    assert err.value.field == field
    assert isinstance(err.value, ValueError)
    assert str(err.value).startswith(f"{field}: ")
    assert sql(tm.path, "SELECT count(*) FROM tasks") == [(0,)]
    assert sql(tm.path, "SELECT count(*) FROM ledger") == [(0,)]
    assert not tm.images_root.exists() or list(tm.images_root.rglob("*.*")) == []


BATCH_CASES = [(f, kw) for f, kw in CASES if "images" not in kw]


@pytest.mark.parametrize(
    ("field", "kwargs"), BATCH_CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BATCH_CASES)]
)
async def test_a_bad_request_after_good_ones_fails_the_whole_batch(make_manager, field, kwargs):
    """In submit_many, a bad request after valid ones of the same model and size (whose checks
    are shared across the batch) still names its index and field, and nothing is written."""
    tm = await make_manager(workers=False, credits=True)
    await tm.credits.grant("alice", 100)
    good = {"prompt": "fine", "n": 1, "owner": "alice"}
    with pytest.raises(ValidationError) as err:
        await tm.submit_many([good, {**good, **kwargs}, good])
    assert err.value.field == f"requests[1].{field}"
    assert sql(tm.path, "SELECT count(*) FROM tasks") == [(0,)]


async def test_oversized_reference_image_is_refused(make_manager, tmp_path):
    """A reference image over 20 MB, as a file or as bytes, is refused before it is copied."""
    tm = await make_manager(workers=False)
    data = _big_png()
    path = tmp_path / "big.png"
    path.write_bytes(data)
    for images in ([path], [data]):
        with pytest.raises(ValidationError, match="20 MB") as err:
            await tm.submit("edit", images=images)
        assert err.value.field == "images[0]"
    assert sql(tm.path, "SELECT count(*) FROM tasks") == [(0,)]


async def test_too_many_reference_images_for_the_model(make_manager):
    """More reference images than the model accepts is refused, naming the limit."""
    tm = await make_manager(workers=False)
    with pytest.raises(ValidationError, match="at most 14") as err:
        await tm.submit("edit", images=[_png()] * 15)
    assert err.value.field == "images"


async def test_other_image_formats_are_converted_to_png(make_manager):
    """A decodable GIF or BMP reference image is stored as PNG rather than refused."""
    tm = await make_manager(workers=False)
    buf = io.BytesIO()
    Image.new("RGB", (5, 5), "blue").save(buf, format="BMP")
    task = await tm.submit("edit", images=[buf.getvalue()])
    assert task.references[0].mime == "image/png"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    return buf.getvalue()


async def test_list_and_wait_arguments_are_validated(make_manager):
    """list() rejects an unknown status or bad limit; wait() a negative timeout."""
    tm = await make_manager(workers=False)
    with pytest.raises(ValidationError, match="status"):
        await tm.list(status="done")
    with pytest.raises(ValidationError, match="limit"):
        await tm.list(limit=0)
    with pytest.raises(ValidationError, match="timeout"):
        await tm.wait("x", timeout=-1)


async def test_metadata_as_deep_as_allowed_round_trips(make_manager):
    """Metadata nested 32 levels deep (the limit) with string keys is stored and read back
    exactly."""
    tm = await make_manager(workers=False)
    innermost = nested(31)
    deepest = innermost
    while deepest:
        deepest = deepest[0]  # type: ignore[assignment]
    deepest.append(1)  # a plain value inside the 32nd level is not a 33rd
    metadata = {"k": innermost, "unicode": "caf\u00e9 \U0001f600"}
    task = await tm.submit("fine", metadata=metadata)
    assert (await tm.poll(task.id)).metadata == metadata


@pytest.mark.parametrize("amount", [0, True, 1.5, "5", 10**12 + 1, -(10**12) - 1, 2**63, 2**62], ids=repr)
async def test_credit_grants_outside_the_range_are_validation_errors(make_manager, amount):
    """A grant must be a non-zero integer within -10**12..10**12; anything else is a
    ValidationError naming ``amount`` and leaves the ledger untouched."""
    tm = await make_manager(workers=False, credits=True)
    with pytest.raises(ValidationError) as info:
        await tm.credits.grant("alice", amount)
    assert info.value.field == "amount"
    assert sql(tm.path, "SELECT count(*) FROM ledger") == [(0,)]


async def test_a_balance_never_leaves_its_range(make_manager):
    """Two grants that would together pass 10**12 are refused at the second one: the balance
    stays an integer equal to its ledger, never a float or an overflow."""
    tm = await make_manager(workers=False, credits=True)
    assert await tm.credits.grant("alice", 10**12) == 10**12
    with pytest.raises(ValidationError, match="past the limit"):
        await tm.credits.grant("alice", 1)
    assert await tm.credits.balance("alice") == 10**12
    assert sql(tm.path, "SELECT typeof(balance), balance FROM accounts") == [("integer", 10**12)]


async def test_owners_follow_one_rule_everywhere(make_manager):
    """grant, balance, pending and list refuse an owner submit refuses (NUL, empty, too long)."""
    tm = await make_manager(workers=False, credits=True)
    for owner in ("nul\x00inside", "", "o" * 201):
        for call in (
            tm.credits.grant(owner, 1), tm.credits.balance(owner), tm.pending(owner), tm.list(owner=owner),
        ):  # fmt: skip
            with pytest.raises(ValidationError) as info:
                await call
            assert info.value.field == "owner"


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e20, -1, 2**2000], ids=lambda v: repr(v)[:12])
async def test_durations_are_finite_and_bounded(make_manager, value):
    """prune's older_than and wait's timeout refuse infinite, NaN, negative and absurdly large
    durations with a ValidationError; manager options refuse them with a ConfigError."""
    from imagetask import ConfigError, TaskManager

    tm = await make_manager(workers=False)
    with pytest.raises(ValidationError) as info:
        await tm.prune(value)
    assert info.value.field == "older_than"
    with pytest.raises(ValidationError) as info:
        await tm.wait("01ARZ3NDEKTSV4RRFFQ69G5FAV", timeout=value)
    assert info.value.field == "timeout"
    for option in ("lease", "attempt_timeout", "poll_interval", "retry_delay", "storage_timeout"):
        with pytest.raises(ConfigError, match=option):
            TaskManager(tm.path, **{option: value})


async def test_list_arguments_refuse_a_string_or_none(make_manager):
    """submit_many and as_completed take lists: None or a bare string is a ValidationError,
    not a raw TypeError or an iteration over letters."""
    tm = await make_manager(workers=False)
    for bad in (None, "ABC"):
        with pytest.raises(ValidationError) as info:
            await tm.submit_many(bad)
        assert info.value.field == "requests"
        with pytest.raises(ValidationError) as info:
            async for _ in tm.as_completed(bad):
                pass
        assert info.value.field == "ids"


async def test_a_lease_too_short_to_renew_is_refused(tmp_path):
    """A lease under 0.1 s (stored in milliseconds, renewed every third of it) is a ConfigError."""
    from imagetask import ConfigError, TaskManager

    with pytest.raises(ConfigError, match="lease"):
        TaskManager(tmp_path / "t.db", lease=0.0004)


@pytest.mark.parametrize("bad", ["lone \ud800 surrogate", "nul\x00inside"], ids=["surrogate", "nul"])
async def test_unusable_paths_are_refused_by_name(make_manager, tmp_path, bad):
    """A reference image path, a database path or an image folder with a lone surrogate or a NUL
    is refused naming it (ValidationError for images[i], ConfigError for an option)."""
    from imagetask import ConfigError, TaskManager

    tm = await make_manager(workers=False)
    with pytest.raises(ValidationError) as info:
        await tm.submit("fine", images=[str(tmp_path / f"{bad}.png")])
    assert info.value.field == "images[0]"
    assert await tm.list() == []
    with pytest.raises(ConfigError, match="path"):
        TaskManager(tmp_path / f"{bad}.db")
    with pytest.raises(ConfigError, match="images"):
        TaskManager(tmp_path / "t.db", images=tmp_path / bad)


def test_the_file_system_root_is_refused_as_the_image_folder(tmp_path):
    """images="/" is refused naming the option (the thumbnail cache beside it has no place, and
    prune would fail after deleting rows); nothing is created."""
    from imagetask import ConfigError, TaskManager

    with pytest.raises(ConfigError, match=r"^images: / is the root of the file system"):
        TaskManager(tmp_path / "t.db", images="/")
    assert list(tmp_path.iterdir()) == []


def test_a_decompression_bomb_is_refused_before_decoding():
    """A small PNG that would decode to 144 megapixels is refused from its header."""
    import zlib

    from imagetask._images import read_reference

    width = height = 12_000
    # A 1-bit greyscale PNG of 12,000 x 12,000 zeros: about 20 KB on disk.
    row = b"\x00" + b"\x00" * (width // 8)
    raw = zlib.compress(row * height, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    assert len(png) < 1_000_000
    with pytest.raises(ValidationError, match="megapixels") as info:
        read_reference(png, 0)
    assert info.value.field == "images[0]"


async def test_a_file_that_is_not_an_image_is_named_in_the_error(make_manager, tmp_path):
    """A reference path that is not an image is refused naming the file, not a memory address."""
    path = tmp_path / "notes.txt"
    path.write_text("not a picture")
    tm = await make_manager(workers=False)
    with pytest.raises(ValidationError) as info:
        await tm.submit("fine", images=[path])
    assert str(path) in str(info.value) and "0x" not in str(info.value)


async def test_an_eps_reference_is_refused_without_reaching_ghostscript(make_manager):
    """An EPS file given as a reference image is a ValidationError naming images[0]; Pillow is
    never asked to hand it to Ghostscript (only plain decoders are allowed)."""
    tm = await make_manager(workers=False)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"
    with pytest.raises(ValidationError) as caught:
        await tm.submit("x", images=[eps])
    assert caught.value.field == "images[0]" and "Ghostscript" not in str(caught.value)


async def test_metadata_with_a_lone_surrogate_is_refused(make_manager):
    """Metadata holding a lone surrogate (valid in ASCII JSON, not in UTF-8) is refused."""
    tm = await make_manager(workers=False)
    with pytest.raises(ValidationError) as caught:
        await tm.submit("x", metadata={"k": "\ud800"})
    assert caught.value.field == "metadata" and "surrogate" in str(caught.value)
