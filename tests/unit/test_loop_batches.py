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

    monkeypatch.setattr(builtins, "print", redirected_print)
    with caplog.at_level(logging.INFO):
        _log_progress(50, 200, {"loss": 3.25, "lr": 1e-3}, t_start=0.0, first=0)
    seen = capsys.readouterr().out + capsys.readouterr().err + caplog.text
    assert seen.count("[harma] step 50/200  loss 3.2500  lr 1.00e-03") == 1, seen
    assert [r.name for r in caplog.records if "[harma] step" in r.getMessage()] == ["harma.train.loop"]
