"""The training stream's tasks without Ray: how an epoch is cut into tasks, what one task reads and
how it hands its rows on (harma.data.datasets: plan_units, read_unit, stream_units, image_chunks)."""

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from harma.data.datasets import (
    MAX_PARTS_PER_SHARD,
    image_chunks,
    plan_units,
    read_unit,
    stream_units,
    visit_parts,
)
from harma.data.schema import PARQUET_SCHEMA


@pytest.fixture()
def shard(tmp_path) -> str:
    """A prepared shard of 40 images (ids 100..139, bytes = the id), one caption each."""
    ids = list(range(100, 140))
    table = pa.Table.from_pydict({
        "image": [str(i).encode() for i in ids], "image_key": [f"{i}.png" for i in ids], "image_id": ids,
        "captions": [[f"caption {i}"] for i in ids], "split": ["train"] * 40, "label": [None] * 40,
    }, schema=PARQUET_SCHEMA)
    path = tmp_path / "part-00000.parquet"
    pq.write_table(table, path)
    return str(path)


def test_plan_splits_shards_only_when_they_are_fewer_than_the_cluster_keeps_busy():
    # 2 shards, 4 CPUs: 2 tasks per CPU wanted -> 4 parts per shard
    units = plan_units(["a", "b"], 4)
    assert [(u["path"], u["part"], u["parts"]) for u in units] == \
        [("a", 0, 4), ("a", 1, 4), ("a", 2, 4), ("a", 3, 4), ("b", 0, 4), ("b", 1, 4), ("b", 2, 4), ("b", 3, 4)]
    assert {(u["visit"], u["visits"]) for u in units} == {(0, 1)}
    # enough shards: each read once, whole
    assert plan_units([f"s{i}" for i in range(20)], 4) == [
        {"path": f"s{i}", "part": 0, "parts": 1, "visit": 0, "visits": 1} for i in range(20)]
    # 3 shards, 4 CPUs: ceil(8 / 3) = 3 parts
    assert {u["parts"] for u in plan_units(["a", "b", "c"], 4)} == {3}
    # one shard on a large cluster: the extra whole-shard reads are bounded
    assert len(plan_units(["a"], 256)) == MAX_PARTS_PER_SHARD
    assert plan_units(["a"], 0) == [{"path": "a", "part": 0, "parts": 1, "visit": 0, "visits": 1}]


def test_visits_are_tasks_of_their_own_and_count_towards_keeping_the_cluster_busy():
    # 2 shards, 4 CPUs, 5 visits: 10 tasks already >= 8 wanted, so no shard is cut
    units = plan_units(["a", "b"], 4, visits=5)
    assert [(u["path"], u["part"], u["visit"]) for u in units] == [("a", 0, v) for v in range(5)] + \
        [("b", 0, v) for v in range(5)]
    assert {u["visits"] for u in units} == {5}
    # 1 shard, 8 CPUs, 2 visits: ceil(16 / 2) = 8 parts, each visited twice
    assert len(plan_units(["a"], 8, visits=2)) == 16


def test_visited_shards_are_cut_so_a_task_emits_an_eighth_of_the_shuffle_buffer_at_most():
    # 40-image shards against a 64-pair buffer: 8 pairs a task -> 5 parts; 512 against 2,048: 2
    assert visit_parts(40, 64) == 5 and visit_parts(512, 2048) == 2 and visit_parts(100, 2048) == 1
    assert visit_parts(0, 64) == 1 and visit_parts(41, 64) == 6
    # min_parts wins over a busy cluster's plan, and the whole-shard reads stay bounded
    units = plan_units(["a", "b"], 1, visits=5, min_parts=5)
    assert len(units) == 50 and {u["parts"] for u in units} == {5}
    assert sorted({(u["part"], u["visit"]) for u in units if u["path"] == "a"}) == \
        [(p, v) for p in range(5) for v in range(5)]
    assert {u["parts"] for u in plan_units(["a"], 1, visits=5, min_parts=50)} == {MAX_PARTS_PER_SHARD}


def test_the_parts_of_a_shard_cover_every_image_once_each_a_contiguous_range(shard):
    fs = pafs.LocalFileSystem()
    parts = [read_unit(shard, part, 3, fs).column("image_id").to_pylist() for part in range(3)]
    assert [sorted(p) for p in parts] == [list(range(100, 113)), list(range(113, 126)), list(range(126, 140))]
    whole = read_unit(shard, 0, 1, fs)
    assert sorted(whole.column("image_id").to_pylist()) == list(range(100, 140))
    assert whole.column("image_id").to_pylist() != list(range(100, 140))  # shuffled; odds 1/40!
    assert all(img == str(i).encode() for i, img in zip(whole.column("image_id").to_pylist(),
                                                        whole.column("image").to_pylist(), strict=True))
    seeded = read_unit(shard, 1, 3, fs, seed=7).column("image_id").to_pylist()
    assert read_unit(shard, 1, 3, fs, seed=7).column("image_id").to_pylist() == seeded


def test_a_task_hands_on_its_rows_every_chunk_of_images(shard):
    seen = []

    def transform(batch, tag):
        seen.append(sorted(batch))
        return {"image_id": batch["image_id"], "caption": np.array([c[0] for c in batch["captions"]]),
                "tag": np.full(len(batch["image_id"]), tag)}

    units = {"path": np.array([shard, shard]), "part": np.array([0, 1]), "parts": np.array([2, 2]),
             "visit": np.array([0, 0]), "visits": np.array([1, 1])}
    outputs = list(stream_units(units, pafs.LocalFileSystem(), image_chunks,
                                {"transform": transform, "transform_kwargs": {"tag": 5}, "images_per_chunk": 8}))
    # 20 images per part: chunks of 8, 8, 4, for each of the two units
    assert [len(o["image_id"]) for o in outputs] == [8, 8, 4, 8, 8, 4]
    ids = np.concatenate([o["image_id"] for o in outputs]).tolist()
    assert sorted(ids) == list(range(100, 140))
    assert all(o["caption"].tolist() == [f"caption {i}" for i in o["image_id"]] for o in outputs)
    assert all((o["tag"] == 5).all() for o in outputs)
    assert seen[0] == ["captions", "image", "image_id", "image_key"]  # the stream's columns only


def test_a_unit_that_is_one_of_several_visits_gets_its_visit(shard):
    got = []

    def unit_fn(rows, rng, **kwargs):
        got.append(kwargs)
        yield {"n": np.array([rows.num_rows])}

    units = {"path": np.array([shard] * 3), "part": np.array([0] * 3), "parts": np.array([1] * 3),
             "visit": np.array([0, 1, 2]), "visits": np.array([3] * 3)}
    outputs = list(stream_units(units, pafs.LocalFileSystem(), unit_fn, {"k": 1}))
    assert got == [{"k": 1, "visit": v, "visits": 3} for v in range(3)]
    assert [int(o["n"][0]) for o in outputs] == [40, 40, 40]  # each visit reads the whole part
