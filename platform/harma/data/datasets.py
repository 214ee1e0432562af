"""Ray Data: stream prepared shards from object storage to Ray Train workers.

    ds = build_train_dataset(cfg.data, arch_name, image_size, seed)
    TorchTrainer(..., datasets={"train": ds})   # workers: ray.train.get_dataset_shard("train")

Reading, decoding, augmentation and tokenisation all run in Ray Data tasks with fractional CPU
requests (so they never starve next to the Train workers on a small machine); nothing is copied
to local disk. Each image row becomes one row per caption, each with its own augmentation draw.
Every pass (every epoch re-executes the pipeline) reshuffles twice without an all-to-all step:
the order of the shards, and the order of the images inside each shard as it is read
(`shuffle_rows`); the workers add a local shuffle buffer. Without the second, an image met the
same few dozen neighbours, hence the same in-batch negatives, in every epoch. An undecodable
image becomes one row with `image_id == -1` and its key in `bad_key`, which the worker counts,
names in the run report and drops.
"""

from __future__ import annotations

import io
import random
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import RandomSeedConfig

import ray
from harma import storage
from harma.config import AugmentConfig, DataConfig
from harma.data.prepared import split_files
from harma.data.transforms import augment_image, decode_image, to_uint8, tokenize

READ_CPUS = 0.25
MAP_CPUS = 0.5
IMAGES_PER_TASK = 32  # images per decode task: small enough to spread an epoch over every core
STREAM_COLUMNS = ["image", "image_key", "image_id", "captions"]
# Ray Data's Parquet reader (2.60) lists files through 32 footer-reading actors, new processes,
# started again at every execution (it made each training epoch's first batch wait 4-8 s when the
# training stream still used it). One actor reads footers 128 at a time, plenty for thousands of
# shards. Still used by the index build's read_parquet (harma.serve.build); set in the driver and
# forwarded to the workers by harma.train.driver (a value already in the environment is kept).
FOOTER_ACTORS_VAR = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FOOTER_ACTORS = "1"


@lru_cache(maxsize=4)
def _tokenizer(arch: str):
    from harma.model.backbone import build_tokenizer

    return build_tokenizer(arch)


def shuffle_rows(block: pa.Table, seed: int | None = None) -> pa.Table:
    """Map function: a block of image rows (one shard, as read) in a random order.

    Fresh randomness on every call, i.e. every epoch, unless seeded; a seeded order depends only
    on the seed and the block's first image id (the same in every epoch, like the rest of a
    deterministic run's draws).
    """
    if block.num_rows < 2:
        return block
    rng = np.random.default_rng(None if seed is None else [seed, int(block.column("image_id")[0].as_py())])
    return block.take(pa.array(rng.permutation(block.num_rows)))


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


def read_shards(batch: dict[str, np.ndarray], filesystem: pafs.FileSystem, seed: int | None = None) -> pa.Table:
    """Map function: prepared shards (paths on `filesystem`) -> their image rows, in a random order.

    Each shard is fetched whole (one GET on S3) and parsed in memory; a shard is bounded by
    `harma data prepare --shard-images`.
    """
    tables = []
    for path in batch["path"]:
        with filesystem.open_input_stream(str(path)) as stream:
            tables.append(pq.read_table(io.BytesIO(stream.read()), columns=STREAM_COLUMNS))
    return shuffle_rows(pa.concat_tables(tables), seed)


def image_rows(files: list[str], seed: int | None = None) -> ray.data.Dataset:
    """Image rows of prepared shards `files` (URIs): shards in a new order every execution, one read
    task per shard (rows shuffled), blocks of `IMAGES_PER_TASK` images for the tasks after it."""
    # The driver's filesystem (endpoint and credentials) goes to the read tasks with them.
    fs, _ = storage.resolve(files[0])
    # The shard list is listed once, here: no listing task or Parquet footer-reading actor (a new
    # process) at the start of every epoch, as ray.data.read_parquet has.
    ds = ray.data.from_items([{"path": storage.resolve(f)[1]} for f in files], override_num_blocks=len(files))
    ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    ds = ds.map_batches(read_shards, fn_kwargs={"filesystem": fs, "seed": seed}, batch_size=1,
                        batch_format="numpy", num_cpus=READ_CPUS)
    # read_parquet and map tasks emit blocks of up to 128 MiB: a small dataset was one block, so
    # one task decoded the whole epoch on one core and the first batch waited for all of it.
    return ds.repartition(target_num_rows_per_block=IMAGES_PER_TASK)


def build_train_dataset(data: DataConfig, arch: str, image_size: int, seed: int = 0) -> ray.data.Dataset:
    """The training stream of `data.prepared_uri`'s train split (seeded if `data.deterministic`):
    `image_rows`, then decode, augment and tokenise on every core."""
    fixed = seed if data.deterministic else None
    ds = image_rows(split_files(data.prepared_uri, data.train_split), fixed)
    return ds.map_batches(
        pairs_from_images,
        fn_kwargs={"arch": arch, "size": image_size, "augment": data.augment.model_dump(),
                   "max_words": data.max_words, "seed": fixed},
        batch_size=16,
        batch_format="numpy",
        num_cpus=MAP_CPUS,
    )
