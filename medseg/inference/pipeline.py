"""Overlap the stages of batch prediction: read ahead, forward, write behind.

Prediction of one scan is three stages: read and preprocess (decode the
DICOM, normalise, resize), the network's forward pass on a batch, then map
back, clean, measure and write (PNG, NIfTI, overlay, DICOM SEG, row). Done one
after the other, the CPU work around the network takes as long as the network
itself (issue 14: 7.3 end to end vs 16.0 forward-only scans/s). Here the
reading of later scans and the writing of earlier ones run in worker threads
while the calling thread runs the forward pass: numpy, scipy.ndimage, zlib
(PNG, NIfTI), pydicom's pixel decoders and torch release the GIL for their
heavy parts, so the stages share the cores.

Both helpers keep a bounded number of items in flight, so memory stays flat
whatever the number of scans, and give results back in input order, so
progress lines, the failures table and the results are as a sequential run's.

Reading threads do not hold the process open: when the consumer stops (an
error, Ctrl-C) a read still in flight, e.g. a DICOMweb request waiting on a
server, is abandoned, not waited for (up to the read timeout). Writes are
always waited for: each is short and local, and atomic.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Outcome(Generic[T, R]):
    """One item's result, or the exception its work raised (never both)."""

    item: T
    result: R | None = None
    error: BaseException | None = None


def _outcome(item: T, future: Future) -> Outcome:
    try:
        return Outcome(item, future.result())
    except Exception as err:  # noqa: BLE001 - handed to the caller, who names the item
        return Outcome(item, error=err)


class _DaemonThreads:
    """A minimal thread pool whose threads are daemons.

    ``ThreadPoolExecutor``'s threads are joined when the interpreter exits,
    so Ctrl-C waited for every read in flight; daemon threads are not.
    """

    def __init__(self, workers: int, name: str) -> None:
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"{name}_{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, work: Callable[[T], R], item: T) -> Future:
        future: Future = Future()
        self._tasks.put((future, work, item))
        return future

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            future, work, item = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(work(item))
            except BaseException as err:  # noqa: BLE001 - handed to the consumer through the future
                future.set_exception(err)

    def shutdown(self, wait: bool) -> None:
        """Stop the threads once their current task is done; ``wait``: join them."""
        for _ in self._threads:
            self._tasks.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


def read_ahead(items: Iterable[T], work: Callable[[T], R], *, workers: int, ahead: int) -> Iterator[Outcome[T, R]]:
    """``work`` over ``items`` in ``workers`` threads, up to ``ahead`` items
    ahead of the consumer; outcomes in input order.

    With ``workers`` 0, each item's work runs when the consumer asks for it
    (no thread: the sequential behaviour, for small batches and debugging).

    Args:
        items: consumed lazily, ``ahead`` at a time (a generator is fine).
        work: called once per item; an exception it raises becomes the
            item's ``Outcome.error`` (``KeyboardInterrupt`` and other
            ``BaseException`` propagate).
        workers: threads.
        ahead: items submitted but not yet handed to the consumer, >= 1:
            what bounds memory.

    Raises:
        ValueError: ``workers`` < 0 or ``ahead`` < 1.
    """
    if workers < 0 or ahead < 1:
        raise ValueError(f"read_ahead needs workers >= 0 and ahead >= 1, got {workers} and {ahead}")
    if workers == 0:
        for item in items:
            try:
                yield Outcome(item, work(item))
            except Exception as err:  # noqa: BLE001
                yield Outcome(item, error=err)
        return
    pending: deque[tuple[T, Future]] = deque()
    iterator = iter(items)
    pool = _DaemonThreads(workers, "medseg-read")
    finished = False
    try:
        for item in iterator:
            pending.append((item, pool.submit(work, item)))
            if len(pending) >= ahead:
                yield _outcome(*pending.popleft())
        while pending:
            yield _outcome(*pending.popleft())
        finished = True
    finally:  # the consumer stopped early (an error, Ctrl-C, a closed generator): drop what was not started
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=finished)  # a read in flight is not waited for when nobody wants its result


class WriteBehind(Generic[T, R]):
    """Run ``work(item)`` in ``workers`` threads behind the caller, at most
    ``in_flight`` items at once; finished outcomes come back in submission
    order from :meth:`submit` (those done by then) and :meth:`drain` (all).

    With ``workers`` 0, :meth:`submit` runs the work at once (sequential).

    Use as a context manager: leaving it waits for the work in flight, so
    no write is cut short by the caller returning (an exception in the
    caller still lets started writes finish, each atomically).
    """

    def __init__(self, work: Callable[[T], R], *, workers: int, in_flight: int) -> None:
        if workers < 0 or in_flight < 1:
            raise ValueError(f"WriteBehind needs workers >= 0 and in_flight >= 1, got {workers} and {in_flight}")
        self.work = work
        self.in_flight = in_flight
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medseg-write") if workers else None
        self._pending: deque[tuple[T, Future]] = deque()

    def __enter__(self) -> "WriteBehind[T, R]":
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def submit(self, item: T) -> list[Outcome[T, R]]:
        """Start ``item``'s work; return the outcomes finished meanwhile, oldest
        first (waiting for the oldest while ``in_flight`` items are pending)."""
        if self._pool is None:
            try:
                return [Outcome(item, self.work(item))]
            except Exception as err:  # noqa: BLE001
                return [Outcome(item, error=err)]
        self._pending.append((item, self._pool.submit(self.work, item)))
        finished = []
        while self._pending and (len(self._pending) > self.in_flight or self._pending[0][1].done()):
            finished.append(_outcome(*self._pending.popleft()))
        return finished

    def drain(self) -> list[Outcome[T, R]]:
        """Wait for every pending item; their outcomes, oldest first."""
        finished = [_outcome(*entry) for entry in self._pending]
        self._pending.clear()
        return finished


__all__ = ["Outcome", "WriteBehind", "read_ahead"]
