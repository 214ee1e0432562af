"""Generated georeferenced scenes and reading them (harma.geo.scenes, reader, corpus) without Ray:
the COGs are what they claim, deterministic, their tiles are the drawn pixels, and every kind of
bad input is named with its reason."""

import json
import shutil

import numpy as np
import pytest
import rasterio
from shapely.geometry import shape

from harma.geo.corpus import (
    auto_unit_windows,
    list_scenes,
    plan_scene,
    read_unit,
    split_units,
    split_windows,
)
from harma.geo.radiometry import PRESETS
from harma.geo.reader import BLOCK_CACHE_BYTES, SceneError, read_header, read_tile, scene_env
from harma.geo.scenes import render, synthesize_scenes

GEO = {"tile_size": 128, "tile_stride": 64, "target_gsd": None, "preset": "generic", "max_nodata_fraction": 0.5,
       "max_bad_fraction": 0.1, "windows_per_task": 20, "tiles_per_output": 8}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("scenes")
    synthesize_scenes(str(out), 2, seed=3, size=512)
    return str(out)


def _scene_files(archive):
    return sorted(list_scenes(f"{archive}/scenes")[0], key=lambda s: s["uri"])


def test_a_generated_scene_is_a_tiled_compressed_cog_with_overviews_in_its_utm_zone(archive):
    scenes, bad = list_scenes(f"{archive}/stac/items.json")
    assert bad == [] and len(scenes) == 2
    with rasterio.open(scenes[0]["uri"]) as ds:
        assert (ds.count, ds.dtypes[0], ds.nodata) == (4, "uint16", 0)
        assert ds.profile["tiled"] and ds.block_shapes[0] == (256, 256)
        assert ds.compression.value.lower() == "deflate" and ds.overviews(1)  # overviews present
        assert ds.crs.to_epsg() == 32631  # Rotterdam, 4.4 E: UTM zone 31 north
        assert ds.res[0] in (0.5, 0.6, 0.8, 1.0)
        assert ds.tags()["TIFFTAG_DATETIME"].startswith("2025:")
    assert scenes[0]["datetime"].startswith("2025-01")


def test_stac_items_ground_truth_and_pixels_agree_and_are_deterministic(archive, tmp_path):
    items = json.loads(open(f"{archive}/stac/items.json").read())
    truth = json.loads(open(f"{archive}/ground_truth.geojson").read())["features"]
    for item in items["features"]:
        outline = shape(item["geometry"])
        objects = [shape(f["geometry"]) for f in truth if f["properties"]["scene"] == item["id"]]
        # every object inside its scene (to 1e-7 degrees, ~1 cm: edges reprojected point by point)
        assert objects and all(outline.buffer(1e-7).contains(o) for o in objects)
    assert {f["properties"]["class"] for f in truth} <= {"buildings", "storage tanks", "ponds", "planes", "ships",
                                                          "fields", "trees"}
    again = tmp_path / "again"
    synthesize_scenes(str(again), 2, seed=3, size=512)
    assert (again / "ground_truth.geojson").read_bytes() == open(f"{archive}/ground_truth.geojson", "rb").read()
    for name in ("scene-000-rotterdam.tif", "scene-001-houston.tif"):
        with rasterio.open(f"{archive}/scenes/{name}") as a, rasterio.open(again / "scenes" / name) as b:
            assert np.array_equal(a.read(), b.read())


def test_a_tile_read_through_the_preset_is_the_drawn_scene(archive):
    _, bands, valid, _ = render(0, 3, 512)
    [scene] = [s for s in list_scenes(f"{archive}/stac/items.json")[0] if s["scene"].startswith("scene-000")]
    with rasterio.open(scene["uri"]) as ds:
        pixels, nodata = read_tile(ds, (256, 256, 128, 128), 128, PRESETS["generic"])  # no resampling
        assert nodata == 0.0
        drawn = np.rint(np.clip(bands[:3, 256:384, 256:384] * 1e-4 / 0.3, 0, 1) * 255).astype(np.uint8)
        assert np.array_equal(pixels, drawn)
        _, border = read_tile(ds, (0, 0, 128, 128), 64, PRESETS["generic"])  # the nodata corner
        assert border == pytest.approx(1 - valid[:128, :128].mean(), abs=0.05)


def _batch(rows):
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


def test_a_scene_streams_as_units_of_windows_each_tile_with_its_footprint(archive):
    scenes, _ = list_scenes(f"{archive}/stac/items.json")
    units = list(plan_scene(_batch(scenes[:1]), GEO, 48))
    assert len(units) == 3 and not any(u["error"][0] for u in units)  # 7 x 7 = 49 windows, 20 per unit
    tiles = [t for u in units for out in read_unit(u, GEO, 48) for t in [out]]
    ids = np.concatenate([t["id"] for t in tiles])
    assert len(ids) == 49 and len(set(ids)) == 49
    first = tiles[0]
    assert first["pixels"].shape[1:] == (3, 48, 48) and first["pixels"].dtype == np.uint8
    with rasterio.open(scenes[0]["uri"]) as ds:
        lon, lat = first["centre_lon"][0], first["centre_lat"][0]
        x, y = rasterio.warp.transform("EPSG:4326", ds.crs, [lon], [lat])
        col, row = ~ds.transform @ (x[0], y[0])
        assert (col, row) == pytest.approx((64, 64), abs=0.5)  # tile (0, 0, 128, 128): centre pixel 64, 64
        assert first["gsd"][0] == pytest.approx(ds.res[0])
    statuses = np.concatenate([t["status"] for t in tiles]).tolist()
    assert set(statuses) <= {"ok", "nodata"} and "ok" in statuses


def test_read_units_are_cut_near_equal_and_sized_for_the_cluster_when_not_configured():
    assert [len(r) for r in split_windows(list(range(961)), 481)] == [480, 481]  # not 481 + 480 left over
    assert [len(r) for r in split_windows(list(range(49)), 20)] == [16, 16, 17]
    assert sum(split_windows(list(range(49)), 20), []) == list(range(49)) and split_windows([], 5) == [[]]
    assert auto_unit_windows(3844, 2) == 481  # 3,844 windows over 4 units a CPU of 2: ceil(3844 / 8)
    assert (auto_unit_windows(100, 64), auto_unit_windows(10**7, 2)) == (128, 2048)  # the bounds
    whole = [{"uri": f"s{i}", "scene": f"s{i}", "windows": json.dumps([[i, k, 8, 8] for k in range(961)]),
              "error": ""} for i in range(2)] + [{"uri": "bad", "scene": "bad", "windows": "[]", "error": "cannot open"}]
    units = split_units(whole, {"windows_per_task": None}, cpus=2)  # 1,922 windows: ceil(1922 / 8) = 241 a unit
    assert [len(json.loads(u["windows"])) for u in units] == [240, 240, 240, 241] * 2 + [0]
    assert [u["scene"] for u in units] == ["s0"] * 4 + ["s1"] * 4 + ["bad"] and units[-1]["error"] == "cannot open"
    assert sum((json.loads(u["windows"]) for u in units[:4]), []) == json.loads(whole[0]["windows"])
    configured = split_units(whole, {"windows_per_task": 500}, cpus=2)  # at most 500, near-equal
    assert [len(json.loads(u["windows"])) for u in configured] == [480, 481] * 2 + [0]


def test_a_reading_process_bounds_gdals_block_cache_unless_the_user_sets_it(monkeypatch):
    monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    with scene_env():
        assert rasterio.env.get_gdal_config("GDAL_CACHEMAX") == 128 * 2**20 == BLOCK_CACHE_BYTES
    monkeypatch.setenv("GDAL_CACHEMAX", "512")  # the user's: scene_env leaves the cache as GDAL has it
    outside = rasterio.env.get_gdal_config("GDAL_CACHEMAX")
    with scene_env():
        assert rasterio.env.get_gdal_config("GDAL_CACHEMAX") == outside != BLOCK_CACHE_BYTES


def _write(path, count=4, crs="EPSG:32631", size=64):
    profile = {"driver": "GTiff", "width": size, "height": size, "count": count, "dtype": "uint16"}
    if crs:
        profile.update(crs=crs, transform=rasterio.transform.from_origin(600000, 5750000, 1, 1))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.full((count, size, size), 1000, np.uint16))


def test_every_bad_scene_is_named_with_its_reason(archive, tmp_path):
    generic, s2 = PRESETS["generic"], PRESETS["sentinel2_l2a"]
    _write(tmp_path / "no_crs.tif", crs=None)
    with pytest.raises(SceneError, match="no coordinate reference system|no georeferencing"):
        read_header(str(tmp_path / "no_crs.tif"), generic)
    _write(tmp_path / "three.tif", count=3)
    with pytest.raises(SceneError, match="3 band.*needs band 4"):
        read_header(str(tmp_path / "three.tif"), s2)
    (tmp_path / "junk.tif").write_bytes(b"II*\x00 not a tiff at all")
    with pytest.raises(SceneError, match="cannot open"):
        read_header(str(tmp_path / "junk.tif"), generic)
    with pytest.raises(SceneError, match="cannot open"):
        read_header(str(tmp_path / "missing.tif"), generic)
    # a truncated COG: its header reads, its pixels do not -> one error row for the scene
    src = _scene_files(archive)[0]["uri"]
    data = open(src, "rb").read()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 3])
    [unit] = list(plan_scene(_batch([{"uri": str(tmp_path / "cut.tif"), "scene": "cut", "datetime": ""}]),
                             {**GEO, "windows_per_task": 1000}, 128))
    outs = list(read_unit(unit, GEO, 128))  # full resolution: the pixels past the cut
    errors = [s for o in outs for s in o["status"] if s.startswith("error")]
    assert errors and "read failed" in errors[-1]


def test_a_stac_item_without_an_image_asset_is_listed_bad_and_hrefs_resolve_beside_the_file(archive, tmp_path):
    items = json.loads(open(f"{archive}/stac/items.json").read())
    items["features"][1]["assets"] = {"thumbnail": {"href": "x.png", "roles": ["thumbnail"], "type": "image/png"}}
    (tmp_path / "stac").mkdir()
    (tmp_path / "stac" / "items.json").write_text(json.dumps(items))
    shutil.copytree(f"{archive}/scenes", tmp_path / "scenes")
    scenes, bad = list_scenes(str(tmp_path / "stac" / "items.json"))
    assert [s["uri"] for s in scenes] == [str(tmp_path / "scenes" / "scene-000-rotterdam.tif")]
    assert len(bad) == 1 and "no image asset" in bad[0]["reason"] and bad[0]["scene"] == "scene-001-houston"
    (tmp_path / "notstac.json").write_text('{"type": "Feature"}')
    with pytest.raises(ValueError, match="not a STAC ItemCollection"):
        list_scenes(str(tmp_path / "notstac.json"))


def test_captioned_cells_become_training_shards_with_a_scene_held_out_for_test(archive, tmp_path):
    import io

    from PIL import Image

    from harma.data.prepared import captions_per_image
    from harma.geo.training import prepare_scenes

    report = prepare_scenes(archive, str(tmp_path / "store"), test_scenes=1)
    assert report["test_scenes"] == ["scene-001-houston"]
    splits = report["splits"]
    # 2 x 2 cells a scene; a cell mostly in the nodata border is skipped and counted
    assert sum(s["images"] for s in splits.values()) + report["skipped_nodata_cells"] == 8
    _, _, valid, _ = render(1, 3, 512)  # houston: its cells at least half valid
    assert splits["test"]["images"] == sum(valid[r:r + 256, c:c + 256].mean() >= 0.5 for r in (0, 256) for c in (0, 256))
    assert captions_per_image(str(tmp_path / "store"), "test") == [5] * splits["test"]["images"]
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "store" / "test" / "part-00000.parquet")
    assert all(k.startswith("scene-001-houston/") for k in table.column("image_key").to_pylist())
    cells = {c["scene"]: c["cells"] for c in json.load(open(f"{archive}/cells.json"))}
    first = cells["scene-001-houston"][-1]  # the bottom-right cell: clear of the nodata border
    row = table.column("image_key").to_pylist().index(f"scene-001-houston/{first['window'][0]}_{first['window'][1]}.png")
    assert table.column("captions").to_pylist()[row] == first["captions"]
    assert table.column("label").to_pylist()[row] == first["kind"]
    png = np.asarray(Image.open(io.BytesIO(table.column("image").to_pylist()[row])))
    _, bands, _, _ = render(1, 3, 512)
    col, r, w, h = first["window"]
    drawn = np.rint(np.clip(bands[:3, r:r + h, col:col + w] * 1e-4 / 0.3, 0, 1) * 255).astype(np.uint8)
    drawn[:, bands[0, r:r + h, col:col + w] == 0] = 0  # nodata border
    assert np.array_equal(png.transpose(2, 0, 1), drawn)
    with pytest.raises(ValueError, match="keep at least one"):
        prepare_scenes(archive, str(tmp_path / "x"), test_scenes=2)


def test_a_tile_sample_keeps_a_seeded_share_of_each_units_windows_before_any_read():
    """harma.geo.corpus.sample_windows (the streamed sample an IVF index is trained on): the same
    windows on every call, about `fraction` of them, units left empty dropped, error units kept."""
    import json

    from harma.geo.corpus import sample_windows

    windows = [[[x, y, 64, 64] for x in range(0, 6400, 64)] for y in range(0, 1280, 64)]  # 20 units of 100
    batch = {"scene": np.array([f"s{i % 3}" for i in range(20)] + ["bad"], dtype=object),
             "windows": np.array([json.dumps(w) for w in windows] + ["[]"], dtype=object),
             "error": np.array([""] * 20 + ["read failed: x"], dtype=object),
             "uri": np.array([f"u{i}" for i in range(21)], dtype=object)}
    half = sample_windows(batch, 0.5)
    again = sample_windows(batch, 0.5)
    kept = [json.loads(w) for w in half["windows"][:-1]]
    assert list(half["windows"]) == list(again["windows"])
    assert 900 <= sum(map(len, kept)) <= 1100  # 2,000 windows, each kept with p = 0.5 (sd 22)
    assert all(set(map(tuple, k)) <= set(map(tuple, w)) for k, w in zip(kept, windows, strict=True))
    assert half["uri"][-1] == "u20" and half["error"][-1] == "read failed: x"  # the scene's error still reported
    none = sample_windows(batch, 0.0)
    assert list(none["uri"]) == ["u20"]
    assert sum(len(json.loads(w)) for w in sample_windows(batch, 1.0)["windows"]) == 2000
    assert list(sample_windows(batch, 0.5, seed=1)["windows"]) != list(half["windows"])


def test_a_forbidden_s3_scene_is_a_bad_scene_with_its_reason_beside_one_that_reads(archive, s3_server, monkeypatch):
    """Bad input: an S3 object the credentials may not read (403) is one unit carrying the store's
    reason, which the build lists in the manifest's `skipped` and counts against max_bad_fraction;
    a readable scene in the same batch plans and reads. A prefix that cannot be listed is refused."""
    import boto3

    from s3server import READER_BUCKET

    admin = boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id=s3_server.access_key,
                         aws_secret_access_key=s3_server.secret_key, region_name="us-east-1")
    for bucket in (READER_BUCKET, "forbidden-scenes"):
        s3_server.create_bucket(bucket)
    files = _scene_files(archive)
    admin.upload_file(files[0]["uri"], READER_BUCKET, "scenes/a.tif")
    admin.upload_file(files[1]["uri"], "forbidden-scenes", "scenes/b.tif")
    for key, value in s3_server.reader_env().items():
        monkeypatch.setenv(key, value)
    batch = _batch([{"uri": f"s3://{READER_BUCKET}/scenes/a.tif", "scene": "a", "datetime": ""},
                    {"uri": "s3://forbidden-scenes/scenes/b.tif", "scene": "b", "datetime": ""}])
    units = list(plan_scene(batch, GEO, 128))
    bad = [u for u in units if u["error"][0]]
    good = [u for u in units if not u["error"][0]]
    assert [str(u["scene"][0]) for u in bad] == ["b"]
    reason = str(bad[0]["error"][0])
    assert reason == "cannot open: Access Denied."
    assert good and {str(u["scene"][0]) for u in good} == {"a"}
    tiles = list(read_unit(good[0], GEO, 128))
    assert tiles and all(s in ("ok", "nodata") for t in tiles for s in t["status"])
    [failed] = list(read_unit(bad[0], GEO, 128))
    assert failed["status"][0] == f"error: {reason}" and failed["source"][0] == "s3://forbidden-scenes/scenes/b.tif"
    assert [s["uri"] for s in list_scenes(f"s3://{READER_BUCKET}/scenes/")[0]] == [f"s3://{READER_BUCKET}/scenes/a.tif"]
    from harma.storage import StorageError

    with pytest.raises(StorageError, match=r"s3://forbidden-scenes/scenes/: cannot list .*ACCESS_DENIED"):
        list_scenes("s3://forbidden-scenes/scenes/")


def test_tiles_are_counted_from_the_headers_and_an_unreadable_scene_counts_none(archive, tmp_path):
    """What an IVF index is planned for before embedding (harma.geo.corpus._tiles_of, one counting
    task's work): a 512-pixel scene in 128-pixel tiles at a 64-pixel stride is 7 x 7 windows."""
    from harma.geo.corpus import _tiles_of

    scenes = _scene_files(archive)
    assert _tiles_of(scenes, GEO, 128) == 2 * 7 * 7
    assert _tiles_of(scenes + [{"uri": str(tmp_path / "missing.tif"), "scene": "missing", "datetime": None}],
                     {**GEO, "tile_stride": 128}, 128) == 2 * 4 * 4


def _write_scene(path, bands, nodata=None, mask=None):
    from rasterio.transform import from_origin

    profile = {"driver": "GTiff", "width": bands.shape[2], "height": bands.shape[1], "count": bands.shape[0],
               "dtype": "uint16", "crs": "EPSG:32631", "transform": from_origin(600000, 5750000, 1, 1),
               "tiled": True, "blockxsize": 128, "blockysize": 128, "compress": "deflate", "nodata": nodata}
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(bands)
        if mask is not None:
            ds.write_mask(mask)


@pytest.mark.parametrize("masking", ["nodata", "internal mask", "none"])
@pytest.mark.parametrize("out_size", [90, 112, 160])  # 128 px windows shrunk 1.42x, 1.14x (the default 256 -> 224), grown
def test_tiles_read_by_regions_are_read_tile_s_pixels_exactly(tmp_path, masking, out_size):
    """read_tiles reads runs of windows as regions and resamples each window from an in-memory
    copy; its pixels and nodata fractions must equal read_tile's window by window, at region
    edges too (a 300 KiB budget cuts the plan into several regions), masked as the scene is
    (GDAL leaves masked pixels out of the bilinear kernel)."""
    from harma.geo.reader import read_tiles, region_groups
    from harma.geo.tiling import plan_tiles

    rng = np.random.default_rng(5)
    bands = rng.integers(1, 3000, (4, 700, 900)).astype(np.uint16)
    bands[:, :, :150] = 0  # a nodata strip crossing tiles
    valid = np.ones((700, 900), np.uint8) * 255
    valid[500:, 600:] = 0
    path = str(tmp_path / "scene.tif")
    _write_scene(path, bands, nodata=0 if masking == "nodata" else None,
                 mask=valid if masking == "internal mask" else None)
    windows = plan_tiles(900, 700, 128, 96)
    budget = 300 * 1024
    assert len(region_groups(windows, 900, 700, budget)) > 3
    with rasterio.open(path) as ds:
        expected = [read_tile(ds, w, out_size, PRESETS["generic"]) for w in windows]
        got = list(read_tiles(ds, windows, out_size, PRESETS["generic"], max_region_bytes=budget))
    assert len(got) == len(expected)
    for (pixels, nodata), (want, want_nodata) in zip(got, expected, strict=True):
        assert np.array_equal(pixels, want) and nodata == want_nodata
    fractions = {round(n, 3) for _, n in expected}
    assert len(fractions) > 2 if masking != "none" else fractions == {0.0}  # masks were in play


def test_region_groups_keep_order_stay_within_budget_and_pad_inside_the_scene():
    from harma.geo.reader import REGION_MARGIN, region_groups

    windows = [(0, 0, 100, 100), (50, 0, 100, 100), (100, 0, 100, 100), (0, 900, 400, 400)]
    groups = region_groups(windows, 1000, 1300, max_bytes=8 * 220 * 120)
    # 8 bytes a pixel: the first three fit one region (200 + 8 margin wide, 108 high, under
    # 220 x 120); the last, 408 x 408 with its margins, is over the budget and stands alone
    assert groups == [((0, 0, 200 + REGION_MARGIN, 100 + REGION_MARGIN), [0, 1, 2]),
                      ((0, 900 - REGION_MARGIN, 400 + REGION_MARGIN, 400 + REGION_MARGIN), [3])]
    tight = region_groups(windows[:3], 1000, 1300, max_bytes=8 * 160 * 110)
    assert [members for _, members in tight] == [[0, 1], [2]]
    assert tight[1][0] == (100 - REGION_MARGIN, 0, 100 + 2 * REGION_MARGIN, 100 + REGION_MARGIN)
    assert region_groups([], 10, 10) == []


def test_windows_shrunk_past_1_5x_are_read_directly_where_gdal_may_pick_an_overview():
    from harma.geo.reader import region_readable

    assert region_readable((0, 0, 256, 256), 224) and region_readable((0, 0, 256, 256), 512)
    assert not region_readable((0, 0, 384, 384), 224) and not region_readable((0, 0, 1024, 1024), 224)
