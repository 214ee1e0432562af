"""In-memory splits for one process: the local training loop, `harma eval` and tests.

A split is read once (annotations + every image, from a local folder or s3://), decoded and kept
in memory; fine for evaluation sets and small datasets. Streaming large datasets from object
storage into many workers is the Ray Data path's job.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from harma import storage
from harma.config import AugmentConfig
from harma.data.annotations import read_annotations
from harma.data.transforms import decode_image, eval_transform, tokenize, train_transform


class MissingImageError(FileNotFoundError):
    """Images named by an annotation file are missing or undecodable."""


@dataclass
class Split:
    """Images of a split (decoded) and their captions, one row per caption."""

    name: str
    images: list[Image.Image]
    captions: list[str]
    caption_image: np.ndarray  # (C,) index into images
    image_ids: np.ndarray  # (N,) dataset image ids
    labels: list[str | None] | None = None  # (N,) annotation label_name (scene class), if any
    image_keys: list[str] | None = None  # (N,) image paths under the dataset's image folder

    def __len__(self) -> int:
        return len(self.captions)


def load_split(root: str, split: str) -> Split:
    """Read `root/annotations/<split>.json` and decode every image it names."""
    entries = read_annotations(storage.join(root, "annotations", f"{split}.json"))
    images, captions, caption_image, bad = [], [], [], []
    for entry in entries:
        uri = storage.join(root, "images", entry.image)
        try:
            images.append(decode_image(storage.read_bytes(uri)))
        except (OSError, ValueError) as err:
            bad.append(f"{entry.image}: {str(err).splitlines()[0][:120]}")
            continue
        captions.extend(entry.captions)
        caption_image.extend([len(images) - 1] * len(entry.captions))
    if bad:
        listing = "\n  ".join(bad[:20]) + (f"\n  ... ({len(bad)} in all)" if len(bad) > 20 else "")
        raise MissingImageError(f"{len(bad)} image(s) of split {split!r} under {root} unusable:\n  {listing}")
    ids = np.array([e.image_id for e in entries], dtype=np.int64)
    return Split(split, images, captions, np.array(caption_image, dtype=np.int64), ids,
                 [e.label_name for e in entries], [e.image for e in entries])


def eval_arrays(split: Split, size: int, tokenizer, max_words: int) -> tuple[np.ndarray, np.ndarray]:
    """(N,3,size,size) images and (C,ctx) tokens for evaluation."""
    images = np.stack([eval_transform(img, size) for img in split.images])
    return images, tokenize(split.captions, tokenizer, max_words)


def train_batches(
    split: Split,
    size: int,
    tokenizer,
    max_words: int,
    augment: AugmentConfig,
    batch_size: int,
    seed: int,
    grouped: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches of (augmented image, caption, image id), reshuffled every epoch.

    Every caption is one sample (each image appears once per caption per epoch); the pairs are in a
    uniformly random order, as the paper code samples them (`grouped`: images in a random order,
    each image's captions together, as `data.batch_composition: image_grouped`); incomplete final
    batches are dropped, so every step sees `batch_size` pairs.
    """
    if len(split) < batch_size:
        raise ValueError(f"split {split.name!r} has {len(split)} captions, fewer than batch_size {batch_size}")
    rng = random.Random(seed)
    tokens = tokenize(split.captions, tokenizer, max_words)
    by_image = [np.flatnonzero(split.caption_image == i).tolist() for i in range(len(split.images))]
    while True:
        if grouped:
            images = list(range(len(by_image)))
            rng.shuffle(images)
            order = [row for i in images for row in by_image[i]]
        else:
            order = list(range(len(split)))
            rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = order[start : start + batch_size]
            image_index = split.caption_image[rows]
            pixels = np.stack([train_transform(split.images[i], size, augment, rng) for i in image_index])
            yield {
                "image": torch.from_numpy(pixels),
                "tokens": torch.from_numpy(tokens[rows]),
                "image_id": torch.from_numpy(split.image_ids[image_index]),
            }
