"""The worker's handling of flagged rows from the Ray Data stream (pure parts, no Ray started)."""

import builtins
import logging

import numpy as np
import pytest

from harma.train.loop import _check_bad_fraction, _log_progress, _to_torch


def test_flagged_rows_are_dropped_and_named():
    batch = {
        "pixels": np.arange(3 * 3 * 2 * 2, dtype=np.uint8).reshape(3, 3, 2, 2),
        "tokens": np.array([[1, 2], [3, 4], [5, 6]]),
        "image_id": np.array([7, -1, 9]),
        "bad_key": np.array(["", "train/broken.png", ""], dtype=object),
    }
    tensors, bad = _to_torch(batch)
    assert bad == ["train/broken.png"]
    assert tensors["image_id"].tolist() == [7, 9]
    assert tensors["tokens"].tolist() == [[1, 2], [5, 6]]
    assert tensors["image"].shape == (2, 3, 2, 2)


def test_bad_fraction_counts_distinct_images_and_stops_with_their_names():
    _check_bad_fraction(["a.png"] * 50, total_images=100, limit=0.01)  # one image, met 50 times
    with pytest.raises(ValueError, match=r"2 unusable images .*max_bad_fraction=0.01.*a.png, b.png"):
        _check_bad_fraction(["a.png", "b.png", "a.png"], total_images=100, limit=0.01)


def test_progress_reaches_the_log_once_under_ray_trains_print_patch(capsys, caplog, monkeypatch):
    """Ray Train workers replace print() with one that logs *and*, when stdout is wrapped (as in
    a Ray worker; here by capsys), prints too: a printed progress line showed twice."""
    from ray.train.v2._internal.logging.patch_print import redirected_print

    root = logging.getLogger()  # only pytest's handlers: others left by earlier tests may be stale
    monkeypatch.setattr(root, "handlers", [h for h in root.handlers if type(h).__module__.startswith("_pytest")])
    monkeypatch.setattr(builtins, "print", redirected_print)
    with caplog.at_level(logging.INFO):
        _log_progress(50, 200, {"loss": 3.25, "lr": 1e-3}, t_start=0.0, first=0, input_wait=0.125)
    captured = capsys.readouterr()
    line = "[harma] step 50/200  loss 3.2500  lr 1.00e-03"
    assert line not in captured.out + captured.err  # printed, it would also be logged below
    assert [r.name for r in caplog.records if line in r.getMessage()] == ["harma.train.loop"]
    assert "input wait 12%" in caplog.text


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_input_wait_meter_times_only_the_waits_for_batches():
    from harma.train.input_wait import InputWaitMeter

    clock = FakeClock()

    def stream(waits):  # each batch takes `wait` seconds to arrive; the end takes 0.5 s
        for wait in waits:
            clock.now += wait
            yield wait
        clock.now += 0.5

    meter = InputWaitMeter(clock)
    for _ in meter.batches(stream([4.0, 1.0, 0.0])):
        clock.now += 2.0  # the step: not input wait
    assert meter.first_batch_s == 4.0 and meter.epoch_wait_s == 5.5 and meter.total_wait_s == 5.5
    assert meter.startup_wait_s == 4.0
    # wall since creation: 5.5 waiting + 3 x 2.0 stepping
    assert meter.window_fraction() == pytest.approx(5.5 / 11.5)
    clock.now += 1.0
    assert meter.window_fraction() == 0.0  # a new window: no wait in it
    for _ in meter.batches(stream([3.0])):
        pass
    assert meter.first_batch_s == 3.0 and meter.epoch_wait_s == 3.5  # per epoch
    assert meter.total_wait_s == 9.0  # across epochs
    assert meter.startup_wait_s == 4.0  # the first epoch's first batch, kept
    assert meter.window_fraction() == 1.0


def test_input_wait_meter_passes_errors_through():
    from harma.train.input_wait import InputWaitMeter

    def broken():
        yield 1
        raise OSError("shard unreachable")

    meter = InputWaitMeter()
    with pytest.raises(OSError, match="shard unreachable"):
        list(meter.batches(broken()))
