"""Generated georeferenced scenes: Cloud-Optimized GeoTIFFs with a STAC ItemCollection and the
footprints of every drawn object.

    harma data synth --scenes 4 --out data/scenes [--scene-size 4096] [--seed 0]

Each scene is a mosaic of `CELL`-pixel cells, each cell drawn by `harma.data.synth` (land cover,
river, road, a group of objects of one kind) with its five captions; 4 uint16 bands (R, G, B,
NIR; reflectance x 10,000, the `generic` radiometric preset maps R, G, B back to the drawn colours
exactly), a nodata border (value 0) along two edges, in the UTM zone of its place at 0.5-1 m per
pixel, acquired on its own date. Written (local folder or s3:// prefix):

    scenes/<scene>.tif        COG: 256-pixel internal tiles, deflate, overviews
    stac/items.json           STAC ItemCollection: one item per scene (datetime, bbox, footprint,
                              proj:code, gsd; asset "image" -> the COG, href relative to the file)
    ground_truth.geojson      one feature per object: its footprint (WGS84) and class
    cells.json                per scene and cell: pixel window, scene kind, captions
    scenes.json               counts, seed, generator version

Deterministic for a seed: scene i depends only on (seed, i).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from datetime import datetime, timedelta, timezone

import numpy as np
from affine import Affine

from harma import storage
from harma.data.synth import detailed_captions, render_scene, sample_scene
from harma.geo.radiometry import PRESETS, from_rgb8
from harma.geo.tiling import footprints, window_footprint

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
CELL = 256  # pixels of one drawn cell
# (name, longitude, latitude): places in different UTM zones, north and south.
PLACES = (("rotterdam", 4.40, 51.90), ("houston", -95.10, 29.70), ("singapore", 103.70, 1.30),
          ("santos", -46.30, -23.95), ("lagos", 3.40, 6.45), ("busan", 129.05, 35.10))
FIRST_DATE = datetime(2025, 1, 10, 10, 30, tzinfo=timezone.utc)


def utm_epsg(lon: float, lat: float) -> int:
    zone = int((lon + 180) // 6) + 1
    return (32600 if lat >= 0 else 32700) + zone


def scene_plan(index: int, seed: int, size: int) -> dict:
    """Place, CRS, grid and date of scene `index` (no pixels)."""
    from rasterio.warp import transform as warp

    rng = np.random.default_rng([seed, index, 7])
    name, lon, lat = PLACES[index % len(PLACES)]
    lon, lat = lon + float(rng.uniform(-0.05, 0.05)), lat + float(rng.uniform(-0.05, 0.05))
    epsg = utm_epsg(lon, lat)
    [x], [y] = warp("EPSG:4326", f"EPSG:{epsg}", [lon], [lat])
    gsd = float(rng.choice([0.5, 0.6, 0.8, 1.0]))
    transform = Affine(gsd, 0.0, round(x - size * gsd / 2), 0.0, -gsd, round(y + size * gsd / 2))
    when = FIRST_DATE + timedelta(days=int(index * 41 + rng.integers(0, 20)))
    return {"id": f"scene-{index:03d}-{name}", "epsg": epsg, "transform": transform, "gsd": gsd,
            "datetime": when, "border": (int(rng.integers(8, CELL // 2)), int(rng.integers(8, CELL // 2)))}


def render(index: int, seed: int, size: int) -> tuple[dict, np.ndarray, np.ndarray, list[dict]]:
    """(plan, (4, size, size) uint16 bands, (size, size) valid mask, cells with their objects)."""
    plan = scene_plan(index, seed, size)
    rgb = np.zeros((size, size, 3), np.uint8)
    cells = []
    n = max(1, size // CELL)
    for r in range(n):
        for c in range(n):
            rng = np.random.default_rng([seed, index, r, c])
            scene = sample_scene(rng)
            boxes: list[tuple[float, float, float, float]] = []
            img = np.asarray(render_scene(scene, rng, CELL, boxes))
            h, w = min(CELL, size - r * CELL), min(CELL, size - c * CELL)
            rgb[r * CELL:r * CELL + h, c * CELL:c * CELL + w] = img[:h, :w]
            cells.append({"cell": [r, c], "window": [c * CELL, r * CELL, w, h], "kind": scene.kind,
                          "background": scene.background, "river": scene.river, "road": scene.road,
                          "captions": detailed_captions(scene, rng),
                          "objects": [(c * CELL + x0, r * CELL + y0, c * CELL + x1, r * CELL + y1)
                                      for x0, y0, x1, y1 in boxes]})
    valid = np.ones((size, size), bool)
    left, top = plan["border"]
    valid[:, :left] = False
    valid[:top, :] = False
    dn = from_rgb8(rgb.transpose(2, 0, 1), PRESETS["generic"])
    nir = np.clip(rgb[..., 1].astype(np.float64) * 1.6 + 20, 0, 255).astype(np.uint8)  # vegetation bright in NIR
    bands = np.concatenate([dn, from_rgb8(nir[None], PRESETS["generic"])])
    bands = np.maximum(bands, 1)  # 0 is nodata
    bands[:, ~valid] = 0
    # an object counts where it is on valid pixels
    for cell in cells:
        cell["objects"] = [b for b in cell["objects"] if valid[int((b[1] + b[3]) / 2), int((b[0] + b[2]) / 2)]]
    return plan, bands, valid, cells


def write_cog(path: str, bands: np.ndarray, plan: dict) -> None:
    """A COG at local `path`: 256-pixel tiles, deflate, overviews, nodata 0, acquisition time tag."""
    import rasterio
    from rasterio.shutil import copy as rio_copy

    profile = {"driver": "GTiff", "width": bands.shape[2], "height": bands.shape[1], "count": bands.shape[0],
               "dtype": "uint16", "crs": f"EPSG:{plan['epsg']}", "transform": plan["transform"], "nodata": 0,
               "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
    with tempfile.TemporaryDirectory() as tmp:
        staging = os.path.join(tmp, "staging.tif")
        with rasterio.open(staging, "w", **profile) as dst:
            dst.write(bands)
            dst.update_tags(TIFFTAG_DATETIME=plan["datetime"].strftime("%Y:%m:%d %H:%M:%S"))
            for i, name in enumerate(("red", "green", "blue", "nir"), start=1):
                dst.set_band_description(i, name)
        rio_copy(staging, path, driver="COG", compress="DEFLATE", blocksize=256, overview_resampling="average",
                 BIGTIFF="IF_SAFER")


def synthesize_scenes(out: str, scenes: int, seed: int = 0, size: int = 4096, progress=log.info) -> dict:
    """Write `scenes` generated scenes, their STAC items and ground truth under `out`; returns the summary."""
    import pystac
    from shapely.geometry import mapping

    if scenes < 1 or size < 64:
        raise ValueError(f"need at least one scene of at least 64 pixels, got {scenes} of {size}")
    storage.makedirs(out)
    items, objects, cell_rows = [], [], []
    for i in range(scenes):
        plan, bands, _, cells = render(i, seed, size)
        rel = f"scenes/{plan['id']}.tif"
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "scene.tif")
            write_cog(local, bands, plan)
            with open(local, "rb") as handle:
                storage.write_bytes(storage.join(out, rel), handle.read())
        crs = f"EPSG:{plan['epsg']}"
        outline = window_footprint(plan["transform"], crs, (0, 0, size, size))
        item = pystac.Item(id=plan["id"], geometry=mapping(outline), bbox=list(outline.bounds),
                           datetime=plan["datetime"], properties={"proj:code": crs, "gsd": plan["gsd"]})
        item.add_asset("image", pystac.Asset(href=f"../{rel}", media_type=pystac.MediaType.COG, roles=["data"]))
        items.append(item)
        boxes = [(cell, b) for cell in cells for b in cell["objects"]]
        windows = [(round(b[0]), round(b[1]), max(1, round(b[2] - b[0])), max(1, round(b[3] - b[1]))) for _, b in boxes]
        for (cell, _), poly in zip(boxes, footprints(plan["transform"], crs, windows), strict=True):
            objects.append({"type": "Feature", "geometry": mapping(poly),
                            "properties": {"class": cell["kind"], "scene": plan["id"], "cell": cell["cell"]}})
        cell_rows.append({"scene": plan["id"], "cells": [{k: v for k, v in c.items() if k != "objects"} for c in cells]})
        progress(f"scene {i + 1}/{scenes}: {plan['id']} ({size} px, {plan['gsd']} m, {crs}, "
                 f"{plan['datetime'].date()}, {len(boxes)} objects)")
    collection = pystac.ItemCollection(items)
    storage.write_bytes(storage.join(out, "stac/items.json"), json.dumps(collection.to_dict(transform_hrefs=False),
                                                                         indent=1).encode())
    storage.write_bytes(storage.join(out, "ground_truth.geojson"),
                        json.dumps({"type": "FeatureCollection", "features": objects}).encode())
    storage.write_bytes(storage.join(out, "cells.json"), json.dumps(cell_rows).encode())
    summary = {"scenes": scenes, "scene_size": size, "cell": CELL, "seed": seed, "objects": len(objects),
               "generator_version": GENERATOR_VERSION}
    storage.write_bytes(storage.join(out, "scenes.json"), json.dumps(summary, indent=1).encode())
    return summary
