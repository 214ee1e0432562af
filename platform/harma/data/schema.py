"""The record contract of prepared datasets, in one place.

Parquet shards hold one row per image:

    image       binary        encoded image bytes as stored at the source (PNG, JPEG, TIFF ...)
    image_key   string        the image's path relative to the source image folder
    image_id    int64         the annotation file's image id (unique per image within a dataset)
    captions    list<string>  every caption of the image, raw (cleaned at tokenisation)
    split       string        train / val / test / ...
    label       string|null   scene label where the annotations have one

Training rows (one per caption) carry `pixels` (float32 3xHxW), `tokens` (int64 context) and
`image_id`.
"""

import pyarrow as pa

PARQUET_SCHEMA = pa.schema([
    pa.field("image", pa.binary(), nullable=False),
    pa.field("image_key", pa.string(), nullable=False),
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("captions", pa.list_(pa.string()), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=True),
])
