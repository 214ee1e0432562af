"""retrieval_metrics against hand-computed values, ties and uneven caption counts included."""

import numpy as np
import pytest

from harma.eval import (
    METRIC_KEYS,
    evaluation_report,
    format_class_table,
    format_table,
    label_from_file_name,
    per_class_metrics,
    resolve_labels,
    retrieval_metrics,
    retrieval_ranks,
)


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


# --- tie protocols: pessimistic (default) vs the paper code's np.argsort reversed ---------------
# Hand cases only use ties whose outcome no sort algorithm can change: two identical rows (or
# columns) are sorted into the same order, so of two images tied for the top of identical rows
# exactly one is first, whichever it is.
TIED_CAPTION_IMAGE = [0, 0, 1, 1, 2]  # c0, c1 -> img0; c2, c3 -> img1; c4 -> img2
TIED_SIM = np.array([
    # c0   c1   c2   c3   c4
    [0.7, 0.2, 0.7, 0.2, 0.1],  # img0: own c0 tied with img1's c2 at the top
    [0.7, 0.2, 0.7, 0.2, 0.1],  # img1: the same row, so the same order: one of img0/img1 is first
    [0.1, 0.1, 0.1, 0.1, 0.9],  # img2: c4 strictly first
])


def test_tie_protocols_differ_on_a_hand_computed_case():
    pess = retrieval_metrics(TIED_SIM, TIED_CAPTION_IMAGE)
    off = retrieval_metrics(TIED_SIM, TIED_CAPTION_IMAGE, ties="official")
    opt = retrieval_metrics(TIED_SIM, TIED_CAPTION_IMAGE, ties="optimistic")
    # i2t. pessimistic: img0 and img1 each have the other's 0.7 caption ahead -> ranks [1, 1, 0].
    # official: one of img0/img1 is first (rank 0), the other second (rank 1) -> R@1 = 2/3.
    assert pess["i2t_r1"] == pytest.approx(100 / 3)
    assert off["i2t_r1"] == pytest.approx(200 / 3)
    assert opt["i2t_r1"] == 100.0
    # t2i. Columns c0 and c2 are both [0.7, 0.7, 0.1] (targets img0 and img1), c1 and c3 both
    # [0.2, 0.2, 0.1]: pessimistic ranks [1, 1, 1, 1, 0] -> 20 %; official: one of each pair is
    # first -> ranks {0, 1}, {0, 1}, 0 -> 3/5.
    assert pess["t2i_r1"] == pytest.approx(20.0)
    assert off["t2i_r1"] == pytest.approx(60.0)
    assert opt["t2i_r1"] == 100.0
    for m in (pess, off, opt):  # galleries of 5 captions / 3 images: always within the top 5
        assert m["i2t_r5"] == m["i2t_r10"] == m["t2i_r5"] == m["t2i_r10"] == 100.0
    assert pess["mr"] == pytest.approx((100 / 3 + 200 + 20 + 200) / 6)  # 75.56
    assert off["mr"] == pytest.approx((200 / 3 + 200 + 60 + 200) / 6)  # 87.78
    assert pess["protocol"] == "pessimistic ties"
    assert off["protocol"] == "official ties (np.argsort reversed)"
    assert opt["protocol"] == "optimistic ties"


def test_official_ties_on_a_constant_model_give_k_over_n():
    # Every row and every column is the same array, so each is sorted into one permutation: the
    # 12 images' captions (and the 12 captions' images) take the positions 0..11 once each.
    n = 12
    sim = np.full((n, n), 0.5)
    off = retrieval_metrics(sim, list(range(n)), ties="official")
    pess = retrieval_metrics(sim, list(range(n)))
    for way in ("i2t", "t2i"):
        assert off[f"{way}_r1"] == pytest.approx(100 / 12)
        assert off[f"{way}_r5"] == pytest.approx(500 / 12)
        assert off[f"{way}_r10"] == pytest.approx(1000 / 12)
        assert pess[f"{way}_r1"] == pess[f"{way}_r5"] == pess[f"{way}_r10"] == 0.0  # rank 11 each


def test_official_ties_equal_the_default_without_ties():
    caption_image = [0, 0, 1, 2, 2, 2]
    sim = np.array([[0.10, 0.90, 0.95, 0.20, 0.30, 0.00],
                    [0.80, 0.10, 0.50, 0.60, 0.70, 0.20],
                    [0.00, 0.10, 0.20, 0.30, 0.90, 0.40]])
    off = retrieval_metrics(sim, caption_image, ties="official")
    assert off["i2t_r1"] == pytest.approx(100 / 3) and off["t2i_r1"] == pytest.approx(50.0)
    pess = retrieval_metrics(sim, caption_image)
    assert {k: off[k] for k in METRIC_KEYS} == {k: pess[k] for k in METRIC_KEYS}


def _paper_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """A direct transcription of the paper code's `itm_eval` (Retrieval.py), ranks returned too."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    tr1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    tr5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    tr10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    i2t_ranks = ranks
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    ir5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    ir10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    r_mean = ((tr1 + tr5 + tr10) / 3 + (ir1 + ir5 + ir10) / 3) / 2
    metrics = {"i2t_r1": tr1, "i2t_r5": tr5, "i2t_r10": tr10, "t2i_r1": ir1, "t2i_r5": ir5,
               "t2i_r10": ir10, "mr": r_mean}
    return metrics, i2t_ranks, ranks


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_official_ties_match_the_paper_loop_on_random_tied_matrices(seed, dtype):
    rng = np.random.default_rng(seed)
    n_images = 60
    if seed == 2:  # uneven caption counts, captions in a shuffled order
        caption_image = rng.permutation(np.concatenate([np.arange(n_images), rng.integers(0, n_images, 200)]))
    else:  # the RSITMD/RSICD layout: 5 captions per image, caption j of image j // 5
        caption_image = np.repeat(np.arange(n_images), 5)
    sim = np.round(rng.random((n_images, len(caption_image))), 1).astype(dtype)  # many ties
    img2txt = {i: np.flatnonzero(caption_image == i).tolist() for i in range(n_images)}
    expected, exp_i2t, exp_t2i = _paper_itm_eval(sim, sim.T, caption_image.tolist(), img2txt)

    i2t, t2i = retrieval_ranks(sim, caption_image, ties="official")
    np.testing.assert_array_equal(i2t, exp_i2t)
    np.testing.assert_array_equal(t2i, exp_t2i)
    off = retrieval_metrics(sim, caption_image, ties="official")
    for key in METRIC_KEYS:
        assert off[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key
    # The ties matter here, and the official ranks lie between the two deterministic bounds.
    pess_i2t, pess_t2i = retrieval_ranks(sim, caption_image)
    opt_i2t, opt_t2i = retrieval_ranks(sim, caption_image, ties="optimistic")
    assert (pess_i2t != i2t).any() and (pess_t2i != t2i).any()
    assert (opt_i2t <= i2t).all() and (i2t <= pess_i2t).all()
    assert (opt_t2i <= t2i).all() and (t2i <= pess_t2i).all()


def test_unknown_tie_protocol_is_rejected():
    with pytest.raises(ValueError, match="ties must be one of"):
        retrieval_metrics(np.eye(2), [0, 1], ties="stable")


# --- per scene class ------------------------------------------------------------------------------
def test_per_class_breakdown_hand_computed():
    labels = ["farm", "port", "farm", None]  # img3 unlabelled: in the gallery, no class's query
    caption_image = [0, 0, 1, 2, 3]
    sim = np.array([
        # c0    c1    c2    c3    c4
        [0.90, 0.30, 0.50, 0.10, 0.20],  # img0 (farm): own c0 first -> rank 0
        [0.60, 0.10, 0.40, 0.80, 0.70],  # img1 (port): own c2 (0.4) behind c0, c3, c4 -> rank 3
        [0.20, 0.95, 0.30, 0.50, 0.10],  # img2 (farm): own c3 (0.5) behind c1 -> rank 1
        [0.10, 0.20, 0.30, 0.40, 0.05],  # img3 (none): own c4 last -> rank 4
    ])
    # t2i ranks: c0 -> img0 0.90 first: 0; c1 -> img0 0.30 behind img2: 1; c2 -> img1 0.40 behind
    # img0: 1; c3 -> img2 0.50 behind img1: 1; c4 -> img3 0.05 last: 3.
    for ties in ("pessimistic", "official"):  # no tie involves a relevant item: both agree
        out = per_class_metrics(sim, caption_image, labels, ties=ties)
        assert out["unlabelled_images"] == 1 and list(out["classes"]) == ["farm", "port"]
        farm, port = out["classes"]["farm"], out["classes"]["port"]
        assert (farm["images"], farm["captions"], port["images"], port["captions"]) == (2, 3, 1, 1)
        assert farm["i2t_r1"] == pytest.approx(50.0) and farm["t2i_r1"] == pytest.approx(100 / 3)
        assert port["i2t_r1"] == 0.0 and port["t2i_r1"] == 0.0
        assert farm["i2t_r5"] == farm["t2i_r10"] == port["i2t_r5"] == port["t2i_r5"] == 100.0
        assert farm["mr"] == pytest.approx((50 + 200 + 100 / 3 + 200) / 6)
        assert port["mr"] == pytest.approx(400 / 6)
    assert out["protocol"] == "official ties (np.argsort reversed)"


def test_per_class_protocols_differ_on_the_tied_case():
    pess = per_class_metrics(TIED_SIM, TIED_CAPTION_IMAGE, ["a", "a", "b"])["classes"]
    off = per_class_metrics(TIED_SIM, TIED_CAPTION_IMAGE, ["a", "a", "b"], ties="official")["classes"]
    assert pess["a"]["i2t_r1"] == 0.0 and off["a"]["i2t_r1"] == 50.0  # ranks [1, 1] vs {0, 1}
    assert pess["a"]["t2i_r1"] == 0.0 and off["a"]["t2i_r1"] == 50.0  # c0..c3: 0/4 vs 2/4
    assert pess["b"]["i2t_r1"] == off["b"]["i2t_r1"] == pess["b"]["t2i_r1"] == 100.0


@pytest.mark.parametrize("ties", ["pessimistic", "official"])
def test_class_figures_weighted_by_queries_average_to_the_overall_ones(ties):
    rng = np.random.default_rng(7)
    caption_image = np.repeat(np.arange(40), 5)
    sim = np.round(rng.random((40, 200)), 1)
    labels = [("farm", "port", "forest")[i % 3] for i in range(40)]
    classes = per_class_metrics(sim, caption_image, labels, ties=ties)["classes"]
    overall = retrieval_metrics(sim, caption_image, ties=ties)
    assert sum(c["images"] for c in classes.values()) == 40
    for key in METRIC_KEYS[:-1]:
        weight = "images" if key.startswith("i2t") else "captions"
        total = sum(c[weight] for c in classes.values())
        assert sum(c[key] * c[weight] for c in classes.values()) / total == pytest.approx(overall[key])


def test_per_class_needs_one_label_per_image():
    with pytest.raises(ValueError, match="one entry per image"):
        per_class_metrics(np.eye(2), [0, 1], ["a"])


def test_labels_come_from_label_name_else_the_numbered_file_name():
    assert label_from_file_name("test/park_217.tif") == "park"
    assert label_from_file_name("train/denseresidential_12.jpg") == "denseresidential"
    assert label_from_file_name("test/00578.jpg") is None
    assert label_from_file_name("notes.txt") is None
    labels, sources = resolve_labels(["farm", None, None, ""], ["a/x_1.png", "t/bridge_9.tif", "t/0001.jpg",
                                                             "t/port_3.png"], 4)
    assert labels == ["farm", "bridge", None, "port"]
    assert sources == {"label_name": 1, "file_name": 2, "none": 1}


def test_evaluation_report_holds_both_protocols_and_the_breakdown():
    report = evaluation_report(TIED_SIM, TIED_CAPTION_IMAGE, ["a", "a", "b"])
    assert report["metrics"]["protocol"] == "pessimistic ties"
    assert report["metrics"]["t2i_r1"] == pytest.approx(20.0)
    assert report["metrics_official"]["t2i_r1"] == pytest.approx(60.0)
    per_class = report["per_class"]
    assert per_class["official"]["classes"]["a"]["i2t_r1"] == 50.0
    assert per_class["pessimistic"]["classes"]["a"]["i2t_r1"] == 0.0
    assert per_class["label_sources"] == {"label_name": 3, "file_name": 0, "none": 0}
    table = format_class_table(per_class)
    row = [cell for cell in table.splitlines()[2].split() if cell != "|"]
    # class a: 2 images, 4 captions; pessimistic R@1 0 / 0, mR (0+100+100+0+100+100)/6; official 50 / 50
    assert row == ["a", "2", "4", "0.00", "0.00", "66.67", "50.00", "50.00", "83.33"]
    assert evaluation_report(TIED_SIM, TIED_CAPTION_IMAGE)["per_class"] is None  # no labels at all
