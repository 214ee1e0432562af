"""Ray Data: stream prepared shards from object storage to Ray Train workers.

    ds = build_train_dataset(cfg.data, arch_name, image_size, seed)
    TorchTrainer(..., datasets={"train": ds})   # workers: ray.train.get_dataset_shard("train")

Reading, decoding, augmentation and tokenisation all run in Ray Data tasks with fractional CPU
requests (so they never starve next to the Train workers on a small machine); nothing is copied
to local disk. Each image row becomes one row per caption, each with its own augmentation draw.
File order is reshuffled on every pass (every epoch re-executes the pipeline; streaming, no
all-to-all step), and the workers add a local shuffle buffer. An undecodable image becomes one row
with `image_id == -1` and its key in `bad_key`, which the worker counts, names in the run report
and drops.
"""

from __future__ import annotations

import random
from functools import lru_cache

import numpy as np
from ray.data import FileShuffleConfig

import ray
from harma import storage
from harma.config import AugmentConfig, DataConfig
from harma.data.prepared import split_files
from harma.data.transforms import augment_image, decode_image, to_uint8, tokenize

READ_CPUS = 0.25
MAP_CPUS = 0.5
# Ray Data's Parquet reader (2.60) lists files through 32 footer-reading actors, new processes,
# started again at every execution, i.e. every epoch: on the demo each epoch's first batch took
# 4-8 s, 2 s with one actor (the `input wait` figures of the progress lines). One actor
# reads footers 128 at a time, plenty for thousands of shards. Set in the driver and forwarded to
# the workers by harma.train.driver (a value already in the environment is kept).
FOOTER_ACTORS_VAR = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FOOTER_ACTORS = "1"


@lru_cache(maxsize=4)
def _tokenizer(arch: str):
    from harma.model.backbone import build_tokenizer

    return build_tokenizer(arch)


def pairs_from_images(
    batch: dict[str, np.ndarray], arch: str, size: int, augment: dict, max_words: int,
    seed: int | None = None,
) -> dict[str, np.ndarray]:
    """Map function: image rows -> one augmented (pixels, tokens, image_id) row per caption.

    Pixels stay uint8 (3, size, size), 4x smaller than float32 between processes; the worker
    normalises them on its device (`transforms.normalize_pixels`).
    """
    cfg = AugmentConfig.model_validate(augment)
    # Fresh randomness unless seeded; seeded draws depend only on the seed and the images.
    rng = random.Random(None if seed is None else f"{seed}-{','.join(map(str, batch['image_id']))}")
    pixels, captions, ids, bad = [], [], [], []
    for data, key, image_id, caps in zip(batch["image"], batch["image_key"], batch["image_id"],
                                         batch["captions"], strict=True):
        try:
            img = decode_image(bytes(data))
        except (OSError, ValueError):
            pixels.append(np.zeros((3, size, size), np.uint8))
            captions.append("")
            ids.append(-1)
            bad.append(str(key))
            continue
        for caption in list(caps):
            pixels.append(to_uint8(augment_image(img, size, cfg, rng)))
            captions.append(str(caption))
            ids.append(int(image_id))
            bad.append("")
    tokens = tokenize(captions, _tokenizer(arch), max_words)
    return {"pixels": np.stack(pixels), "tokens": tokens, "image_id": np.array(ids, np.int64),
            "bad_key": np.array(bad, dtype=object)}


def build_train_dataset(data: DataConfig, arch: str, image_size: int, seed: int = 0) -> ray.data.Dataset:
    """The training stream of `data.prepared_uri`'s train split (seeded if `data.deterministic`)."""
    files = split_files(data.prepared_uri, data.train_split)
    fs, _ = storage.resolve(files[0])
    paths = [storage.resolve(f)[1] for f in files]
    # File order reshuffled on every execution (epoch), reseeded per epoch when seeded. Not
    # randomize_block_order(): an all-to-all step that held back every block until all shards
    # were read, so each epoch began with seconds of input wait.
    shuffle = FileShuffleConfig(seed=seed if data.deterministic else None, reseed_after_execution=True)
    ds = ray.data.read_parquet(paths, filesystem=fs, num_cpus=READ_CPUS, shuffle=shuffle,
                               columns=["image", "image_key", "image_id", "captions"])
    return ds.map_batches(
        pairs_from_images,
        fn_kwargs={"arch": arch, "size": image_size, "augment": data.augment.model_dump(),
                   "max_words": data.max_words, "seed": seed if data.deterministic else None},
        batch_size=16,
        batch_format="numpy",
        num_cpus=MAP_CPUS,
    )
