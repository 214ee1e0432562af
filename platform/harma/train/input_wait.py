"""How long a training worker waits for its input: the sign of a data-bound run.

    meter = InputWaitMeter()
    for batch in meter.batches(shard.iter_batches(...)):   # one call per epoch
        ...step...
        meter.window_fraction()     # share of wall time spent waiting since the last call
    meter.epoch_wait_s, meter.first_batch_s, meter.total_wait_s, meter.startup_wait_s

Only the time inside the iterator's `next()` counts: Ray Data's stream start-up at each epoch
(listing, reading, the first decoded block) shows as `first_batch_s`, later stalls as the rest.
`startup_wait_s` is the first batch of the meter's first epoch (worker processes starting too).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class InputWaitMeter:
    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self.total_wait_s = 0.0
        self.epoch_wait_s = 0.0
        self.first_batch_s = 0.0
        self.startup_wait_s = 0.0
        self._started = False
        self._window_wait = 0.0
        self._window_start = clock()

    def batches(self, iterable: Iterable[T]) -> Iterator[T]:
        """Yield `iterable`'s items, timing each wait; starts a new epoch's figures."""
        self.epoch_wait_s = self.first_batch_s = 0.0
        iterator = iter(iterable)
        first = True
        while True:
            start = self._clock()
            try:
                item = next(iterator)
            except StopIteration:
                self._add(self._clock() - start, first=False)
                return
            self._add(self._clock() - start, first)
            first = False
            yield item

    def window_fraction(self) -> float:
        """Share of the wall time since the previous call (or creation) spent waiting for input."""
        now = self._clock()
        elapsed, waited = now - self._window_start, self._window_wait
        self._window_start, self._window_wait = now, 0.0
        return min(1.0, waited / elapsed) if elapsed > 0 else 0.0

    def _add(self, waited: float, first: bool) -> None:
        self.total_wait_s += waited
        self.epoch_wait_s += waited
        self._window_wait += waited
        if first:
            self.first_batch_s = waited
            if not self._started:
                self.startup_wait_s, self._started = waited, True
