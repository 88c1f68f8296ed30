"""max_pending: an owner's unfinished tasks are capped inside the submit's transaction."""

from __future__ import annotations

import asyncio

import pytest

from imagetask import GenerationRequest, TooManyPending, ValidationError
from imagetask.providers import FakeProvider

from conftest import sql


async def wait_for(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_submit_at_the_limit_is_refused_and_writes_nothing(make_manager):
    """The submit that would make an owner's unfinished tasks exceed max_pending raises
    TooManyPending naming the owner and the limit, and leaves the database as it was;
    another owner is not affected."""
    tm = await make_manager(workers=False)
    for i in range(3):
        await tm.submit(f"p{i}", owner="alice", max_pending=3)
    before = sql(tm.path, "SELECT count(*) FROM tasks")
    with pytest.raises(TooManyPending) as caught:
        await tm.submit("one more", owner="alice", max_pending=3)
    assert caught.value.owner == "alice" and caught.value.pending == 3 and caught.value.limit == 3
    assert "max_pending" in str(caught.value)
    assert sql(tm.path, "SELECT count(*) FROM tasks") == before
    assert (await tm.submit("bob's", owner="bob", max_pending=3)).owner == "bob"


async def test_finished_tasks_do_not_count(make_manager):
    """Only queued and running tasks count: a queued task and then the same task running
    refuse the owner's next submit; once it ends, the owner may submit again."""
    provider = FakeProvider(outcomes=["hang"])
    tm = await make_manager(provider=provider, workers=False)
    first = await tm.submit("first", owner="alice", max_pending=1)
    with pytest.raises(TooManyPending):
        await tm.submit("second", owner="alice", max_pending=1)  # it is queued
    worker = await make_manager(provider=provider)
    await wait_for(lambda: provider.active == 1)
    with pytest.raises(TooManyPending):
        await tm.submit("second", owner="alice", max_pending=1)  # it is running
    await worker.cancel(first.id)
    assert (await tm.submit("second", owner="alice", max_pending=1)).prompt == "second"


async def test_a_resubmit_with_its_key_returns_the_first_task_even_at_the_limit(make_manager):
    """An idempotent re-submit is not a new task: at the limit it still answers the first one."""
    tm = await make_manager(workers=False)
    first = await tm.submit("p", owner="alice", idempotency_key="k1", max_pending=1)
    again = await tm.submit("p", owner="alice", idempotency_key="k1", max_pending=1)
    assert again.id == first.id


async def test_submit_many_counts_its_own_tasks_and_writes_none_when_over(make_manager):
    """submit_many is all or nothing: a batch that would pass the limit writes no row."""
    tm = await make_manager(workers=False)
    await tm.submit("p", owner="alice")
    with pytest.raises(TooManyPending):
        await tm.submit_many([GenerationRequest(f"b{i}", owner="alice") for i in range(3)], max_pending=3)
    assert sql(tm.path, "SELECT count(*) FROM tasks") == [(1,)]
    assert len(await tm.submit_many([GenerationRequest("b", owner="alice")], max_pending=2)) == 1


async def test_two_managers_racing_cannot_both_pass_the_limit(make_manager):
    """Two managers on one file (two write connections) submitting 20 tasks each for one owner
    at once, max_pending=5: exactly 5 rows are written, every other submit is refused."""
    a = await make_manager(workers=False)
    b = await make_manager(workers=False)
    results = await asyncio.gather(
        *(tm.submit(f"p{i}", owner="alice", max_pending=5) for i in range(20) for tm in (a, b)),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 5
    assert all(isinstance(r, TooManyPending) for r in results if isinstance(r, BaseException))
    assert sql(a.path, "SELECT count(*) FROM tasks WHERE owner = 'alice'") == [(5,)]


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3", True])
async def test_a_bad_limit_is_a_validation_error_naming_the_field(make_manager, bad):
    """max_pending must be an integer >= 1 (or None): anything else names the field."""
    tm = await make_manager(workers=False)
    with pytest.raises(ValidationError) as caught:
        await tm.submit("p", max_pending=bad)
    assert caught.value.field == "max_pending"
    assert sql(tm.path, "SELECT count(*) FROM tasks") == [(0,)]
