"""BatchCoalescer: the dynamic batching of a Serve replica, for one model thread.

    coalescer = BatchCoalescer(encode_and_search, ThreadPoolExecutor(1), max_items=32, wait_s=0.0)
    results = await coalescer.submit(jobs)          # from any coroutine on the event loop

Queries go straight to the coalescer. While the model thread runs one call, everything submitted
meanwhile is merged into the next call (up to `max_items` queries, never splitting a submitted
group), so batches fill exactly when the model is busy and a lone query at low load runs at once.
`wait_s > 0` also holds a first query on an idle model thread that long for company.

Why not Serve's `@serve.batch`: its loop forms the next batch as soon as it has handed the
previous one off, not when the model is free. When a forward pass takes much longer than its
`batch_wait_timeout_s` (ViT-B-32 on a CPU, a big batch on a GPU), the requests that arrive during
it form many small batches that then run one after another, so a saturated replica ran at about
its single-query rate (ViT-B-32 on 2 CPU cores: 10 q/s against 21 q/s batched). Its task hops
and per-batch metrics also cost a lone query time on a small machine.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class BatchCoalescer(Generic[T, R]):
    """Runs `run(items) -> results` (one result per item, same order) on `executor`, one call at
    a time, each call merging every group submitted while the previous one ran."""

    def __init__(self, run: Callable[[list[T]], list[R]], executor: Executor, max_items: int,
                 wait_s: float = 0.0, on_call: Callable[[int, int], None] | None = None):
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        self._run = run
        self._executor = executor
        self.max_items = max_items
        self.wait_s = wait_s
        self._pending: deque[tuple[list[T], asyncio.Future]] = deque()
        self._arrived: asyncio.Event | None = None
        self._drainer: asyncio.Task | None = None
        self.calls = 0  # forward passes run
        self.items = 0  # queries they carried
        self._on_call = on_call  # (queries in the call, queries still waiting), after each call

    @property
    def queued(self) -> int:
        """Queries waiting for a call."""
        return sum(len(items) for items, _ in self._pending)

    async def submit(self, items: list[T]) -> list[R]:
        """Results for `items`, computed in the next call the model thread makes."""
        if not items:
            return []
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._pending.append((items, future))
        if self._arrived is not None:
            self._arrived.set()
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return await future

    def _next_call(self) -> list[tuple[list[T], asyncio.Future]]:
        """Whole groups in arrival order, at most `max_items` queries (always at least one group)."""
        groups = [self._pending.popleft()]
        size = len(groups[0][0])
        while self._pending and size + len(self._pending[0][0]) <= self.max_items:
            size += len(self._pending[0][0])
            groups.append(self._pending.popleft())
        return groups

    async def _wait_for_company(self) -> None:
        """Hold the first query of an idle model up to `wait_s`, or until a batch is full."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        self._arrived = asyncio.Event()
        try:
            while (sum(len(items) for items, _ in self._pending) < self.max_items
                   and (left := deadline - loop.time()) > 0):
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
        finally:
            self._arrived = None

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        if self.wait_s > 0:
            await self._wait_for_company()
        while self._pending:
            groups = [(items, fut) for items, fut in self._next_call() if not fut.done()]  # skip cancelled
            if not groups:
                continue
            flat = [item for items, _ in groups for item in items]
            try:
                results = await loop.run_in_executor(self._executor, self._run, flat)
                if len(results) != len(flat):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(flat)} items")
            except Exception as err:  # every query of the call gets the error; later calls go on
                for _, fut in groups:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            self.calls += 1
            self.items += len(flat)
            if self._on_call is not None:
                self._on_call(len(flat), self.queued)
            start = 0
            for items, fut in groups:
                if not fut.done():
                    fut.set_result(results[start:start + len(items)])
                start += len(items)
