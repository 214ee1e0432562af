"""The worker's handling of flagged rows from the Ray Data stream (pure parts, no Ray started)."""

import numpy as np
import pytest

from harma.train.loop import _check_bad_fraction, _to_torch


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
