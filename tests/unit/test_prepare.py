"""`harma data prepare`: shards, schema, every image checked, unusable ones reported; S3 too."""

import json
import shutil

import pyarrow.parquet as pq
import pytest

from harma.cli import main
from harma.data.datasets import shuffle_rows
from harma.data.prepare import prepare_dataset
from harma.data.prepared import count_captions, load_prepared_split
from harma.data.schema import PARQUET_SCHEMA


@pytest.fixture()
def damaged(tmp_path, synth_root):
    """A copy of the small dataset with one train image missing and one corrupt."""
    root = tmp_path / "damaged"
    shutil.copytree(synth_root, root)
    (root / "images" / "train" / "train_00003.png").unlink()
    (root / "images" / "train" / "train_00005.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def test_prepare_writes_shards_and_reports_unusable_images(tmp_path, damaged):
    out = tmp_path / "prepared"
    report = prepare_dataset(str(damaged), str(out), ["train", "val"], shard_images=10)
    train = report["splits"]["train"]
    assert train["images"] == 26 and train["captions"] == 130
    assert train["missing"] == ["train/train_00003.png"]
    assert len(train["undecodable"]) == 1 and train["undecodable"][0].startswith("train/train_00005.png")
    assert train["shards"] == 3  # 26 images, 10 per shard
    shards = sorted((out / "train").glob("part-*.parquet"))
    assert len(shards) == 3
    table = pq.read_table(shards[0])
    assert table.schema.equals(PARQUET_SCHEMA)
    assert table.num_rows == 10 and table.column("split").to_pylist() == ["train"] * 10
    assert json.loads((out / "prepare_report.json").read_text())["splits"]["val"]["images"] == 6
    assert count_captions(str(out), "train") == 130
    val = load_prepared_split(str(out), "val")
    assert len(val.images) == 6 and len(val.captions) == 30


def test_cli_prepare_lists_unusable_images(tmp_path, damaged, capsys):
    assert main(["data", "prepare", "--source", str(damaged), "--out", str(tmp_path / "p"),
                 "--splits", "train"]) == 0
    out = capsys.readouterr().out
    assert "26 images, 130 captions, 1 shard(s), 2 unusable" in out
    assert "unusable: train/train_00003.png" in out


def test_prepare_to_s3(s3_server, synth_root):
    s3_server.create_bucket("datasets")
    report = prepare_dataset(synth_root, "s3://datasets/synth", ["test"])
    assert report["splits"]["test"]["images"] == 6
    split = load_prepared_split("s3://datasets/synth", "test")
    assert len(split.images) == 6


def test_shuffle_rows_reorders_a_block_keeping_every_row():
    import pyarrow as pa

    block = pa.table({"image_id": list(range(100, 164)), "image": [bytes([i]) for i in range(64)]})
    first, second = shuffle_rows(block), shuffle_rows(block)
    for out in (first, second):
        assert sorted(out.column("image_id").to_pylist()) == list(range(100, 164))
        # rows move whole: each id keeps its own bytes
        assert all(img == bytes([i - 100]) for i, img in zip(out.column("image_id").to_pylist(),
                                                               out.column("image").to_pylist(), strict=True))
    # fresh order on every call (every epoch): two equal orders of 64 rows have odds 1/64!
    assert first.column("image_id").to_pylist() != second.column("image_id").to_pylist()
    assert first.column("image_id").to_pylist() != list(range(100, 164))
    seeded = [shuffle_rows(block, seed=3).column("image_id").to_pylist() for _ in range(2)]
    assert seeded[0] == seeded[1] != list(range(100, 164))
    assert shuffle_rows(block, seed=4).column("image_id").to_pylist() != seeded[0]
    one = block.slice(0, 1)
    assert shuffle_rows(one).equals(one) and shuffle_rows(block.slice(0, 0)).num_rows == 0
