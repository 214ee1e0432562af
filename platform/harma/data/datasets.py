"""Ray Data: stream prepared shards from object storage to Ray Train workers.

    ds = build_train_dataset(cfg.data, arch_name, image_size, seed)
    TorchTrainer(..., datasets={"train": ds})   # workers: ray.train.get_dataset_shard("train")

Reading, decoding, augmentation and tokenisation run together in one Ray Data task per shard (or
per part of a shard when a small dataset has fewer shards than the cluster has CPUs to keep busy),
with a fractional CPU request (so they never starve next to the Train workers on a small machine);
a task hands its output on every `IMAGES_PER_CHUNK` images, and nothing is copied to local disk.
Each image row becomes one row per caption, each with its own augmentation draw. Every pass (every
epoch re-executes the pipeline) reshuffles twice without an all-to-all step: the order of the
tasks, and the order of the images inside each task's rows (`shuffle_rows`); the workers add a
local shuffle buffer. Without the second, an image met the same few dozen neighbours, hence the
same in-batch negatives, in every epoch. An undecodable image becomes one row with
`image_id == -1` and its key in `bad_key`, which the worker counts, names in the run report and
drops.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
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
from harma.data.tokenizer import ClipTokenizer
from harma.data.transforms import augment_image, decode_image, to_uint8, tokenize

STREAM_CPUS = 0.5  # CPU request of a stream task (read, decode, augment, tokenise)
IMAGES_PER_CHUNK = 16  # images decoded between two outputs of a stream task
# A task's outputs are cut into blocks of about this size as it goes, so the first batch waits for
# one chunk, not a whole shard (Ray Data's default, 128 MiB, made a shard of a small dataset one
# block: ~2 s of decoding on one core before anything moved).
BLOCK_BYTES = 8 << 20
UNITS_PER_CPU = 2  # stream tasks per logical CPU of the cluster an epoch is planned for, at least
MAX_PARTS_PER_SHARD = 8  # a part reads its whole shard: bound the extra reads of a small dataset
STREAM_COLUMNS = ["image", "image_key", "image_id", "captions"]
# Ray Data's Parquet reader (2.60) lists files through 32 footer-reading actors, new processes,
# started again at every execution (it made each training epoch's first batch wait 4-8 s when the
# training stream still used it). One actor reads footers 128 at a time, plenty for thousands of
# shards. Still used by the index build's read_parquet (harma.serve.build); set in the driver and
# forwarded to the workers by harma.train.driver (a value already in the environment is kept).
FOOTER_ACTORS_VAR = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FOOTER_ACTORS = "1"


@lru_cache(maxsize=4)
def _tokenizer(context_length: int) -> ClipTokenizer:
    return ClipTokenizer(context_length)


def shuffle_rows(block: pa.Table, seed: int | None = None) -> pa.Table:
    """Image rows (a stream task's shard or part of one) in a random order.

    Fresh randomness on every call, i.e. every epoch, unless seeded; a seeded order depends only
    on the seed and the block's first image id (the same in every epoch, like the rest of a
    deterministic run's draws).
    """
    if block.num_rows < 2:
        return block
    rng = np.random.default_rng(None if seed is None else [seed, int(block.column("image_id")[0].as_py())])
    return block.take(pa.array(rng.permutation(block.num_rows)))


def pairs_from_images(
    batch: dict[str, np.ndarray], context_length: int, size: int, augment: dict, max_words: int,
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
    tokens = tokenize(captions, _tokenizer(context_length), max_words)
    return {"pixels": np.stack(pixels), "tokens": tokens, "image_id": np.array(ids, np.int64),
            "bad_key": np.array(bad, dtype=object)}


def plan_units(paths: list[str], cpus: float) -> list[dict]:
    """Stream tasks of one epoch: each shard whole, or in `parts` row ranges when the shards are
    fewer than `UNITS_PER_CPU` x `cpus` (a small dataset still keeps every core busy)."""
    parts = max(1, min(MAX_PARTS_PER_SHARD, math.ceil(UNITS_PER_CPU * cpus / max(1, len(paths)))))
    return [{"path": p, "part": i, "parts": parts} for p in paths for i in range(parts)]


def read_unit(path: str, part: int, parts: int, filesystem: pafs.FileSystem, seed: int | None = None) -> pa.Table:
    """Image rows of part `part` of `parts` (contiguous row ranges) of the shard at `path` on
    `filesystem`, in a random order (`shuffle_rows`).

    The shard is fetched whole (one GET on S3) and parsed in memory; a shard is bounded by
    `harma data prepare --shard-images`.
    """
    with filesystem.open_input_stream(path) as stream:
        table = pq.read_table(pa.BufferReader(stream.read_buffer()), columns=STREAM_COLUMNS)
    lo, hi = table.num_rows * part // parts, table.num_rows * (part + 1) // parts
    return shuffle_rows(table.slice(lo, hi - lo), seed)


def stream_units(
    batch: dict[str, np.ndarray], filesystem: pafs.FileSystem, transform: Callable[..., dict],
    transform_kwargs: dict, seed: int | None = None, images_per_chunk: int = IMAGES_PER_CHUNK,
) -> Iterator[dict[str, np.ndarray]]:
    """Map function: planned units (`plan_units`) -> `transform` of their image rows, one output per
    `images_per_chunk` images, so the rows leave the task while it decodes the rest."""
    for path, part, parts in zip(batch["path"], batch["part"], batch["parts"], strict=True):
        rows = read_unit(str(path), int(part), int(parts), filesystem, seed)
        for start in range(0, rows.num_rows, images_per_chunk):
            chunk = rows.slice(start, images_per_chunk)
            yield transform({c: chunk.column(c).to_numpy(zero_copy_only=False) for c in STREAM_COLUMNS},
                            **transform_kwargs)


def image_stream(
    files: list[str], transform: Callable[..., dict], transform_kwargs: dict | None = None,
    seed: int | None = None, cpus: float | None = None, block_bytes: int = BLOCK_BYTES,
    images_per_chunk: int = IMAGES_PER_CHUNK,
) -> ray.data.Dataset:
    """`transform` (image rows as numpy columns -> output columns) over every image of prepared
    shards `files` (URIs), in one stream task per planned unit (`plan_units`, for `cpus` logical
    CPUs: the cluster's by default) with `STREAM_CPUS` each; units in a new order every execution."""
    # The driver's filesystem (endpoint and credentials) goes to the tasks with them.
    fs, _ = storage.resolve(files[0])
    cpus = cpus if cpus is not None else ray.cluster_resources().get("CPU", 1)
    units = plan_units([storage.resolve(f)[1] for f in files], cpus)
    # The shard list is listed once, here: no listing task or Parquet footer-reading actor (a new
    # process) at the start of every epoch, as ray.data.read_parquet has. Read, decode and the rest
    # share one task: separate read, repartition and 32-image decode tasks cost more in Ray per image
    # than they spread (benchmarks/ingest.py, 2 cores: 0.41 of bare decode per core, 0.72 fused).
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds.context.target_max_block_size = block_bytes  # this dataset's own copy of the context
    ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return ds.map_batches(
        stream_units,
        fn_kwargs={"filesystem": fs, "transform": transform, "transform_kwargs": transform_kwargs or {},
                   "seed": seed, "images_per_chunk": images_per_chunk},
        batch_size=1, batch_format="numpy", num_cpus=STREAM_CPUS,
    )


def build_train_dataset(
    data: DataConfig, image_size: int, context_length: int, seed: int = 0, **stream_options,
) -> ray.data.Dataset:
    """The training stream of `data.prepared_uri`'s train split (seeded if `data.deterministic`):
    `image_stream` of `pairs_from_images` on every core (`stream_options`: its keyword arguments)."""
    fixed = seed if data.deterministic else None
    kwargs = {"context_length": context_length, "size": image_size, "augment": data.augment.model_dump(),
              "max_words": data.max_words, "seed": fixed}
    return image_stream(split_files(data.prepared_uri, data.train_split), pairs_from_images, kwargs, fixed,
                        **stream_options)
