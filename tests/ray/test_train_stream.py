"""The training stream (harma.data.datasets.build_train_dataset) read as Ray Train's workers read it."""

from __future__ import annotations

import io
from collections import Counter

import pyarrow.parquet as pq
import pytest

from harma import storage
from harma.config import DataConfig
from harma.data.datasets import build_train_dataset
from harma.data.prepare import prepare_dataset
from harma.data.prepared import split_files


@pytest.fixture(scope="module")
def small_shards(synth_root, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shards")
    prepare_dataset(synth_root, str(out), ["train"], shard_images=14)  # 28 train images: 2 shards
    return str(out)


def _shards(prepared: str) -> list[list[int]]:
    """Each shard's image ids in the order prepare wrote them."""
    return [pq.read_table(io.BytesIO(storage.read_bytes(f)), columns=["image_id"]).column("image_id").to_pylist()
            for f in split_files(prepared, "train")]


def _epoch(ds) -> list[int]:
    """One pass (epoch) over the stream: the image id of every pair, in stream order."""
    return [int(i) for batch in ds.iter_batches(batch_size=64, batch_format="numpy") for i in batch["image_id"]]


def _order_within(ids: list[int], shard: list[int]) -> list[int]:
    members, seen, order = set(shard), set(), []
    for i in ids:
        if i in members and i not in seen:
            seen.add(i)
            order.append(i)
    return order


def test_every_epoch_reorders_the_images_inside_each_shard(ray_cluster, small_shards):
    shards = _shards(small_shards)
    assert len(shards) == 2 and all(len(s) == 14 for s in shards)
    ds = build_train_dataset(DataConfig(prepared_uri=small_shards), "harma-tiny", 48)
    epochs = [_epoch(ds) for _ in range(3)]
    captions = Counter(epochs[0])
    assert set(captions) == {i for s in shards for i in s}  # every image, every caption, each epoch
    assert all(Counter(e) == captions for e in epochs[1:])
    for shard in shards:
        orders = [_order_within(e, shard) for e in epochs]
        # Reading shards in a new order alone kept each shard's own order (the prepared one) in
        # every epoch; 14 images in the same order twice by chance: odds 1/14!.
        assert orders[0] != orders[1] != orders[2] and shard not in orders


def test_a_deterministic_stream_repeats_across_builds(ray_cluster, small_shards):
    import ray

    data = DataConfig(prepared_uri=small_shards, deterministic=True)
    options = ray.data.DataContext.get_current().execution_options
    kept, options.preserve_order = options.preserve_order, True  # as harma.train.driver sets it
    try:
        first = [_epoch(build_train_dataset(data, "harma-tiny", 48, seed=5)) for _ in range(2)]
        again = [_epoch(build_train_dataset(data, "harma-tiny", 48, seed=5)) for _ in range(2)]
    finally:
        options.preserve_order = kept
    assert first == again
    assert all(_order_within(first[0], s) != s for s in _shards(small_shards))

