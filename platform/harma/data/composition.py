"""What a training batch is made of: the share of samples that meet another caption of their own
image in their (global) batch, measured and as uniform sampling would give it.

    same_image_share(ids_of_one_global_batch)          # measured, for one batch
    uniform_same_image_share(captions_per_image, 428)   # expected under the paper code's sampling
    pair_order(captions_per_row, rng, grouped=False)    # the (row, caption) order a stream task emits

The paper code samples (image, caption) pairs uniformly (a shuffled DistributedSampler over one
entry per caption, harma-method.md section 3), so a batch of B out of P pairs is a uniform random
B-subset. A sample whose image has c captions shares its batch with none of its c-1 siblings with
probability C(P-B, c-1) / C(P-1, c-1) (all siblings among the P-B pairs left out, hypergeometric),
so the expected share is

    E = sum_i c_i / P * (1 - prod_{j=0}^{c_i-2} (P-B-j) / (P-1-j)).

RSITMD (3,435 images x 5 captions, B = 428): E = 9.6 %. Those siblings are the triplet loss's false
negatives (it treats same-image captions as negatives, as the paper code does) and the images a
batch does not hold.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np


def same_image_share(image_ids: Sequence[int] | np.ndarray) -> float:
    """Share of the batch's samples whose image id occurs more than once in the batch."""
    ids = np.asarray(image_ids)
    if ids.size == 0:
        return 0.0
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    return float((counts[inverse] > 1).mean())


def uniform_same_image_share(captions_per_image: Sequence[int], batch_size: int) -> float:
    """Expected `same_image_share` of a batch of `batch_size` pairs drawn uniformly without
    replacement from every (image, caption) pair of a split whose images have these caption counts."""
    counts = np.asarray([c for c in captions_per_image if c > 0], dtype=np.int64)
    pairs = int(counts.sum())
    if batch_size > pairs:
        raise ValueError(f"batch of {batch_size} pairs from a split of {pairs}")
    expected = 0.0
    for c, images in zip(*np.unique(counts, return_counts=True), strict=True):
        j = np.arange(int(c) - 1)
        alone = float(np.prod((pairs - batch_size - j) / (pairs - 1 - j))) if c > 1 else 1.0
        expected += int(images) * int(c) * (1.0 - alone)
    return expected / pairs


def pair_order(captions_per_row: Sequence[int], rng: random.Random, grouped: bool = False,
               ) -> list[tuple[int, int]]:
    """(row, caption index) of every pair of a stream task's image rows, in the order it emits them.

    Uniform (default): a uniformly random order of all the task's pairs, so an image's captions are
    spread over the task's whole output (its siblings are as likely as any other pair to reach the
    same batch). `grouped`: each image's captions one after the other, rows in the given order (the
    stream's former behaviour; batches then hold several captions of one image).
    """
    pairs = [(row, c) for row, n in enumerate(captions_per_row) for c in range(n)]
    if not grouped:
        rng.shuffle(pairs)
    return pairs
