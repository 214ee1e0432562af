"""Convert a dataset in the RSITMD/RSICD layout into sharded Parquet in object storage.

    harma data prepare --source data/synth --out s3://bucket/datasets/synth [--splits train val test]
                       [--annotations DIR] [--images DIR] [--shard-images 512]

Input: annotation JSON files (`<annotations>/<split>.json`, default `<source>/annotations`) and an
image folder (`<images>`, default `<source>/images`) holding the paths the annotations name; local
or s3://. Output, per split: `<out>/<split>/part-00000.parquet`, ... with one row per image (see
`harma.data.schema`), plus `<out>/prepare_report.json`.

Memory stays bounded whatever the dataset size: images are read one at a time and written out
every `shard_images` images. Every image is decoded once as a check; missing or undecodable
images are listed in the report (and skipped), never silently dropped.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from harma import storage
from harma.data.annotations import read_annotations
from harma.data.schema import PARQUET_SCHEMA

log = logging.getLogger(__name__)


@dataclass
class SplitReport:
    images: int = 0
    captions: int = 0
    shards: int = 0
    bytes: int = 0
    missing: list[str] = field(default_factory=list)
    undecodable: list[str] = field(default_factory=list)


def _check_image(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as img:
        img.verify()
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # verify() misses truncated pixel data


def write_shard(rows: dict[str, list], uri: str) -> int:
    table = pa.Table.from_pydict(rows, schema=PARQUET_SCHEMA)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue().to_pybytes()
    storage.write_bytes(uri, data)
    return len(data)


def _empty_rows() -> dict[str, list]:
    return {name: [] for name in PARQUET_SCHEMA.names}


def prepare_split(
    split: str,
    annotations_uri: str,
    images_root: str,
    out: str,
    shard_images: int = 512,
    progress: Callable[[str], None] | None = None,
) -> SplitReport:
    """Write one split's shards; returns what was written and what was unusable."""
    entries = read_annotations(annotations_uri)
    report = SplitReport()
    rows = _empty_rows()
    t0 = time.perf_counter()
    for n, entry in enumerate(entries, 1):
        key = storage.join(images_root, entry.image)
        try:
            data = storage.read_bytes(key)
        except storage.StorageError:
            report.missing.append(entry.image)
            continue
        try:
            _check_image(data)
        except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
            report.undecodable.append(f"{entry.image}: {type(err).__name__}: {str(err)[:100]}")
            continue
        rows["image"].append(data)
        rows["image_key"].append(entry.image)
        rows["image_id"].append(entry.image_id)
        rows["captions"].append(list(entry.captions))
        rows["split"].append(split)
        rows["label"].append(entry.label_name)
        report.images += 1
        report.captions += len(entry.captions)
        if len(rows["image"]) >= shard_images:
            report.bytes += write_shard(rows, storage.join(out, split, f"part-{report.shards:05d}.parquet"))
            report.shards += 1
            rows = _empty_rows()
        if progress and n % 500 == 0:
            rate = n / (time.perf_counter() - t0)
            progress(f"{split}: {n}/{len(entries)} images checked ({rate:.0f}/s)")
    if rows["image"]:
        report.bytes += write_shard(rows, storage.join(out, split, f"part-{report.shards:05d}.parquet"))
        report.shards += 1
    return report


def prepare_dataset(
    source: str | None,
    out: str,
    splits: list[str],
    annotations: str | None = None,
    images: str | None = None,
    shard_images: int = 512,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Convert every split; writes and returns the report (`<out>/prepare_report.json`)."""
    if shard_images < 1:
        raise ValueError(f"shard_images must be at least 1, got {shard_images}")
    annotations = annotations or (source and storage.join(source, "annotations"))
    images = images or (source and storage.join(source, "images"))
    if not annotations or not images:
        raise ValueError("give --source, or both --annotations and --images")
    result: dict = {"out": out, "annotations": annotations, "images": images, "splits": {}}
    for split in splits:
        report = prepare_split(split, storage.join(annotations, f"{split}.json"), images, out,
                               shard_images, progress)
        result["splits"][split] = report.__dict__
        if progress:
            bad = len(report.missing) + len(report.undecodable)
            progress(f"{split}: {report.images} images, {report.captions} captions in "
                     f"{report.shards} shard(s); {bad} unusable")
    storage.write_bytes(storage.join(out, "prepare_report.json"), json.dumps(result, indent=1).encode())
    return result
