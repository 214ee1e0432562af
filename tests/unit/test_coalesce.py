"""BatchCoalescer: what waits for the model thread is merged into its next call."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from harma.serve.coalesce import BatchCoalescer


class GatedModel:
    """A batch function that records its calls; the first call blocks until released."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[list[str]] = []
        self.release = threading.Event()
        self.started = threading.Event()
        self.fail_on = fail_on

    def __call__(self, items: list[str]) -> list[str]:
        self.calls.append(list(items))
        self.started.set()
        self.release.wait(5)
        if self.fail_on in items:
            raise RuntimeError(f"bad item {self.fail_on}")
        return [item.upper() for item in items]


async def _wait_started(model: GatedModel) -> None:
    while not model.started.is_set():
        await asyncio.sleep(0.001)


def test_lone_group_runs_at_once_and_keeps_order():
    model = GatedModel()
    model.release.set()

    async def main():
        coalescer = BatchCoalescer(model, ThreadPoolExecutor(1), max_items=8)
        return await coalescer.submit(["a", "b", "c"]), coalescer

    out, coalescer = asyncio.run(main())
    assert out == ["A", "B", "C"]
    assert model.calls == [["a", "b", "c"]]
    assert (coalescer.calls, coalescer.items) == (1, 3)


def test_groups_arriving_during_a_call_merge_into_the_next_one():
    model = GatedModel()

    async def main():
        coalescer = BatchCoalescer(model, ThreadPoolExecutor(1), max_items=8)
        first = asyncio.ensure_future(coalescer.submit(["a"]))
        await _wait_started(model)  # the model thread is busy with ["a"]
        later = [asyncio.ensure_future(coalescer.submit(group)) for group in (["b"], ["c", "d"], ["e"])]
        await asyncio.sleep(0.01)
        model.release.set()
        return await first, [await f for f in later], coalescer

    first, later, coalescer = asyncio.run(main())
    assert model.calls == [["a"], ["b", "c", "d", "e"]]  # 2 forward passes for 4 groups
    assert first == ["A"]
    assert later == [["B"], ["C", "D"], ["E"]]  # each submitter gets its own slice
    assert (coalescer.calls, coalescer.items) == (2, 5)  # 2.5 queries per forward pass


def test_a_call_never_exceeds_max_items_nor_splits_a_group():
    model = GatedModel()

    async def main():
        coalescer = BatchCoalescer(model, ThreadPoolExecutor(1), max_items=4)
        first = asyncio.ensure_future(coalescer.submit(["a"]))
        await _wait_started(model)
        later = [asyncio.ensure_future(coalescer.submit(g)) for g in (["b", "c"], ["d", "e"], ["f"], ["g"])]
        await asyncio.sleep(0.01)
        model.release.set()
        await first
        return [await f for f in later]

    later = asyncio.run(main())
    assert model.calls == [["a"], ["b", "c", "d", "e"], ["f", "g"]]
    assert later == [["B", "C"], ["D", "E"], ["F"], ["G"]]


def test_an_error_reaches_every_query_of_its_call_and_later_calls_still_run():
    model = GatedModel(fail_on="x")

    async def main():
        coalescer = BatchCoalescer(model, ThreadPoolExecutor(1), max_items=2)
        first = asyncio.ensure_future(coalescer.submit(["a"]))
        await _wait_started(model)
        bad = [asyncio.ensure_future(coalescer.submit(g)) for g in (["x"], ["y"])]
        good = asyncio.ensure_future(coalescer.submit(["z"]))
        await asyncio.sleep(0.01)
        model.release.set()
        results = await asyncio.gather(first, *bad, good, return_exceptions=True)
        return results, coalescer

    (first, bad_x, bad_y, good), coalescer = asyncio.run(main())
    assert first == ["A"] and good == ["Z"]
    assert isinstance(bad_x, RuntimeError) and str(bad_x) == "bad item x"
    assert bad_y is bad_x  # y shared the failing call
    assert model.calls == [["a"], ["x", "y"], ["z"]]
    assert coalescer.calls == 2  # failed calls are not counted as served


def test_a_cancelled_submitter_is_left_out_and_others_are_served():
    model = GatedModel()

    async def main():
        coalescer = BatchCoalescer(model, ThreadPoolExecutor(1), max_items=8)
        first = asyncio.ensure_future(coalescer.submit(["a"]))
        await _wait_started(model)
        gone = asyncio.ensure_future(coalescer.submit(["gone"]))
        kept = asyncio.ensure_future(coalescer.submit(["kept"]))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client hung up before its forward pass
        model.release.set()
        return await first, await kept

    assert asyncio.run(main()) == (["A"], ["KEPT"])
    assert model.calls == [["a"], ["kept"]]


def test_wrong_result_count_is_an_error_not_a_misaligned_answer():
    async def main():
        coalescer = BatchCoalescer(lambda items: items[:-1], ThreadPoolExecutor(1), max_items=8)
        return await coalescer.submit(["a", "b"])

    with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
        asyncio.run(main())


def test_max_items_must_be_positive():
    with pytest.raises(ValueError, match="max_items must be >= 1"):
        BatchCoalescer(lambda items: items, ThreadPoolExecutor(1), max_items=0)


def test_wait_s_must_not_be_negative():
    with pytest.raises(ValueError, match="wait_s must be >= 0"):
        BatchCoalescer(lambda items: items, ThreadPoolExecutor(1), max_items=4, wait_s=-0.1)


def test_wait_s_holds_a_first_query_on_an_idle_model_for_company():
    model = GatedModel()
    model.release.set()

    async def main():
        coalescer = BatchCoalescer(model, ThreadPoolExecutor(1), max_items=8, wait_s=0.2)
        first = asyncio.ensure_future(coalescer.submit(["a"]))
        await asyncio.sleep(0.02)  # well inside the wait: nothing has run yet
        assert model.calls == []
        second = asyncio.ensure_future(coalescer.submit(["b", "c"]))
        return await first, await second

    assert asyncio.run(main()) == (["A"], ["B", "C"])
    assert model.calls == [["a", "b", "c"]]  # one forward pass for both


def test_wait_s_ends_early_once_a_batch_is_full():
    model = GatedModel()
    model.release.set()

    async def main():
        coalescer = BatchCoalescer(model, ThreadPoolExecutor(1), max_items=3, wait_s=30)
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.ensure_future(coalescer.submit(["a"]))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(coalescer.submit(["b", "c"]))
        out = (await first, await second)
        return out, loop.time() - started

    out, took = asyncio.run(main())
    assert out == (["A"], ["B", "C"])
    assert model.calls == [["a", "b", "c"]]
    assert took < 5  # far below wait_s: a full batch does not wait


def test_wait_s_runs_a_lone_query_once_the_wait_is_over():
    model = GatedModel()
    model.release.set()

    async def main():
        coalescer = BatchCoalescer(model, ThreadPoolExecutor(1), max_items=8, wait_s=0.05)
        loop = asyncio.get_running_loop()
        started = loop.time()
        out = await coalescer.submit(["a"])
        return out, loop.time() - started

    out, took = asyncio.run(main())
    assert out == ["A"] and model.calls == [["a"]]
    assert took >= 0.05  # it did wait for company
