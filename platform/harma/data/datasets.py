"""Ray Data: stream prepared shards from object storage to Ray Train workers.

    ds = build_train_dataset(cfg.data, arch_name, image_size, seed)
    TorchTrainer(..., datasets={"train": ds})   # workers: ray.train.get_dataset_shard("train")

Reading, decoding, augmentation and tokenisation run together in one Ray Data task per shard (or
per part of a shard when a small dataset has fewer shards than the cluster has CPUs to keep busy),
with a fractional CPU request (so they never starve next to the Train workers on a small machine);
a task hands its output on every `PAIRS_PER_CHUNK` pairs, and nothing is copied to local disk.

Batches as the paper code makes them: it samples (image, caption) pairs uniformly, so the captions
of one image rarely meet in a batch (RSITMD, batch 428: 9.6 % of samples; see
`harma.data.composition`). A task therefore emits its images' (image, caption) pairs in a uniformly
random order over its whole part (`pair_order`), each pair with its own augmentation draw, decoding
each image once when its first pair comes and dropping it after its last; the tasks of an epoch run
side by side, so a batch mixes pairs from all of them. Emitting an image's captions one after the
other (the former stream, `data.batch_composition: image_grouped`) put ~40 % of samples in a batch
with a sibling. The share every epoch's batches had is in the run's history. How near uniform the
stream comes depends on how much of the split is in flight at once: when the split has more parts
than the cluster runs tasks at a time, an epoch runs in waves and siblings meet more often than
uniform sampling would have them (by about parts / concurrent tasks; the history shows it).

Every pass (every epoch re-executes the pipeline) reshuffles without an all-to-all step: the order
of the tasks, and the order of the images and pairs inside each task (`shuffle_rows`,
`pair_order`); the workers add a local shuffle buffer. An undecodable image becomes one row with
`image_id == -1` and its key in `bad_key`, which the worker counts, names in the run report and
drops.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from functools import lru_cache, partial

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image
from ray.data import RandomSeedConfig

import ray
from harma import storage
from harma.config import AugmentConfig, DataConfig
from harma.data.composition import pair_order
from harma.data.prepared import captions_per_image, split_files
from harma.data.tokenizer import ClipTokenizer
from harma.data.transforms import augment_image, decode_image, to_uint8, tokenize

STREAM_CPUS = 0.5  # CPU request of a stream task (read, decode, augment, tokenise)
IMAGES_PER_CHUNK = 16  # images decoded between two outputs of a stream task (image streams)
PAIRS_PER_CHUNK = 80  # (image, caption) pairs between two outputs of a training stream task
# A task keeps an image decoded from its first pair to its last; past this many bytes of decoded
# images it forgets the oldest and decodes them again when their next pair comes.
DECODED_BYTES = 256 << 20
# A task's outputs are cut into blocks of about this size as it goes, so the first batch waits for
# one chunk, not a whole shard (Ray Data's default, 128 MiB, made a shard of a small dataset one
# block: ~2 s of decoding on one core before anything moved).
BLOCK_BYTES = 8 << 20
UNITS_PER_CPU = 2  # stream tasks per logical CPU of the cluster an epoch is planned for, at least
MAX_PARTS_PER_SHARD = 8  # a part reads its whole shard: bound the extra reads of a small dataset
# With several visits, a task emits at most 1/8 of a worker's shuffle buffer: a task's own pairs are
# never two captions of one image, so a task that fills much of what Ray's batcher shuffles at once
# (0.5-1.5 x the buffer) keeps siblings apart (batches fall short of uniform by about its share).
TASKS_PER_SHUFFLE_BUFFER = 8
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


def augmented_pixels(img: Image.Image, rng: random.Random, size: int, augment: AugmentConfig) -> np.ndarray:
    """A training pair's pixels: its own augmentation draw, uint8 (3, size, size).

    uint8 is 4x smaller than float32 between processes; the worker normalises on its device
    (`transforms.normalize_pixels`).
    """
    return to_uint8(augment_image(img, size, augment, rng))


class _DecodedImages:
    """A task's decoded images, each kept from its first pair to its last, at most `limit` bytes
    (past it the oldest is forgotten and decoded again at its next pair)."""

    def __init__(self, images: pa.ChunkedArray, limit: int):
        self.images, self.limit, self.held = images, limit, 0
        self.kept: dict[int, Image.Image] = {}

    def get(self, row: int) -> Image.Image:  # raises OSError / ValueError if it does not decode
        if row not in self.kept:
            img = decode_image(self.images[row].as_py())
            self.kept[row] = img
            self.held += _nbytes(img)
            while self.held > self.limit and len(self.kept) > 1:
                self.forget(next(iter(self.kept)))
        return self.kept[row]

    def forget(self, row: int) -> None:
        img = self.kept.pop(row, None)
        self.held -= _nbytes(img) if img is not None else 0


def _nbytes(img: Image.Image) -> int:
    return img.width * img.height * len(img.getbands())


def emit_pairs(
    rows: pa.Table, rng: random.Random, pixels: Callable[[Image.Image, random.Random], np.ndarray],
    context_length: int, max_words: int, grouped: bool = False, pairs_per_chunk: int = PAIRS_PER_CHUNK,
    decoded_bytes: int = DECODED_BYTES, visit: int = 0, visits: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Unit function of the training stream: a task's image rows -> (pixels, tokens, image_id,
    bad_key) of their (image, caption) pairs of visit `visit` of `visits` (`caption_visit`), in
    `pair_order` (uniformly random unless `grouped`), `pairs_per_chunk` at a time.

    `pixels(img, rng)` makes one pair's uint8 (3, size, size) pixels. An undecodable image gives one
    row with image_id -1, zero pixels and its key in bad_key, once per epoch: in the visit of its
    first caption, at its first pair there (its other pairs are skipped).
    """
    captions = rows.column("captions").to_pylist()
    keys, ids = rows.column("image_key").to_pylist(), rows.column("image_id").to_pylist()
    mine = [[c for c in range(len(caps)) if caption_visit(int(i), c, visits) == visit]
            for caps, i in zip(captions, ids, strict=True)]
    left = [len(m) for m in mine]
    decoded, bad = _DecodedImages(rows.column("image"), decoded_bytes), set()
    chunk: list[tuple[np.ndarray | None, str, int, str]] = []
    for row, j in pair_order(left.copy(), rng, grouped):
        c = mine[row][j]
        left[row] -= 1
        if row in bad:
            continue
        try:
            chunk.append((pixels(decoded.get(row), rng), str(captions[row][c]), int(ids[row]), ""))
        except (OSError, ValueError):
            bad.add(row)
            if 0 in mine[row]:
                chunk.append((None, "", -1, str(keys[row])))
        if left[row] == 0:
            decoded.forget(row)
        if len(chunk) == pairs_per_chunk:
            yield _pair_columns(chunk, context_length, max_words)
            chunk = []
    if chunk:
        yield _pair_columns(chunk, context_length, max_words)


def _pair_columns(chunk: list[tuple[np.ndarray | None, str, int, str]], context_length: int,
                  max_words: int) -> dict[str, np.ndarray]:
    shape = next((p.shape for p, *_ in chunk if p is not None), (3, 1, 1))  # bad rows are dropped
    pixels = np.stack([p if p is not None else np.zeros(shape, np.uint8) for p, *_ in chunk])
    return {"pixels": pixels, "tokens": tokenize([c for _, c, _, _ in chunk], _tokenizer(context_length), max_words),
            "image_id": np.array([i for *_, i, _ in chunk], np.int64),
            "bad_key": np.array([b for *_, b in chunk], dtype=object)}


def plan_units(paths: list[str], cpus: float, visits: int = 1, min_parts: int = 1) -> list[dict]:
    """Stream tasks of one epoch: each shard whole, or in `parts` row ranges when the shards are
    fewer than `UNITS_PER_CPU` x `cpus` (a small dataset still keeps every core busy) or when
    `min_parts` asks for them (`visit_parts`), at most `MAX_PARTS_PER_SHARD`; each of those
    `visits` times, a task per visit (`caption_visit`: the pairs it emits)."""
    busy = math.ceil(UNITS_PER_CPU * cpus / max(1, len(paths) * visits))
    parts = max(1, min(MAX_PARTS_PER_SHARD, max(busy, min_parts)))
    return [{"path": p, "part": i, "parts": parts, "visit": v, "visits": visits}
            for p in paths for i in range(parts) for v in range(visits)]


def caption_visit(image_id: int, caption: int, visits: int) -> int:
    """The visit (of `visits`) whose task emits caption `caption` of image `image_id`: captions
    dealt round the visits from a place set by the image id, so an image with c captions has
    ceil(c / visits) or floor(c / visits) of them in each visit, and every visit has a share of
    the images' first captions."""
    return (image_id + caption) % visits


def visit_parts(images_per_shard: float, shuffle_buffer_pairs: int) -> int:
    """Parts a shard is cut into when its images are visited several times: enough that a visit's
    task (one pair per image of its part) emits at most 1/`TASKS_PER_SHUFFLE_BUFFER` of the buffer."""
    return max(1, math.ceil(images_per_shard * TASKS_PER_SHUFFLE_BUFFER / max(1, shuffle_buffer_pairs)))


def image_visits(captions_per_image: list[int], shuffle_buffer_pairs: int) -> int:
    """`data.image_visits: auto`: 1 when a worker's shuffle buffer holds the whole split's pairs
    (its draws are then a uniform shuffle of the epoch), else the most captions an image has (one
    caption of an image per task: its captions reach the workers at independent times)."""
    if sum(captions_per_image) <= shuffle_buffer_pairs:
        return 1
    return max(1, max(captions_per_image, default=1))


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


def image_chunks(
    rows: pa.Table, rng: random.Random, transform: Callable[..., dict], transform_kwargs: dict | None = None,
    images_per_chunk: int = IMAGES_PER_CHUNK,
) -> Iterator[dict[str, np.ndarray]]:
    """Unit function for per-image work: `transform` (image rows as numpy columns -> output
    columns) of every `images_per_chunk` rows of a task, so they leave it while it works on the rest."""
    for start in range(0, rows.num_rows, images_per_chunk):
        chunk = rows.slice(start, images_per_chunk)
        yield transform({c: chunk.column(c).to_numpy(zero_copy_only=False) for c in STREAM_COLUMNS},
                        **(transform_kwargs or {}))


def stream_units(
    batch: dict[str, np.ndarray], filesystem: pafs.FileSystem, unit_fn: Callable[..., Iterator[dict]],
    unit_kwargs: dict, seed: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Map function: planned units (`plan_units`) -> `unit_fn(rows, rng, **unit_kwargs)` of each
    unit's image rows (`read_unit`), whose outputs leave the task one by one; a unit that is one
    of several visits of its rows also passes `visit=` and `visits=`.

    `rng` is fresh every call unless seeded; a seeded one depends on the seed, the unit's part
    (and visit) and its first image id only.
    """
    for path, part, parts, visit, visits in zip(batch["path"], batch["part"], batch["parts"], batch["visit"],
                                                batch["visits"], strict=True):
        rows = read_unit(str(path), int(part), int(parts), filesystem, seed)
        first = rows.column("image_id")[0].as_py() if rows.num_rows else -1
        several = int(visits) > 1
        rng = random.Random(None if seed is None else f"{seed}-{int(part)}-{first}" + (f"-{int(visit)}" * several))
        yield from unit_fn(rows, rng, **unit_kwargs, **({"visit": int(visit), "visits": int(visits)} if several else {}))


def image_stream(
    files: list[str], unit_fn: Callable[..., Iterator[dict]], unit_kwargs: dict | None = None,
    seed: int | None = None, cpus: float | None = None, block_bytes: int = BLOCK_BYTES, visits: int = 1,
    min_parts: int = 1,
) -> ray.data.Dataset:
    """`unit_fn` (`emit_pairs`, `image_chunks`: a task's image rows -> its outputs) over the prepared
    shards `files` (URIs), in one stream task per planned unit (`plan_units`, for `cpus` logical
    CPUs: the cluster's by default, `visits` visits of every row: `emit_pairs` only, and shards cut
    into at least `min_parts` parts) with `STREAM_CPUS` each; units in a new order every execution."""
    # The driver's filesystem (endpoint and credentials) goes to the tasks with them.
    fs, _ = storage.resolve(files[0])
    cpus = cpus if cpus is not None else ray.cluster_resources().get("CPU", 1)
    units = plan_units([storage.resolve(f)[1] for f in files], cpus, visits, min_parts)
    # The shard list is listed once, here: no listing task or Parquet footer-reading actor (a new
    # process) at the start of every epoch, as ray.data.read_parquet has. Read, decode and the rest
    # share one task: separate read, repartition and 32-image decode tasks cost more in Ray per image
    # than they spread (benchmarks/ingest.py, 2 cores: 0.41 of bare decode per core, 0.72 fused).
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds.context.target_max_block_size = block_bytes  # this dataset's own copy of the context
    ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return ds.map_batches(
        stream_units,
        fn_kwargs={"filesystem": fs, "unit_fn": unit_fn, "unit_kwargs": unit_kwargs or {}, "seed": seed},
        batch_size=1, batch_format="numpy", num_cpus=STREAM_CPUS,
    )


def train_pair_options(data: DataConfig, image_size: int, context_length: int,
                       pairs_per_chunk: int = PAIRS_PER_CHUNK) -> dict:
    """`emit_pairs`'s keyword arguments for a training stream of `data`."""
    return {"pixels": partial(augmented_pixels, size=image_size, augment=data.augment),
            "context_length": context_length, "max_words": data.max_words,
            "grouped": data.batch_composition == "image_grouped", "pairs_per_chunk": pairs_per_chunk}


def resolve_image_visits(data: DataConfig, captions: list[int]) -> int:
    """`data.image_visits` as a number for a train split with these caption counts (`image_visits`
    when 'auto'; always 1 for `image_grouped`, whose point is an image's captions together)."""
    if data.batch_composition == "image_grouped":
        return 1
    return image_visits(captions, data.shuffle_buffer_pairs) if data.image_visits == "auto" else data.image_visits


def build_train_dataset(
    data: DataConfig, image_size: int, context_length: int, seed: int = 0, captions: list[int] | None = None,
    **stream_options,
) -> ray.data.Dataset:
    """The training stream of `data.prepared_uri`'s train split (seeded if `data.deterministic`):
    `image_stream` of `emit_pairs` on every core, each image visited `resolve_image_visits` times
    an epoch, its shards cut into `visit_parts` when visited more than once. `captions`: the
    split's caption counts when the caller has them (else read). `stream_options`:
    `image_stream`'s keyword arguments and `pairs_per_chunk`."""
    fixed = seed if data.deterministic else None
    chunk = stream_options.pop("pairs_per_chunk", PAIRS_PER_CHUNK)
    files = split_files(data.prepared_uri, data.train_split)
    if captions is None and data.image_visits != 1 and data.batch_composition != "image_grouped":
        captions = captions_per_image(data.prepared_uri, data.train_split)
    visits = resolve_image_visits(data, captions or [])
    parts = visit_parts(len(captions or []) / max(1, len(files)), data.shuffle_buffer_pairs) if visits > 1 else 1
    return image_stream(files, emit_pairs, train_pair_options(data, image_size, context_length, chunk), fixed,
                        visits=visits, min_parts=parts, **stream_options)
