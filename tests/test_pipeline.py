"""Read-ahead and write-behind helpers of batch prediction (issue 14)."""

from __future__ import annotations

import threading
import time

import pytest

from medseg.inference.pipeline import WriteBehind, read_ahead


def _slow_square(x: int) -> int:
    if x == 3:
        raise ValueError("bad item 3")
    time.sleep(0.002 * (7 - x % 7))  # later items finish first
    return x * x


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_read_ahead_keeps_input_order_and_hands_back_errors(workers):
    outcomes = list(read_ahead(range(10), _slow_square, workers=workers, ahead=4))
    assert [o.item for o in outcomes] == list(range(10))
    assert [o.result for o in outcomes if o.error is None] == [x * x for x in range(10) if x != 3]
    (bad,) = [o for o in outcomes if o.error is not None]
    assert bad.item == 3 and isinstance(bad.error, ValueError) and bad.result is None


def test_read_ahead_never_runs_more_than_ahead_items_before_the_consumer():
    """What keeps memory flat: items are pulled from the source and started
    only ``ahead`` at a time."""
    pulled = []

    def source():
        for i in range(20):
            pulled.append(i)
            yield i

    consumed = 0
    for outcome in read_ahead(source(), lambda x: x, workers=2, ahead=3):
        consumed += 1
        assert len(pulled) <= consumed + 3
        assert outcome.result == consumed - 1
    assert consumed == 20


def test_write_behind_bounds_work_in_flight_and_keeps_order():
    running = 0
    most = 0
    lock = threading.Lock()

    def work(x: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.003 * (x % 3))
        with lock:
            running -= 1
        if x == 5:
            raise OSError("disk full")
        return -x

    finished = []
    with WriteBehind(work, workers=2, in_flight=3) as writer:
        for x in range(12):
            finished += writer.submit(x)
            assert len(writer._pending) <= 3
        finished += writer.drain()
    assert [o.item for o in finished] == list(range(12))
    assert [o.result for o in finished if o.error is None] == [-x for x in range(12) if x != 5]
    assert isinstance(finished[5].error, OSError)
    assert most <= 2


def test_write_behind_without_workers_runs_at_once():
    with WriteBehind(lambda x: x + 1, workers=0, in_flight=1) as writer:
        assert [o.result for o in writer.submit(1)] == [2]
        assert writer.drain() == []


@pytest.mark.parametrize(("workers", "depth"), [(-1, 1), (1, 0)])
def test_bad_pipeline_sizes_are_refused(workers, depth):
    with pytest.raises(ValueError):
        list(read_ahead([1], lambda x: x, workers=workers, ahead=depth))
    with pytest.raises(ValueError):
        WriteBehind(lambda x: x, workers=workers, in_flight=depth)
