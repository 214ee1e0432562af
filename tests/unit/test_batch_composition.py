"""Batches as the paper code makes them (harma.data.composition, harma.data.datasets.emit_pairs,
harma.data.local.train_batches): the same-image share measured, its uniform-sampling expectation
derived independently, and both training paths' orders held against it."""

import io
import itertools
import random

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from harma.config import AugmentConfig
from harma.data.composition import pair_order, same_image_share, uniform_same_image_share
from harma.data.datasets import emit_pairs, image_visits
from harma.data.local import Split, train_batches
from harma.data.tokenizer import ClipTokenizer


def test_same_image_share_counts_samples_whose_image_is_repeated():
    assert same_image_share([1, 1, 2, 3]) == 0.5
    assert same_image_share([4, 4, 4, 9, 9, 1]) == 5 / 6
    assert same_image_share([1, 2, 3]) == 0.0 and same_image_share([]) == 0.0


def _enumerated_share(counts: list[int], batch: int) -> float:
    """Mean share over every batch-subset of the pairs: the definition, by brute force."""
    ids = [i for i, c in enumerate(counts) for _ in range(c)]
    shares = [same_image_share([ids[k] for k in subset]) for subset in itertools.combinations(range(len(ids)), batch)]
    return float(np.mean(shares))


@pytest.mark.parametrize("counts,batch", [([2, 2, 1], 2), ([5, 5, 5], 4), ([3, 1, 4, 2], 5), ([5] * 4, 7)])
def test_the_uniform_expectation_equals_the_mean_over_every_possible_batch(counts, batch):
    assert uniform_same_image_share(counts, batch) == pytest.approx(_enumerated_share(counts, batch), abs=1e-12)


def test_the_uniform_expectation_of_rsitmd_and_its_limits():
    # RSITMD train: 3,435 images x 5 captions, global batch 428 (2 x 214):
    # 1 - (16747 * 16746 * 16745 * 16744) / (17174 * 17173 * 17172 * 17171)
    by_hand = 1 - (16747 * 16746 * 16745 * 16744) / (17174 * 17173 * 17172 * 17171)
    assert uniform_same_image_share([5] * 3435, 428) == pytest.approx(by_hand, rel=1e-12)
    assert round(100 * by_hand, 1) == 9.6
    assert uniform_same_image_share([1] * 50, 10) == 0.0  # one caption each: nobody has a sibling
    assert uniform_same_image_share([5] * 10, 50) == 1.0  # the whole split in one batch
    with pytest.raises(ValueError, match="batch of 60 pairs from a split of 50"):
        uniform_same_image_share([5] * 10, 60)


def test_pair_order_is_a_permutation_of_every_pair_and_grouped_keeps_captions_together():
    counts = [3, 1, 2]
    every = [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 1)]
    assert pair_order(counts, random.Random(0), grouped=True) == every
    orders = {tuple(pair_order(counts, random.Random(seed))) for seed in range(200)}
    assert all(sorted(o) == every for o in orders)
    assert len(orders) > 100  # 6!/(3!*2!)... many distinct orders: not a fixed shuffle


def _png(value: int, size: int = 6) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (value, 255 - value, 7)).save(out, format="PNG")
    return out.getvalue()


def _rows(n: int, captions: int = 5, bad: tuple[int, ...] = ()) -> pa.Table:
    return pa.table({
        "image": [b"not an image" if i in bad else _png(i) for i in range(n)],
        "image_key": [f"{i}.png" for i in range(n)], "image_id": list(range(100, 100 + n)),
        "captions": [[f"image {i} caption {c}" for c in range(captions)] for i in range(n)],
    })


def _raw_pixels(img, rng):
    return np.asarray(img).transpose(2, 0, 1).copy()


def _emit(rows, seed=0, **kwargs):
    out = list(emit_pairs(rows, random.Random(seed), _raw_pixels, context_length=16, max_words=30, **kwargs))
    return out, {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def test_a_task_emits_every_pair_once_with_its_own_image_in_chunks():
    out, pairs = _emit(_rows(20), pairs_per_chunk=16)
    assert [len(o["image_id"]) for o in out] == [16] * 6 + [4]
    assert sorted(pairs["image_id"].tolist()) == sorted(list(range(100, 120)) * 5)
    # every pair's pixels are its own image's (red channel = the image's index)
    assert (pairs["pixels"][:, 0, 0, 0] == pairs["image_id"] - 100).all()
    assert pairs["tokens"].shape == (100, 16) and (pairs["bad_key"] == "").all()


def test_a_tiny_decoded_image_budget_decodes_again_and_gives_the_same_pairs():
    _, roomy = _emit(_rows(12), seed=3)
    _, tight = _emit(_rows(12), seed=3, decoded_bytes=1)  # keeps only the image in hand
    assert np.array_equal(roomy["image_id"], tight["image_id"])
    assert np.array_equal(roomy["pixels"], tight["pixels"]) and np.array_equal(roomy["tokens"], tight["tokens"])


def test_an_undecodable_image_is_one_flagged_row_and_its_other_pairs_are_skipped():
    _, pairs = _emit(_rows(6, bad=(2,)))
    assert pairs["bad_key"].tolist().count("2.png") == 1
    flagged = pairs["image_id"] == -1
    assert flagged.sum() == 1 and pairs["bad_key"][flagged].tolist() == ["2.png"]
    assert sorted(pairs["image_id"][~flagged].tolist()) == sorted([100, 101, 103, 104, 105] * 5)


def test_the_visits_of_a_task_share_out_every_pair_once_and_an_image_at_most_once_each():
    rows = _rows(20, captions=5)
    visits = [_emit(rows, seed=v, visit=v, visits=5)[1] for v in range(5)]
    pairs = sorted((int(i), str(t)) for p in visits for i, t in zip(p["image_id"], map(bytes, p["tokens"]), strict=True))
    whole = sorted((int(i), str(t)) for i, t in zip(_emit(rows)[1]["image_id"], map(bytes, _emit(rows)[1]["tokens"]),
                                                      strict=True))
    assert pairs == whole  # every (image, caption) once over the visits
    for p in visits:  # 5 captions, 5 visits: each image once per visit, with its own pixels
        assert sorted(p["image_id"].tolist()) == list(range(100, 120))
        assert (p["pixels"][:, 0, 0, 0] == p["image_id"] - 100).all()
    # 7 captions over 3 visits: 3, 2, 2 (or a rotation) of each image's captions per visit
    seven = _rows(4, captions=7)
    per_visit = [np.bincount(_emit(seven, visit=v, visits=3)[1]["image_id"] - 100, minlength=4) for v in range(3)]
    assert all(sorted(col) == [2, 2, 3] for col in np.array(per_visit).T)


def test_an_undecodable_image_is_flagged_once_over_all_its_visits():
    flagged = [(p["bad_key"] == "2.png").sum() for p in (_emit(_rows(6, bad=(2,)), visit=v, visits=5)[1]
                                                         for v in range(5))]
    assert sum(flagged) == 1


def test_auto_visits_are_one_while_the_buffer_holds_the_split_else_the_most_captions():
    assert image_visits([5] * 400, 2048) == 1  # 2,000 pairs fit
    assert image_visits([5] * 410, 2048) == 5
    assert image_visits([5, 7, 3] * 200, 2048) == 7


def _mean_share(ids: np.ndarray, batch: int) -> float:
    usable = len(ids) // batch * batch
    return float(np.mean([same_image_share(ids[i:i + batch]) for i in range(0, usable, batch)]))


def test_a_task_order_cut_into_batches_matches_uniform_sampling_and_grouped_does_not():
    rows, batch = _rows(40), 16  # 200 pairs: uniform expectation 27.3 %
    expected = uniform_same_image_share([5] * 40, batch)
    uniform = np.mean([_mean_share(_emit(rows, seed=s)[1]["image_id"], batch) for s in range(60)])
    grouped = _mean_share(_emit(rows, grouped=True)[1]["image_id"], batch)
    assert uniform == pytest.approx(expected, abs=0.02)
    assert grouped > 0.9  # 16 consecutive pairs of 5-caption images: nearly all share


def test_the_in_process_loop_batches_match_uniform_sampling_and_grouped_does_not():
    images = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(60)]
    caption_image = np.repeat(np.arange(60), 5)
    split = Split("train", images, [f"caption {i}" for i in range(300)], caption_image, np.arange(60) + 1000)
    plain = AugmentConfig(enabled=False)
    tok = ClipTokenizer(16)

    def share(grouped: bool) -> float:
        batches = train_batches(split, 8, tok, 30, plain, 20, seed=1, grouped=grouped)
        return float(np.mean([same_image_share(next(batches)["image_id"].numpy()) for _ in range(900)]))

    assert share(False) == pytest.approx(uniform_same_image_share([5] * 60, 20), abs=0.02)  # 23.3 %
    assert share(True) > 0.9
