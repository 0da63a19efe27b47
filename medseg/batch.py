"""Run one function over many inputs; a bad input never stops the batch.

Failures are collected with the file and the reason, reported at the end and
written to a CSV, so the caller can set an exit status that says so.
"""

from __future__ import annotations

import csv
import io
import logging
import multiprocessing
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from medseg.atomic import write_text_atomic
from medseg.errors import InputError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Failure:
    """One input that could not be processed."""

    file: str
    problem: str


def _guarded(work: Callable[[T], R], item: T) -> tuple[R | None, Failure | None]:
    """(result, None) or (None, failure); an unexpected error's failure has
    no file yet: the caller names the item."""
    try:
        return work(item), None
    except InputError as err:
        return None, Failure(err.path, err.problem)
    except Exception as err:  # noqa: BLE001 - an unexpected error in one file must not stop the others
        return None, Failure("", f"{type(err).__name__}: {err}")


def _single_threaded_worker() -> None:
    """Parallelism comes from the processes; torch's own threads in each
    worker would oversubscribe the cores and spin."""
    import torch

    torch.set_num_threads(1)


class _Guard:
    """Picklable wrapper so the guard runs inside worker processes."""

    def __init__(self, work: Callable) -> None:
        self.work = work

    def __call__(self, item):
        return _guarded(self.work, item)


def run_batch(
    items: Sequence[T],
    work: Callable[[T], R],
    *,
    label: str,
    workers: int = 1,
    name_of: Callable[[T], str] = str,
) -> tuple[list[R], list[Failure]]:
    """Apply ``work`` to every item, logging progress as ``label k/N``.

    Args:
        items: inputs, usually file paths.
        work: a picklable callable (module-level function or partial) when
            ``workers > 1``.
        label: what is being done, shown in progress lines.
        workers: processes to use; 1 runs in this process.
        name_of: the item's file, for progress lines and failures.

    Returns:
        (results of the items that succeeded, in input order; failures).
        Every item gives exactly one of the two.
    """
    total = len(items)
    results: list[R] = []
    failures: list[Failure] = []
    start = time.perf_counter()
    outcomes: Iterable[tuple[R | None, Failure | None]]
    pool = None
    if workers > 1 and total > 1:
        # Not "fork": a child forked after torch started its thread pool can
        # deadlock on that pool's locks.
        context = multiprocessing.get_context("forkserver")
        # The fork server imports the heavy modules once; workers fork from it.
        context.set_forkserver_preload([getattr(work, "func", work).__module__])
        pool = ProcessPoolExecutor(max_workers=min(workers, total), mp_context=context,
                                   initializer=_single_threaded_worker)
    try:
        guard = _Guard(work)
        outcomes = pool.map(guard, items, chunksize=4) if pool else map(guard, items)
        for done, (result, failure) in enumerate(outcomes, start=1):
            elapsed = time.perf_counter() - start
            eta = elapsed / done * (total - done)
            file = name_of(items[done - 1])
            name = Path(file).name
            if failure is not None and not failure.file:
                failure = Failure(file, failure.problem)
            if failure is None:
                results.append(result)  # type: ignore[arg-type]
                log.info("%s %d/%d %s ok (%.1f s elapsed, ETA %.0f s)", label, done, total, name, elapsed, eta)
            else:
                failures.append(failure)
                log.warning("%s %d/%d %s FAILED: %s", label, done, total, name, failure.problem)
    finally:
        if pool:
            pool.shutdown()
    return results, failures


def _write_file_table(path: str | Path, header: tuple[str, str], rows: Iterable[tuple[str, str]]) -> None:
    """A two-column CSV, written atomically; header only when no row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def write_failures(path: str | Path, failures: Sequence[Failure]) -> None:
    """Write failures as CSV (columns: file, problem), header only when none."""
    _write_file_table(path, ("file", "problem"), ((f.file, f.problem) for f in failures))


def write_skipped(path: str | Path, skipped: Sequence) -> None:
    """Write the files skipped as non-images (``medseg.ingest.inputs.Skipped``;
    columns: file, reason), header only when none."""
    _write_file_table(path, ("file", "reason"), ((s.file, s.reason) for s in skipped))


def report_failures(failures: Sequence[Failure], total: int, label: str, skipped: int = 0) -> None:
    """Log the end-of-batch summary, listing every failure.

    Args:
        total: the inputs of the batch (files skipped as non-images excluded).
        skipped: how many files were skipped as non-images (not failures).
    """
    extra = f" ({skipped} non-image files skipped, listed above)" if skipped else ""
    if not failures:
        log.info("%s: all %d inputs succeeded%s", label, total, extra)
        return
    log.error("%s: %d of %d inputs failed%s:", label, len(failures), total, extra)
    for failure in failures:
        log.error("  %s: %s", failure.file, failure.problem)
