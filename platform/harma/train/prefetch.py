"""Start the next epoch's input stream while this epoch validates and checkpoints.

    streams = EpochStreams(lambda epoch: shard.iter_batches(...))
    for epoch in range(epochs):
        for batch in streams.take(epoch):      # the stream started ahead, or a fresh one
            ...step...
        if epoch + 1 < epochs:
            streams.start(epoch + 1)           # on every rank: Ray Data starts an epoch once all
        ...validate, checkpoint...             #   splits ask for it

Every Ray Data epoch begins with seconds of start-up (listing the shards, worker processes, the
first decoded block): the `first_batch_s` of the progress lines. `start` asks for the next epoch's
stream and its first item on a background thread, so that start-up runs beside validation and the
checkpoint instead of inside the next epoch's step loop. The stream itself is used from one thread
at a time: the background thread only until it has the first item, the caller after.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_END = object()


class _Started(Generic[T]):
    """One epoch's stream, opened and its first item fetched on a daemon thread."""

    def __init__(self, iterable: Iterable[T], epoch: int):
        self.first: object = _END
        self.iterator: Iterator[T] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(iterable,), daemon=True,
                                        name=f"harma-epoch-{epoch}-prefetch")
        self._thread.start()

    def _run(self, iterable: Iterable[T]) -> None:
        try:
            self.iterator = iter(iterable)
            self.first = next(self.iterator, _END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer's thread
            self.error = err

    def items(self) -> Iterator[T]:
        self._thread.join()
        if self.error is not None:
            raise self.error
        if self.first is _END:
            return
        yield self.first  # type: ignore[misc]
        yield from self.iterator  # type: ignore[misc]


class EpochStreams(Generic[T]):
    """Per-epoch streams from `make(epoch)`, each one optionally started ahead of its epoch."""

    def __init__(self, make: Callable[[int], Iterable[T]]):
        self._make = make
        self._started: dict[int, _Started[T]] = {}

    def start(self, epoch: int) -> None:
        """Open `epoch`'s stream and fetch its first item in the background (once per epoch)."""
        if epoch not in self._started:
            self._started[epoch] = _Started(self._make(epoch), epoch)

    def take(self, epoch: int) -> Iterator[T]:
        """`epoch`'s items: from the stream started ahead if there is one, else a new stream."""
        started = self._started.pop(epoch, None)
        if started is not None:
            return started.items()
        return iter(self._make(epoch))
