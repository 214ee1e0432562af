"""Training shards from scenes whose tiles carry ground-truth captions (the generated scenes'), so
train -> index -> serve runs on scene data.

    harma data prepare --scenes data/scenes --out store/scenes [--test-scenes 1] [--shard-images 512]

Each drawn cell of a scene (`cells.json`: its pixel window and five captions) becomes one prepared
image: the window read from the COG through the radiometric preset (`harma.geo.reader.read_tile`,
at native resolution), PNG-encoded, keyed `<scene>/<col>_<row>.png`, labelled with the cell's object
kind. The last `test_scenes` scenes (by id) are held out whole as the test split, so place search
can be scored on scenes no training tile came from; the other scenes' cells go to train and val
(about 85 / 15, by a hash of the key). Cells that are mostly nodata are skipped and counted.
Output: the shards and `prepare_report.json` of `harma data prepare`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable

from PIL import Image

from harma import storage
from harma.data.prepare import SplitReport, write_shard
from harma.data.schema import PARQUET_SCHEMA
from harma.geo.corpus import list_scenes
from harma.geo.radiometry import PRESETS

log = logging.getLogger(__name__)

VAL_SHARE = 0.15


def _split_of(key: str, test: bool) -> str:
    if test:
        return "test"
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if bucket < VAL_SHARE else "train"


def prepare_scenes(root: str, out: str, test_scenes: int = 1, shard_images: int = 512, preset: str = "generic",
                   max_nodata_fraction: float = 0.5, progress: Callable[[str], None] = log.info) -> dict:
    """Write train/val/test shards of the scenes' captioned cells under `out`; returns the report."""
    import rasterio

    from harma.geo.reader import read_tile, scene_env

    cells = {c["scene"]: c["cells"] for c in json.loads(storage.read_bytes(storage.join(root, "cells.json")))}
    scenes, bad = list_scenes(storage.join(root, "stac/items.json"))
    if bad:
        raise ValueError(f"{root}: STAC items without an image: {'; '.join(b['reason'] for b in bad)}")
    scenes = sorted(scenes, key=lambda s: s["scene"])
    if not 0 <= test_scenes < len(scenes):
        raise ValueError(f"--test-scenes {test_scenes}: keep at least one of the {len(scenes)} scenes for training")
    held_out = {s["scene"] for s in scenes[len(scenes) - test_scenes:]}
    rows = {split: {n: [] for n in PARQUET_SCHEMA.names} for split in ("train", "val", "test")}
    reports = {split: SplitReport() for split in rows}
    image_id, skipped = 0, 0
    for scene in scenes:
        with scene_env(), rasterio.open(scene["uri"]) as ds:
            for cell in cells.get(scene["scene"], []):
                col, row, w, h = cell["window"]
                pixels, nodata = read_tile(ds, (col, row, w, h), w, PRESETS[preset])
                if nodata > max_nodata_fraction:
                    skipped += 1
                    continue
                buf = io.BytesIO()
                Image.fromarray(pixels.transpose(1, 2, 0)).save(buf, format="PNG")
                key = f"{scene['scene']}/{col}_{row}.png"
                split = _split_of(key, scene["scene"] in held_out)
                part = rows[split]
                for name, value in (("image", buf.getvalue()), ("image_key", key), ("image_id", image_id),
                                    ("captions", list(cell["captions"])), ("split", split), ("label", cell["kind"])):
                    part[name].append(value)
                image_id += 1
                report = reports[split]
                report.images += 1
                report.captions += len(cell["captions"])
                if len(part["image"]) >= shard_images:
                    _flush(rows, reports, split, out)
        progress(f"{scene['scene']}: {'test' if scene['scene'] in held_out else 'train/val'}")
    for split in rows:
        if rows[split]["image"]:
            _flush(rows, reports, split, out)
    result = {"out": out, "scenes": root, "test_scenes": sorted(held_out), "skipped_nodata_cells": skipped,
              "splits": {s: r.__dict__ for s, r in reports.items()}}
    storage.write_bytes(storage.join(out, "prepare_report.json"), json.dumps(result, indent=1).encode())
    for split, r in reports.items():
        progress(f"{split}: {r.images} tiles, {r.captions} captions in {r.shards} shard(s)")
    return result


def _flush(rows: dict, reports: dict, split: str, out: str) -> None:
    report = reports[split]
    report.bytes += write_shard(rows[split], storage.join(out, split, f"part-{report.shards:05d}.parquet"))
    report.shards += 1
    rows[split] = {n: [] for n in PARQUET_SCHEMA.names}
