"""retrieval_metrics against hand-computed values, ties and uneven caption counts included."""

import numpy as np
import pytest

from harma.eval import format_table, retrieval_metrics


def test_hand_computed_with_uneven_caption_counts():
    # 3 images; captions: c0,c1 -> img0; c2 -> img1; c3,c4,c5 -> img2.
    caption_image = [0, 0, 1, 2, 2, 2]
    sim = np.array([
        # c0    c1    c2    c3    c4    c5
        [0.10, 0.90, 0.95, 0.20, 0.30, 0.00],  # img0: best relevant c1 (0.90); c2 above -> rank 1
        [0.80, 0.10, 0.50, 0.60, 0.70, 0.20],  # img1: c2 (0.50); c0, c3, c4 above -> rank 3
        [0.00, 0.10, 0.20, 0.30, 0.90, 0.40],  # img2: best c4 (0.90) is first -> rank 0
    ])
    m = retrieval_metrics(sim, caption_image)
    # i2t ranks [1, 3, 0]: R@1 = 1/3, R@5 = R@10 = 3/3.
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert m["i2t_r5"] == pytest.approx(100) and m["i2t_r10"] == pytest.approx(100)
    # t2i: column-wise rank of the caption's image.
    # c0 -> img0 0.10 vs (0.80, 0.00): rank 1; c1 -> img0 0.90: rank 0; c2 -> img1 0.50 vs (0.95, 0.20): 1
    # c3 -> img2 0.30 vs (0.20, 0.60): 1; c4 -> img2 0.90: 0; c5 -> img2 0.40 vs (0.00, 0.20): 0
    assert m["t2i_r1"] == pytest.approx(300 / 6)
    assert m["t2i_r5"] == pytest.approx(100)
    expected_mr = (100 / 3 + 100 + 100 + 50 + 100 + 100) / 6
    assert m["mr"] == pytest.approx(expected_mr)


def test_r5_and_r10_boundaries():
    # 12 images with one caption each; caption j's image ranks exactly j among 12.
    n = 12
    sim = np.zeros((n, n))
    for j in range(n):
        order = [i for i in range(n) if i != j]
        sim[order[:j], j] = 1.0  # j images score above the right one
        sim[j, j] = 0.5
    for i in range(n):
        sim[i, i] = 0.5
    m = retrieval_metrics(sim, list(range(n)))
    assert m["t2i_r1"] == pytest.approx(100 / 12)
    assert m["t2i_r5"] == pytest.approx(500 / 12)
    assert m["t2i_r10"] == pytest.approx(1000 / 12)


def test_ties_are_pessimistic_by_default_and_optimistic_on_request():
    sim = np.array([[0.5, 0.5], [0.5, 0.5]])  # a constant model
    pess = retrieval_metrics(sim, [0, 1])
    assert pess["i2t_r1"] == 0.0 and pess["t2i_r1"] == 0.0
    assert pess["i2t_r5"] == 100.0  # a 2-item gallery is always within the top 5
    opt = retrieval_metrics(sim, [0, 1], ties="optimistic")
    assert opt["i2t_r1"] == 100.0 and opt["t2i_r1"] == 100.0


def test_tie_between_two_relevant_captions_is_not_a_miss():
    # img0 has two captions with the same score; an irrelevant caption scores lower.
    m = retrieval_metrics([[0.7, 0.7, 0.1], [0.1, 0.2, 0.9]], [0, 0, 1])
    assert m["i2t_r1"] == 100.0


def test_invalid_inputs_are_rejected_with_clear_messages():
    with pytest.raises(ValueError, match="one entry per caption"):
        retrieval_metrics(np.zeros((2, 3)), [0, 1])
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(np.zeros((3, 3)), [0, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[np.nan, 0.0], [0.0, 1.0]]), [0, 1])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        retrieval_metrics(np.zeros((2, 2)), [0, 2])
    with pytest.raises(ValueError, match="integer"):
        retrieval_metrics(np.zeros((2, 2)), [0.0, 1.0])


def test_table_has_every_metric():
    m = retrieval_metrics(np.eye(3), [0, 1, 2])
    text = format_table({"model": m})
    assert "100.00" in text and "mR" in text
