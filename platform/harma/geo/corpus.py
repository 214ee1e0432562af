"""A scene archive as an index corpus: STAC ItemCollection, folder or s3:// prefix of GeoTIFFs ->
a Ray Data stream of model-sized RGB tiles with their footprints.

    scenes, bad = list_scenes("s3://bucket/archive/stac/items.json")
    ds = tile_dataset(scenes, cfg.geo, image_size=224)     # rows: pixels, id, scene, geometry, ...

Two kinds of task spread the archive over the cluster. Before the stream starts, Ray tasks of
HEADERS_PER_TASK scenes each read the headers (CRS, grid, time: a few KiB by range) and cut each
scene's tiling plan into units of windows (`plan_units`: `geo.windows_per_task` at most, or, by
default, the archive's windows over UNITS_PER_CPU units a cluster CPU). The stream is then
one Ray Data operator over those units: a task per unit opens the scene and reads only its windows
(`harma.geo.reader.read_tiles`: the region around a run of windows in one request, at most
REGION_MAX_BYTES of it, each window then resampled from it), so a scene of any size is never
decoded whole. (The plan was a Ray Data operator of its own, followed by a repartition into one
unit a block; that all-to-all step held back the reads: one read task ran for the first ~0.9 s on
2 cores.)
A scene that cannot be read comes out as one row with its reason (`status`), a tile mostly
nodata as a row with status `nodata`; the index build counts both and lists the scenes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator

import numpy as np

from harma import storage
from harma.geo.radiometry import PRESETS

SCENE_EXTENSIONS = (".tif", ".tiff")
HEADER_CPUS = 0.1  # a header read is a few small range requests
UNITS_PER_CPU = 4  # read units planned per cluster CPU when geo.windows_per_task is null: Ray Data
# leaves a CPU idle ~0.2 s between one read task and the next (its scheduling loop), so fewer, larger
# units lose less; 4 a CPU still lets a CPU that finishes early take another (benchmarks/geo_tiles.py)
AUTO_UNIT_WINDOWS = (128, 2048)  # the fewest and most windows an automatic unit takes
TILE_CPUS = 1.0  # reading, resampling and mapping a unit's windows: CPU-bound (GDAL's resampling); at 0.5
# two ran per core and delivered less (benchmarks/geo_tiles.py, 2 cores: 316 against 507 tiles/s)


def _stem(uri: str) -> str:
    return os.path.splitext(os.path.basename(uri.rstrip("/")))[0]


def _resolve_href(href: str, base: str) -> str:
    if "://" in href or href.startswith("/"):
        return href
    parts = [p for p in storage.join(os.path.dirname(base.rstrip("/")) or ".", href).split("/")]
    out: list[str] = []
    for p in parts:  # normalise ../ without touching the scheme's //
        if p == ".." and out and out[-1] not in ("", "..") and not out[-1].endswith(":"):
            out.pop()
        elif p != ".":
            out.append(p)
    return "/".join(out)


def _asset_href(item) -> str | None:
    for key in ("image", "data", "visual"):
        if key in item.assets:
            return item.assets[key].href
    for asset in item.assets.values():
        if "data" in (asset.roles or []) or (asset.media_type or "").startswith("image/tiff"):
            return asset.href
    return None


def list_scenes(corpus_uri: str) -> tuple[list[dict], list[dict]]:
    """(scenes: uri, scene id, STAC datetime or None; bad: uri and reason) of a STAC ItemCollection
    (.json), a folder or an s3:// prefix of GeoTIFFs."""
    if corpus_uri.lower().endswith(".json"):
        import pystac

        try:
            raw = json.loads(storage.read_bytes(corpus_uri))
            collection = pystac.ItemCollection.from_dict(raw, preserve_dict=False)
        except (ValueError, KeyError, TypeError, pystac.STACError, pystac.errors.STACTypeError) as err:
            raise ValueError(f"{corpus_uri}: not a STAC ItemCollection ({str(err).splitlines()[0][:200]})") from None
        scenes, bad = [], []
        for item in collection:
            href = _asset_href(item)
            if href is None:
                bad.append({"uri": f"{corpus_uri}#{item.id}", "scene": item.id,
                            "reason": f"STAC item {item.id!r} has no image asset (assets: {', '.join(item.assets) or 'none'})"})
                continue
            when = item.datetime.isoformat().replace("+00:00", "Z") if item.datetime else None
            scenes.append({"uri": _resolve_href(href, corpus_uri), "scene": item.id, "datetime": when or ""})
        return scenes, bad
    files = [f for f in storage.list_files(corpus_uri) if f.lower().endswith(SCENE_EXTENSIONS)]
    if not files:
        raise FileNotFoundError(f"{corpus_uri}: no GeoTIFF scenes ({', '.join(SCENE_EXTENSIONS)})")
    return [{"uri": f, "scene": _stem(f), "datetime": ""} for f in files], []


def auto_unit_windows(total_windows: int, cpus: float) -> int:
    """Windows a read unit takes when `geo.windows_per_task` is null: the archive's windows spread
    over UNITS_PER_CPU units a CPU, within AUTO_UNIT_WINDOWS."""
    fewest, most = AUTO_UNIT_WINDOWS
    return int(min(most, max(fewest, math.ceil(total_windows / max(1.0, cpus * UNITS_PER_CPU)))))


def split_windows(windows: list, most: int) -> list[list]:
    """A scene's windows cut into the fewest consecutive runs of at most `most`, of near-equal
    length (961 windows at most 481 a run: 480 and 481, not 481 and 480 left over as 481 + 480)."""
    parts = max(1, math.ceil(len(windows) / max(1, most)))
    bounds = [len(windows) * i // parts for i in range(parts + 1)]
    return [windows[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def plan_scene(batch: dict[str, np.ndarray], geo: dict, image_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Map function (one scene a call): header -> units of at most `geo["windows_per_task"]` windows
    (`split_windows`; the whole scene in one unit when it is None), or one row with the reason."""
    from harma.geo.reader import SceneError, read_header, scene_env
    from harma.geo.tiling import native_tile_pixels, plan_tiles

    preset = PRESETS[geo["preset"]]
    for uri, scene, when in zip(batch["uri"], batch["scene"], batch["datetime"], strict=True):
        uri, scene = str(uri), str(scene)
        try:
            with scene_env():
                header = read_header(uri, preset)
            tile = native_tile_pixels(geo["tile_size"], header.gsd, geo["target_gsd"])
            stride = max(1, round(tile * (geo["tile_stride"] or geo["tile_size"]) / geo["tile_size"]))
            windows = plan_tiles(header.width, header.height, tile, min(stride, tile))
        except (SceneError, ValueError) as err:
            yield _unit(uri, scene, "", None, [], f"{err}")
            continue
        for run in split_windows(windows, geo.get("windows_per_task") or len(windows)):
            yield _unit(uri, scene, str(when) or header.datetime or "", header, run, "")


def _unit(uri, scene, when, header, windows, error) -> dict[str, np.ndarray]:
    info = {} if header is None else {"crs": header.crs, "transform": list(header.transform), "gsd": header.gsd}
    return {"uri": np.array([uri], dtype=object), "scene": np.array([scene], dtype=object),
            "datetime": np.array([when], dtype=object), "header": np.array([json.dumps(info)], dtype=object),
            "windows": np.array([json.dumps(windows)], dtype=object), "error": np.array([error], dtype=object)}


def read_unit(batch: dict[str, np.ndarray], geo: dict, image_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Map function (one unit a call): its windows as tile rows, `geo["tiles_per_output"]` at a time."""
    import rasterio
    from affine import Affine

    from harma.geo.reader import read_tiles, scene_env
    from harma.geo.tiling import footprints

    preset = PRESETS[geo["preset"]]
    for uri, scene, when, header, windows, error in zip(batch["uri"], batch["scene"], batch["datetime"],
                                                        batch["header"], batch["windows"], batch["error"], strict=True):
        uri, scene = str(uri), str(scene)
        if error:
            yield _tile_rows([_failed(uri, scene, str(error), image_size)])
            continue
        info, windows = json.loads(header), [tuple(w) for w in json.loads(windows)]
        rows: list[dict] = []
        try:
            with scene_env(), rasterio.open(uri) as ds:  # one environment: no new AWS session per call
                polygons = footprints(Affine(*info["transform"]), info["crs"], windows)
                tiles = read_tiles(ds, windows, image_size, preset)
                for window, poly, (pixels, nodata) in zip(windows, polygons, tiles, strict=True):
                    status = "nodata" if nodata > geo["max_nodata_fraction"] else "ok"
                    c = poly.centroid
                    rows.append({"pixels": pixels, "id": f"{scene}/{window[0]}_{window[1]}", "source": uri,
                                 "scene": scene, "datetime": str(when), "window": list(window),
                                 "geometry": poly.wkb, "centre_lon": c.x, "centre_lat": c.y,
                                 "gsd": info["gsd"] * window[2] / geo["tile_size"], "status": status})
                    if len(rows) == geo["tiles_per_output"]:
                        yield _tile_rows(rows)
                        rows = []
        except (rasterio.errors.RasterioError, OSError, ValueError) as err:
            rows = [_failed(uri, scene, f"read failed: {_gdal_reason(err)}", image_size)]
        if rows:
            yield _tile_rows(rows)


def _gdal_reason(err: BaseException) -> str:
    """The most specific message of an error chain (GDAL's own, under rasterio's 'Read failed')."""
    texts = []
    while err is not None and len(texts) < 4:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "See previous exception" not in text:
            texts.append(text)
        err = err.__cause__ or err.__context__
    return ("; ".join(texts) or "unknown error")[:300]


def _failed(uri: str, scene: str, reason: str, image_size: int) -> dict:
    return {"pixels": np.zeros((3, image_size, image_size), np.uint8), "id": f"{scene}/error", "source": uri,
            "scene": scene, "datetime": "", "window": [0, 0, 0, 0], "geometry": b"", "centre_lon": np.nan,
            "centre_lat": np.nan, "gsd": np.nan, "status": f"error: {reason}"}


def _tile_rows(rows: list[dict]) -> dict[str, np.ndarray]:
    n = len(rows)
    out = {"pixels": np.stack([r["pixels"] for r in rows]),
           "window": np.array([r["window"] for r in rows], np.int64).reshape(n, 4),
           "image_id": np.full(n, -1, np.int64), "split": np.array([""] * n, dtype=object),
           "label": np.array([None] * n, dtype=object)}
    for key in ("id", "source", "scene", "datetime", "geometry", "status"):
        out[key] = np.array([r[key] for r in rows], dtype=object)
    for key in ("centre_lon", "centre_lat", "gsd"):
        out[key] = np.array([r[key] for r in rows], np.float64)
    return out


HEADERS_PER_TASK = 32  # scenes whose headers one planning (or counting) task reads
UNIT_KEYS = ("uri", "scene", "datetime", "header", "windows", "error")


def scene_units(scenes: list[dict], geo: dict, image_size: int) -> list[dict]:
    """One unit (UNIT_KEYS, strings) a scene with all of its windows, from its header (plan_scene)."""
    batch = {k: np.array([s.get(k) or "" for s in scenes], dtype=object) for k in ("uri", "scene", "datetime")}
    return [{k: str(unit[k][0]) for k in UNIT_KEYS}
            for unit in plan_scene(batch, {**geo, "windows_per_task": None}, image_size)]  # whole scenes


def _tiles_of(scenes: list[dict], geo: dict, image_size: int) -> int:
    return sum(len(json.loads(unit["windows"])) for unit in scene_units(scenes, geo, image_size))


def split_units(units: list[dict], geo: dict, cpus: float) -> list[dict]:
    """Whole-scene units (plan_scene with windows_per_task None) cut into near-equal read units of
    at most `geo["windows_per_task"]` windows, or, when that is None, `auto_unit_windows` for a
    cluster of `cpus` CPUs."""
    plans = [json.loads(u["windows"]) for u in units]
    most = geo.get("windows_per_task") or auto_unit_windows(sum(len(p) for p in plans), cpus)
    out = []
    for unit, plan in zip(units, plans, strict=True):
        runs = split_windows(plan, most)
        out += [unit] if len(runs) == 1 else [{**unit, "windows": json.dumps(run)} for run in runs]
    return out


def plan_units(scenes: list[dict], geo: dict, image_size: int, sample_fraction: float | None = None) -> list[dict]:
    """The scenes' read units in scene order ({uri, scene, datetime, header, windows, error}, strings;
    a scene that cannot be read is one unit carrying its reason), from their headers read by Ray
    tasks of HEADERS_PER_TASK scenes each; with `sample_fraction`, a seeded share of each scene's
    windows (`sample_windows`, drawn over the whole scene: the same on any cluster); then cut for
    the cluster's CPUs (`split_units`)."""
    import ray

    task = ray.remote(num_cpus=HEADER_CPUS)(scene_units)
    parts = ray.get([task.remote(scenes[i:i + HEADERS_PER_TASK], geo, image_size)
                     for i in range(0, len(scenes), HEADERS_PER_TASK)])
    units = [unit for part in parts for unit in part]
    if sample_fraction is not None and sample_fraction < 1 and units:
        kept = sample_windows({k: np.array([u[k] for u in units], dtype=object) for k in UNIT_KEYS}, sample_fraction)
        units = [{k: str(kept[k][i]) for k in UNIT_KEYS} for i in range(len(kept["uri"]))]
    return split_units(units, geo, ray.cluster_resources().get("CPU", 1.0))


def count_tiles(scenes: list[dict], geo: dict, image_size: int) -> int:
    """Tiles the scenes will be cut into (before mostly-nodata ones are dropped), from their headers
    alone (a Ray task per HEADERS_PER_TASK scenes; a scene that cannot be read counts none): what
    an approximate index is planned for before embedding."""
    import ray

    task = ray.remote(num_cpus=HEADER_CPUS)(_tiles_of)
    return sum(ray.get([task.remote(scenes[i:i + HEADERS_PER_TASK], geo, image_size)
                        for i in range(0, len(scenes), HEADERS_PER_TASK)]))


def sample_windows(batch: dict[str, np.ndarray], fraction: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Map function over read units: each window kept with probability `fraction`, drawn from a
    generator seeded by the unit (the same sample on every run), before any pixel is read; units
    left without a window are dropped (units carrying a scene's error are kept)."""
    import zlib

    keep, windows = [], []
    for scene, listed, error in zip(batch["scene"], batch["windows"], batch["error"], strict=True):
        listed = str(listed)
        rng = np.random.default_rng([seed, zlib.crc32(f"{scene}|{listed[:64]}".encode())])
        chosen = [w for w in json.loads(listed) if rng.random() < fraction]
        keep.append(bool(error) or bool(chosen))
        windows.append(json.dumps(chosen))
    keep_rows = np.array(keep, dtype=bool)
    out = {k: v[keep_rows] for k, v in batch.items() if k != "windows"}
    out["windows"] = np.array(windows, dtype=object)[keep_rows]
    return out


def tile_dataset(scenes: list[dict], geo: dict, image_size: int, sample_fraction: float | None = None):
    """Ray Data stream of the scenes' tiles (`read_unit` rows), spread over the cluster; with
    `sample_fraction`, of a seeded random share of each scene's tiles (`sample_windows`)."""
    import ray

    units = plan_units(scenes, geo, image_size, sample_fraction)
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))  # a block, and a read task, per unit
    return ds.map_batches(read_unit, fn_kwargs={"geo": geo, "image_size": image_size}, batch_size=1,
                          batch_format="numpy", num_cpus=TILE_CPUS)
