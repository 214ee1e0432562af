"""Read prepared Parquet shards without Ray: small eval splits into memory, counts, the report."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from harma import storage
from harma.data.transforms import decode_image

if TYPE_CHECKING:
    from harma.data.local import Split


def split_files(prepared_uri: str, split: str) -> list[str]:
    files = storage.list_files(storage.join(prepared_uri, split), ".parquet")
    if not files:
        raise storage.StorageError(
            f"{storage.join(prepared_uri, split)}: no Parquet shards (run `harma data prepare`)")
    return files


def read_report(prepared_uri: str) -> dict:
    uri = storage.join(prepared_uri, "prepare_report.json")
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else {}


def captions_per_image(prepared_uri: str, split: str) -> list[int]:
    """Each image's caption count, from the shards' captions column alone: the file is read by
    range (its footer and that column chunk), not fetched whole as `storage.read_table` does, so
    the driver does not download a split's images to count its captions."""
    import pyarrow.parquet as pq

    counts: list[int] = []
    for uri in split_files(prepared_uri, split):
        fs, path = storage.resolve(uri)
        try:
            table = pq.read_table(path, filesystem=fs, columns=["captions"])
        except OSError as err:
            raise storage.StorageError(f"{uri}: cannot read ({str(err).splitlines()[0][:200]})") from None
        counts.extend(len(c) for c in table.column("captions").to_pylist())
    return counts


def count_captions(prepared_uri: str, split: str) -> int:
    """Training pairs of a split (one per caption)."""
    return sum(captions_per_image(prepared_uri, split))


def load_prepared_split(prepared_uri: str, split: str) -> Split:
    """A whole (small) split in memory, decoded, in shard order: for validation and test."""
    # Imported here: harma.data.local imports torch, which the stream tasks that import this module
    # never need (harma.data.tokenizer).
    from harma.data.local import Split

    images, captions, caption_image, ids, bad = [], [], [], [], []
    labels, keys = [], []  # shards written before the label column existed read as unlabelled
    for uri in split_files(prepared_uri, split):
        table = storage.read_table(uri)
        for row in table.to_pylist():
            try:
                images.append(decode_image(row["image"]))
            except (OSError, ValueError):
                bad.append(row["image_key"])
                continue
            ids.append(row["image_id"])
            labels.append(row.get("label"))
            keys.append(row["image_key"])
            captions.extend(row["captions"])
            caption_image.extend([len(images) - 1] * len(row["captions"]))
    if bad:
        raise ValueError(f"{len(bad)} undecodable image(s) in {split}: {', '.join(bad[:10])}")
    return Split(split, images, captions, np.array(caption_image, dtype=np.int64),
                 np.array(ids, dtype=np.int64), labels, keys)
