"""EpochStreams: the next epoch's stream starts ahead, on a background thread, and yields unchanged."""

import threading
import time

import pytest

from harma.train.prefetch import EpochStreams


class SlowStream:
    """An iterable whose start-up takes `startup_s`; records the thread that opened it."""

    def __init__(self, items, startup_s=0.0, fail=None):
        self.items, self.startup_s, self.fail = items, startup_s, fail
        self.opened_in: str | None = None
        self.opened = threading.Event()

    def __iter__(self):
        self.opened_in = threading.current_thread().name
        self.opened.set()
        time.sleep(self.startup_s)
        if self.fail:
            raise self.fail
        yield from self.items


def test_take_without_start_opens_a_fresh_stream_in_the_caller():
    made = []

    def make(epoch):
        made.append(epoch)
        return SlowStream([epoch * 10 + i for i in range(3)])

    streams = EpochStreams(make)
    assert list(streams.take(0)) == [0, 1, 2]
    assert list(streams.take(1)) == [10, 11, 12]
    assert made == [0, 1]


def test_started_stream_runs_its_startup_in_the_background_and_keeps_every_item():
    made: dict[int, SlowStream] = {}

    def make(epoch):
        made[epoch] = SlowStream(list(range(epoch, epoch + 5)), startup_s=0.4)
        return made[epoch]

    streams = EpochStreams(make)
    streams.start(1)
    assert made[1].opened.wait(2)
    assert made[1].opened_in == "harma-epoch-1-prefetch"
    time.sleep(0.6)  # "validation": longer than the stream's start-up
    t0 = time.perf_counter()
    items = streams.take(1)
    first = next(items)
    assert time.perf_counter() - t0 < 0.1  # the start-up was already paid
    assert [first, *items] == [1, 2, 3, 4, 5]
    streams.start(1)  # a second start of a taken epoch makes a new stream, used by the next take
    assert list(streams.take(1)) == [1, 2, 3, 4, 5]


def test_start_is_once_per_epoch():
    made = []
    streams = EpochStreams(lambda epoch: made.append(epoch) or [epoch])
    streams.start(2)
    streams.start(2)
    assert list(streams.take(2)) == [2]
    assert made == [2]


def test_take_waits_for_a_start_still_running():
    streams = EpochStreams(lambda epoch: SlowStream(["a", "b"], startup_s=0.3))
    streams.start(0)
    t0 = time.perf_counter()
    assert list(streams.take(0)) == ["a", "b"]
    assert time.perf_counter() - t0 >= 0.2


def test_an_empty_stream_started_ahead_yields_nothing():
    streams = EpochStreams(lambda epoch: SlowStream([]))
    streams.start(0)
    assert list(streams.take(0)) == []


def test_an_error_in_the_background_start_reaches_the_consumer():
    streams = EpochStreams(lambda epoch: SlowStream([1], fail=ConnectionError("object store gone")))
    streams.start(3)
    with pytest.raises(ConnectionError, match="object store gone"):
        list(streams.take(3))
