"""The workers of one process: claim tasks, run attempts, renew leases, record outcomes.

One dispatcher coroutine claims work when a slot is free (woken by submits and finished
attempts in this process, else by a timer for work from other processes); one heartbeat
coroutine renews the leases of every attempt it runs and stops the attempts whose lease
was lost or whose task was cancelled elsewhere. Each attempt:

    generate n images (cancellable, under attempt_timeout)
    -> validate + write each file (fsync, rename)          } never cancelled half-way:
    -> one fenced UPDATE: succeeded / retry / failed        } the fenced write decides

Only the fenced write decides the outcome; an attempt that lost its claim deletes the
files it wrote and writes nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs

from . import _config
from ._exceptions import ProviderError, StoreError
from ._holder import holder_gone, new_worker_id
from ._images import ImageStore, InvalidImage, storage_error
from ._inside import mark_attempt
from ._models import StoredImage, Task, TaskError, TaskStatus, now_ms
from ._store import Claimed, TaskStore, is_damage, is_locked
from .providers.base import ImageRequest, ImageResult, Provider, ReferenceImage

__all__ = ["Worker", "backoff", "claim_ahead"]

log = logging.getLogger("imagetask")
T = TypeVar("T")


def claim_ahead(concurrency: int) -> int:
    """How many tasks a worker claims beyond its free generation slots: a quarter of them, at
    least one. A task claimed ahead waits (its lease renewed, cancellable, never sent to the
    provider) until a slot frees, then starts at once, without a claim's round trip. One is
    not enough when generations end together: the rest of the freed slots would each wait
    for a claim through the writer. More holds back work another process could start.
    """
    return max(1, concurrency // 4)


#: How many times an attempt's outcome write is tried before the attempt is given up (and
#: the task left to be re-run after its lease), and the first pause between tries (doubling:
#: 0.25 + 0.5 + 1 + 2 s in all; the first pause is ``retry_delay`` when that is shorter).
RECORD_TRIES = 5
RECORD_RETRY_DELAY = 0.25

#: The first and the longest pause between two tries at storing an attempt's images while
#: the image folder refuses them (read-only, full, I/O error).
STORAGE_RETRY_DELAY = 0.1
STORAGE_RETRY_CAP = 2.0

#: Retryable codes whose retries are capped below max_attempts: a model that answered
#: without an image is asked once more, then the task fails (model variance, not outage).
RETRY_LIMITS = {"no_image": 1}


def _failed(what: str, exc: Exception, retry: float) -> None:
    """Log a claim or renewal that failed: a lock held elsewhere in one line, else with the traceback."""
    locked = is_locked(exc)
    log.log(logging.WARNING if locked else logging.ERROR, "%s failed%s; retrying in %.1f s", what,
            f": {exc}" if locked else "", retry, exc_info=None if locked else exc)  # fmt: skip


def backoff(attempt: int, base: float, retry_after: float | None) -> float:
    """Seconds to wait before the attempt after ``attempt``: doubling, jittered, capped,
    and never sooner than the provider asked."""
    delay: float = min(_config.RETRY_DELAY_CAP, base * 2.0 ** (attempt - 1))
    delay *= random.uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


#: Why an attempt that is storing its images stops trying: its claim is gone (a shutdown
#: does not stop it: attempts already storing finish first).
_GIVE_UP = frozenset({"lost", "cancelled"})


@attrs.define
class _Attempt:
    claimed: Claimed
    task: asyncio.Task[None] | None = None
    #: "generating" while cancellable; "storing" once files are being written.
    phase: str = "generating"
    #: It holds a generation slot (False while a task claimed ahead waits for one).
    started: bool = False
    #: Why we cancelled it: "cancelled", "lost" or "shutdown".
    stop_reason: str | None = None


class Worker:
    """Runs tasks from the store in this process, at most ``concurrency`` at a time."""

    def __init__(
        self,
        store: TaskStore,
        images: ImageStore,
        provider: Provider,
        *,
        concurrency: int,
        per_owner: int,
        lease: float,
        attempt_timeout: float,
        retry_delay: float,
        poll_interval: float,
        storage_timeout: float,
        on_terminal: Callable[[str, Task | None], None],
    ) -> None:
        self.store = store
        self.images = images
        self.provider = provider
        self.concurrency = concurrency
        self.ahead = claim_ahead(concurrency)
        self.per_owner = per_owner
        self.lease = lease
        self.attempt_timeout = attempt_timeout
        self.retry_delay = retry_delay
        self.poll_interval = poll_interval
        self.storage_timeout = storage_timeout
        #: Told of each task that ended here: with the task as committed, or None when this
        #: worker does not know its end (fenced out: whoever took it may have ended it).
        self.on_terminal = on_terminal
        #: host/boot/pid/start/token: the lease holder, told apart when provably gone.
        self.id = new_worker_id()
        self._running: dict[str, _Attempt] = {}
        #: This process's attempts per owner (a lower bound of the owner's running count).
        self._owner_running: dict[str, int] = {}
        #: Claimed attempts that have not finished generating (waiting for a slot included).
        self._generating = 0
        #: At most ``concurrency`` generations at once (guarantee 8).
        self._slots = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        #: Set to end a draining stop at once (a second signal to `imagetask worker`).
        self._hurry = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        #: Attempts `stop` stopped, and what a claim in flight then took: for `_give_back`.
        self._giving_back: list[tuple[Claimed, str]] = []

    def start(self) -> None:
        """Start the dispatcher and the heartbeat."""
        self._loops = [
            asyncio.create_task(self._dispatch(), name="imagetask-dispatch"),
            asyncio.create_task(self._heartbeat(), name="imagetask-heartbeat"),
        ]

    def wake(self, owner: str | None = None) -> None:
        """Tell the dispatcher there may be new work (of ``owner``, when one is named).

        A task of an owner who already has ``per_owner`` attempts running here cannot be
        claimed now by anyone (the limit spans every process): no claim is woken for it, and
        the next attempt of that owner to end wakes one. In the notebook shape (one owner,
        per_owner = concurrency) that saves a claim transaction per submit.
        """
        if owner is not None and self._owner_running.get(owner, 0) >= self.per_owner:
            return
        self._wake.set()

    def _release_slot(self) -> None:
        self._generating -= 1
        self._wake.set()

    @property
    def running(self) -> int:
        """How many attempts this process runs now."""
        return len(self._running)

    def stop_local(self, task_id: str, reason: str) -> None:
        """Stop this process's attempt of ``task_id``, if it runs one and may still be stopped
        (an attempt already storing its images only learns why, and stops trying to store
        them; its fenced write decides the rest)."""
        attempt = self._running.get(task_id)
        if attempt is not None:
            self._stop(attempt, reason)

    def _stop(self, attempt: _Attempt, reason: str) -> None:
        if attempt.stop_reason is None:
            attempt.stop_reason = reason
        if attempt.phase == "generating" and attempt.task is not None:
            attempt.task.cancel()

    def hurry(self) -> None:
        """End a draining `stop` now: the attempts still generating are handed back."""
        self._hurry.set()

    async def stop(self, *, drain: bool = False, grace: float | None = None) -> None:
        """Stop claiming, then give running attempts back to the queue at once and wait for
        them; with ``drain``, let the attempts already generating finish instead (leases
        still renewed) for up to ``grace`` seconds (None: as long as they take) or until
        `hurry` is called, and give back only those claimed ahead and still waiting for a
        slot, then the rest. Either way, attempts already storing their images finish first."""
        loops, self._loops = self._loops, []
        if not loops:
            return
        dispatcher, heartbeat = loops
        dispatcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dispatcher
        # The heartbeat goes on until every attempt has ended: one still storing its images
        # (or recording its outcome) keeps its lease, so no other process re-runs it meanwhile.
        if drain:
            waiting = [a for a in self._running.values() if not a.started and a.task is not None]
            for attempt in waiting:
                self._stop(attempt, "shutdown")
            if waiting:  # hand those back now: a long drain must not keep them past their lease
                await asyncio.wait([a.task for a in waiting if a.task is not None])
            await self._give_back()
            tasks = [a.task for a in self._running.values() if a.task is not None]
            if tasks:
                hurry = asyncio.ensure_future(self._hurry.wait())
                # asyncio.wait, not gather: ending the wait must not cancel the attempts.
                running = asyncio.ensure_future(asyncio.wait(tasks))
                try:
                    await asyncio.wait([hurry, running], timeout=grace, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    hurry.cancel()
                    running.cancel()
        for attempt in list(self._running.values()):
            self._stop(attempt, "shutdown")
        try:
            await self._wait_running()
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            await self._give_back()

    async def _wait_running(self) -> None:
        tasks = [a.task for a in self._running.values() if a.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- dispatcher --

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        last_claim = -float("inf")
        # Leases of holders that are provably gone (a process on this host that died) are
        # taken back at once: on the first claim, and then at most once a poll interval.
        last_holder_check = -float("inf")
        damaged_pause = 0.0  # the pause after a claim that found the file damaged (doubling)
        while True:
            self._wake.clear()
            # Tasks are claimed ahead of free slots, so a slot that frees starts its next
            # generation at once instead of after a claim's round trip through the writer.
            free = self.concurrency + self.ahead - self._generating
            since = loop.time() - last_claim
            timeout = self.poll_interval
            # A claim transaction also takes back expired leases, so one runs at least every
            # poll_interval even when every slot is busy (then with limit 0).
            if free > 0 or since >= self.poll_interval:
                last_claim = loop.time()
                check_holders = last_claim - last_holder_check >= self.poll_interval
                if check_holders:
                    last_holder_check = last_claim
                claim = asyncio.ensure_future(
                    self.store.claim(
                        self.id,
                        max(free, 0),
                        self.per_owner,
                        self.lease,
                        held=[(tid, a.claimed.attempt) for tid, a in self._running.items()],
                        gone=holder_gone if check_holders else None,
                        provider=self.provider.name,
                    )
                )
                try:
                    claimed, ended, next_run = await asyncio.shield(claim)
                except asyncio.CancelledError:
                    await self._hand_back(claim)
                    raise
                except Exception as exc:
                    if is_damage(exc):
                        # Damage the check at open did not reach (it is bounded on big files):
                        # say so once in a while, not every poll interval.
                        damaged_pause = min(2 * damaged_pause, 60.0) if damaged_pause else self.poll_interval
                        log.error(
                            "the database %s is damaged (%s); workers stop claiming and look again in "
                            "%.0f s. Close imagetask, then restore a backup, or recover it with: "
                            "sqlite3 %s .recover | sqlite3 recovered.db",
                            self.store.path, exc, damaged_pause, self.store.path,
                        )  # fmt: skip
                        await asyncio.sleep(damaged_pause)
                        continue
                    _failed("claiming tasks", exc, self.poll_interval)
                    await asyncio.sleep(self.poll_interval)
                    continue
                damaged_pause = 0.0
                for task_id in ended:
                    self.on_terminal(task_id, None)
                for c in claimed:
                    log.info("task %s: attempt %d started on %s", c.id, c.attempt, self.id)
                    old = self._running.get(c.id)
                    if old is not None:
                        # This process stalled past the lease, the lease was taken back (by
                        # another process) and now this worker claimed the task again: the
                        # old attempt is fenced out; stop it so only the new one runs.
                        log.info("task %s: attempt %d replaces %d", c.id, c.attempt, old.claimed.attempt)
                        self._stop(old, "lost")
                    attempt = _Attempt(c)
                    self._running[c.id] = attempt
                    self._owner_running[c.owner] = self._owner_running.get(c.owner, 0) + 1
                    self._generating += 1
                    attempt.task = asyncio.create_task(self._run(attempt), name=f"imagetask-{c.id}")
                if free > 0 and len(claimed) == free:
                    continue  # every slot filled: there may be more, look again once one frees
                if next_run is not None and free > len(claimed):
                    wait_ms = next_run - now_ms()
                    if wait_ms > 0:
                        timeout = min(timeout, wait_ms / 1000)
            else:
                timeout = self.poll_interval - since
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _hand_back(self, claim: asyncio.Future[tuple[list[Claimed], list[str], int | None]]) -> None:
        """The worker is stopping while a claim is in flight: wait for it (a commit cannot be
        recalled) and hand back at once whatever it took, so a quick close never leaves a
        task ``running`` for the next start to wait a lease on."""
        try:
            claimed, ended, _ = await claim
        except Exception:
            return  # nothing was claimed
        for task_id in ended:
            self.on_terminal(task_id, None)
        self._giving_back.extend((c, "claimed while closing, handed back") for c in claimed)

    async def _give_back(self) -> None:
        """Release what `stop` stopped (and the claim it found in flight), all in one turn of
        the loop: the releases share one transaction, so a lock held elsewhere is waited for
        once, not once per task (or per turn in which an attempt's cancellation ended)."""
        items, self._giving_back = self._giving_back, []
        releases = [self.store.release(c.id, c.attempt, self.id) for c, _ in items]
        outcomes = await asyncio.shield(asyncio.gather(*releases, return_exceptions=True))
        for (c, done), released in zip(items, outcomes, strict=True):
            if isinstance(released, Exception):
                log.warning(
                    "task %s: handing back attempt %d failed (%s); it runs again once its lease expires",
                    c.id, c.attempt, released,
                )  # fmt: skip
            elif released:
                log.info("task %s: attempt %d %s", c.id, c.attempt, done)

    # -- heartbeat --

    async def _heartbeat(self) -> None:
        interval = self.lease / 3
        while True:
            await asyncio.sleep(interval)
            held = [(tid, a.claimed.attempt) for tid, a in self._running.items()]
            if not held:
                continue
            try:
                alive = await self.store.heartbeat(self.id, held, self.lease)
            except Exception as exc:
                _failed("renewing leases", exc, interval)
                continue
            for task_id, attempt_no in held:
                current = self._running.get(task_id)
                if task_id not in alive and current is not None and current.claimed.attempt == attempt_no:
                    log.info("task %s: attempt %d lost its claim (cancelled or lease taken); stopping it",
                             task_id, attempt_no)  # fmt: skip
                    self._stop(current, "lost")

    # -- one attempt --

    async def _run(self, attempt: _Attempt) -> None:
        c = attempt.claimed
        mark_attempt(self)
        try:
            await self._attempt(attempt)
        except asyncio.CancelledError:
            if attempt.stop_reason == "shutdown":  # `stop` gives it back, rather than wait a lease
                self._giving_back.append((c, "released at shutdown"))
            elif attempt.stop_reason is None:
                raise
        except StoreError:
            # The database refused the outcome every time: nothing can be recorded now; the
            # lease runs out and the task is taken back (the fence refuses this attempt).
            log.exception("task %s: attempt %d could not record its outcome", c.id, c.attempt)
        except Exception as exc:
            # A bug of ours (not the provider's, not the disk's): fail the task rather than
            # leave it for its lease, which would run it, and pay for it, again.
            log.exception("task %s: attempt %d crashed in imagetask itself", c.id, c.attempt)
            error = TaskError("internal_error", f"imagetask failed: {type(exc).__name__}: {exc}")
            try:
                failed = await self.store.fail(c.id, c.attempt, self.id, error)
                if failed is not None:
                    self.on_terminal(c.id, failed)
            except Exception:
                log.exception("task %s: recording the failure failed; its lease will expire", c.id)
        finally:
            if attempt.phase == "generating":  # stopped before its generation ended
                self._release_slot()
            if self._running.get(c.id) is attempt:  # not a newer attempt of the same task
                del self._running[c.id]
            left = self._owner_running.get(c.owner, 1) - 1
            if left > 0:
                self._owner_running[c.owner] = left
            else:
                self._owner_running.pop(c.owner, None)
            self._wake.set()

    async def _attempt(self, attempt: _Attempt) -> None:
        c = attempt.claimed
        error: TaskError | None = None
        retry_after: float | None = None
        results: list[ImageResult] = []
        try:
            async with self._slots, asyncio.timeout(self.attempt_timeout):
                attempt.started = True
                results = await self._generate_all(c)
        except TimeoutError:
            error = TaskError(
                "timeout",
                f"attempt {c.attempt} did not finish within {self.attempt_timeout:g} s (attempt_timeout)",
                retryable=True,
            )
        except ProviderError as exc:
            error = TaskError(exc.code, exc.message, exc.retryable)
            retry_after = exc.retry_after
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("task %s: provider %s raised an unexpected error", c.id, self.provider.name)
            error = TaskError("internal_error", f"{type(exc).__name__}: {exc}", retryable=False)

        # From here on the fenced write decides, not a cancel. The generation is over, so its
        # slot goes to the next task now: storing and committing overlap the next generation
        # (`concurrency` limits generations; the row stays `running`, and counts against
        # per_owner, until the commit).
        attempt.phase = "storing"
        self._release_slot()
        stored: list[StoredImage] = []
        if error is None:
            try:
                stored = await self._store_all(attempt, results)
            except InvalidImage as exc:
                error = TaskError("bad_image", f"the provider returned bytes that are not an image: {exc}")
            except OSError as exc:
                if attempt.stop_reason in _GIVE_UP:  # lost or cancelled meanwhile: nothing to record
                    log.info(
                        "task %s: attempt %d stopped while its images could not be stored", c.id, c.attempt
                    )
                    self.on_terminal(c.id, None)
                    return
                error = storage_error(exc, self.images.root, self.storage_timeout)
        if error is None:
            done = await self._record(
                c, "success", lambda: self.store.succeed(c.id, c.attempt, self.id, stored)
            )
            if done is not None:
                log.info("task %s: succeeded with %d image(s)", c.id, len(stored))
                self.on_terminal(c.id, done)
            elif await self._committed_already(c, stored):
                log.info(
                    "task %s: succeeded with %d image(s) (an earlier try had committed)", c.id, len(stored)
                )
                self.on_terminal(c.id, None)
            else:
                await asyncio.to_thread(self.images.delete, [im.path for im in stored])
                log.info(
                    "task %s: attempt %d finished after losing its claim; result dropped", c.id, c.attempt
                )
                self.on_terminal(c.id, None)  # whoever took it may have ended it: waiters look again
            return
        retry_limit = RETRY_LIMITS.get(error.code)
        within_limit = retry_limit is None or c.retries.get(error.code, 0) < retry_limit
        if error.retryable and within_limit and c.attempt - c.released < c.max_attempts:
            delay = backoff(c.attempt, self.retry_delay, retry_after)
            if await self._record(
                c, "retry", lambda: self.store.retry(c.id, c.attempt, self.id, error, delay)
            ):
                log.info(
                    "task %s: attempt %d failed (%s), retrying in %.1f s", c.id, c.attempt, error.code, delay
                )
        else:
            failed = await self._record(
                c, "failure", lambda: self.store.fail(c.id, c.attempt, self.id, error)
            )
            if failed is not None:
                log.info("task %s: failed (%s)", c.id, error.code)
            # Fenced out (None): whatever ended it, its waiters look again.
            self.on_terminal(c.id, failed)

    async def _record(self, c: Claimed, what: str, write: Callable[[], Awaitable[T]]) -> T:
        """Run an attempt's fenced outcome write, trying again while the database refuses it
        (a lock held past busy_timeout, an I/O error). Giving up leaves the task to be re-run
        after its lease: for a success, that is a second paid generation, so it is worth
        a few seconds. The heartbeat keeps the lease meanwhile; the fence still decides."""
        delay = min(RECORD_RETRY_DELAY, self.retry_delay) or RECORD_RETRY_DELAY
        for tries in range(1, RECORD_TRIES + 1):
            try:
                return await write()
            except StoreError as exc:
                if tries == RECORD_TRIES:
                    raise
                log.warning(
                    "task %s: recording the %s of attempt %d failed (%s); trying again in %.1f s",
                    c.id, what, c.attempt, exc, delay,
                )  # fmt: skip
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def _committed_already(self, c: Claimed, stored: list[StoredImage]) -> bool:
        """Whether the task's committed result is exactly these files: a success write that
        reported an error had committed after all, and `_record`'s next try was fenced out.
        Then the files are the result and must stay. (Cheap: read only when fenced out.)"""
        task = await self.store.get(c.id)
        return (
            task is not None
            and task.status is TaskStatus.SUCCEEDED
            and [im.path for im in task.images] == [im.path for im in stored]
        )

    async def _store_all(self, attempt: _Attempt, results: list[ImageResult]) -> list[StoredImage]:
        """Write an attempt's images, trying again with backoff while the image folder refuses
        them (read-only, full, I/O error), for up to ``storage_timeout`` seconds. The bytes
        are in hand, so this never asks the provider again; the heartbeat keeps the lease.

        Raises:
            InvalidImage: bytes that are not an image (at once: trying again cannot help).
            OSError: the last storage error, once the time is up or the attempt was stopped.
        """
        c = attempt.claimed
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.storage_timeout
        delay = STORAGE_RETRY_DELAY
        while True:
            try:
                return await asyncio.to_thread(self._store_files, c, results)
            except OSError as exc:
                left = deadline - loop.time()
                if left <= 0 or attempt.stop_reason in _GIVE_UP:
                    raise
                log.warning(
                    "task %s: storing the images of attempt %d failed (%s); trying again in %.1f s",
                    c.id, c.attempt, exc, min(delay, left),
                )  # fmt: skip
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, STORAGE_RETRY_CAP)

    async def _generate_all(self, c: Claimed) -> list[ImageResult]:
        refs: tuple[ReferenceImage, ...] = ()
        if c.references:
            datas = await asyncio.to_thread(lambda: [im.read_bytes() for im in c.references])
            refs = tuple(ReferenceImage(d, im.mime) for d, im in zip(datas, c.references, strict=True))
        requests = [
            ImageRequest(
                prompt=c.prompt,
                model=c.model,
                aspect_ratio=c.params.get("aspect_ratio"),
                size=c.params.get("size"),
                references=refs,
                task_id=c.id,
                attempt=c.attempt,
                index=i,
            )
            for i in range(int(c.params.get("n", 1)))
        ]
        if len(requests) == 1:
            return [await self.provider.generate(requests[0])]
        calls = [asyncio.create_task(self._call(r)) for r in requests]
        try:
            await asyncio.wait(calls, return_when=asyncio.FIRST_EXCEPTION)
            for call in calls:
                if call.done() and call.exception() is not None:
                    raise call.exception()  # type: ignore[misc]
            return [call.result() for call in calls]
        finally:
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)

    async def _call(self, request: ImageRequest) -> ImageResult:
        mark_attempt(self)  # one of the attempt's own calls: the attempt awaits it
        return await self.provider.generate(request)

    def _store_files(self, c: Claimed, results: list[ImageResult]) -> list[StoredImage]:
        stored: list[StoredImage] = []
        try:
            for i, result in enumerate(results):
                stored.append(self.images.write_output(c.id, c.attempt, i, result.data, result.provenance))
        except BaseException:
            self.images.delete([im.path for im in stored])
            raise
        return stored
