"""Geospatial pieces without Ray: tiling plans, footprints, radiometric presets, place and time
queries, overlap suppression, GeoParquet, generated scenes and the scene reader's bad inputs
(harma.geo)."""

import json

import numpy as np
import pytest
from affine import Affine
from shapely.geometry import box

from harma.geo.geoparquet import geoparquet_table
from harma.geo.query import (
    TileGeometry,
    parse_bbox,
    parse_intersects,
    parse_interval,
    parse_place,
    suppress_overlaps,
)
from harma.geo.radiometry import PRESETS, check_bands, from_rgb8, to_rgb8
from harma.geo.tiling import native_tile_pixels, plan_tiles, window_footprint


# --- tiling ----------------------------------------------------------------------------------
def test_a_plan_covers_every_pixel_with_full_tiles_and_one_flush_with_each_edge():
    windows = plan_tiles(600, 300, 256, 128)
    cols, rows = sorted({w[0] for w in windows}), sorted({w[1] for w in windows})
    assert cols == [0, 128, 256, 344] and rows == [0, 44]  # 600 - 256 = 344, 300 - 256 = 44
    assert all(w[2:] == (256, 256) for w in windows) and len(windows) == 8
    covered = np.zeros((300, 600), bool)
    for c, r, w, h in windows:
        covered[r:r + h, c:c + w] = True
    assert covered.all()
    assert plan_tiles(100, 80, 256) == [(0, 0, 100, 80)]  # a scene smaller than a tile: one tile
    assert len(plan_tiles(512, 512, 256)) == 4  # stride defaults to the tile: no overlap
    with pytest.raises(ValueError, match="leave gaps"):
        plan_tiles(512, 512, 256, 300)


def test_a_target_ground_resolution_sets_the_native_pixels_a_tile_spans():
    assert native_tile_pixels(256, 0.5, 2.0) == 1024  # 256 px at 2 m = 512 m = 1024 px at 0.5 m
    assert native_tile_pixels(256, 1.0, None) == 256


def test_a_utm_footprint_lands_where_the_projection_puts_it():
    # UTM 33N: easting 500 km on the equator is the central meridian, 15 E, 0 N; 1 km of northing is
    # 1000 / 0.9996 m of meridian arc, at 110,574.27 m per degree there (WGS84: a (1 - e^2) pi / 180).
    poly = window_footprint(Affine(1, 0, 500000, 0, -1, 1000), "EPSG:32633", (0, 0, 1000, 1000))
    west, south, east, north = poly.bounds
    assert west == pytest.approx(15.0, abs=1e-9) and south == pytest.approx(0.0, abs=1e-9)
    assert north == pytest.approx(1000 / 0.9996 / 110574.27, rel=1e-5)
    assert east == pytest.approx(15 + 1000 / 0.9996 / 111319.49, rel=1e-4)  # a pi / 180 on the equator
    assert len(poly.exterior.coords) == 13  # edges densified: 3 points per side, closed


# --- radiometry ------------------------------------------------------------------------------
def test_each_preset_maps_digital_numbers_by_its_fixed_formula():
    dn = np.array([3000, 1000, 0, 6000], np.uint16).reshape(1, 1, 4).repeat(3, axis=0)
    assert to_rgb8(dn, PRESETS["generic"])[0, 0].tolist() == [255, 85, 0, 255]  # 0.3 -> 255, 0.1 -> 85
    # Sentinel-2 L2A: reflectance = DN / 10,000 - 0.1
    s2 = np.array([2000, 500, 4000], np.uint16).reshape(1, 1, 3).repeat(3, axis=0)
    assert to_rgb8(s2, PRESETS["sentinel2_l2a"])[0, 0].tolist() == [85, 0, 255]
    naip = np.array([51, 255], np.uint16).reshape(1, 1, 2).repeat(3, axis=0)
    assert to_rgb8(naip, PRESETS["naip"])[0, 0].tolist() == [51, 255]
    assert PRESETS["sentinel2_l2a"].rgb_bands == (4, 3, 2)
    valid = np.array([[True, False, True, True]])
    assert to_rgb8(dn, PRESETS["generic"], valid)[:, 0, 1].tolist() == [0, 0, 0]


def test_generated_colours_survive_the_generic_preset_exactly_and_band_counts_are_checked():
    values = np.arange(256, dtype=np.uint8).reshape(1, 1, 256).repeat(3, axis=0)
    assert np.array_equal(to_rgb8(from_rgb8(values, PRESETS["generic"]), PRESETS["generic"]), values)
    with pytest.raises(ValueError, match="3 band.*needs band 4"):
        check_bands(PRESETS["sentinel2_l2a"], 3)


# --- place and time ----------------------------------------------------------------------------
@pytest.mark.parametrize("bad, message", [
    ([1, 2, 3], "must be \\[min_lon"), ([0, 0, 200, 1], "not longitude/latitude"),
    ([0, 5, 1, 4], "north of max_lat"), ([5, 0, 4, 1], "east of max_lon"), (["a", 0, 1, 1], "4 numbers"),
])
def test_a_bad_bbox_is_refused_with_its_reason(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_bbox(bad)


def test_intervals_follow_stac_with_open_ends_and_whole_days():
    start, end = parse_interval("2025-03-01/..")
    assert start == 1740787200.0 and end is None  # 2025-03-01T00:00:00Z
    start, end = parse_interval("../2025-03-01")
    assert start is None and end == pytest.approx(1740787200.0 + 86400, abs=1e-3)  # the day's end
    assert parse_interval("2025-03-01T12:00:00Z") == (1740830400.0, 1740830400.0)
    for bad, message in (("2025-06-01/2025-01-01", "ends before it starts"), ("../..", "at least one end"),
                         ("March", "not RFC 3339"), ("a/b/c", "one '/'")):
        with pytest.raises(ValueError, match=message):
            parse_interval(bad)


def test_a_malformed_or_invalid_polygon_is_refused():
    with pytest.raises(ValueError, match="GeoJSON geometry object"):
        parse_intersects([[0, 0], [1, 1]])
    with pytest.raises(ValueError, match="not a valid GeoJSON"):
        parse_intersects({"type": "Polygon", "coordinates": [[[0, 0], [1]]]})
    with pytest.raises(ValueError, match="Self-intersection"):  # a bow tie
        parse_intersects({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]})
    with pytest.raises(ValueError, match="outside longitude/latitude"):
        parse_intersects({"type": "Point", "coordinates": [500000, 10]})


def _tiles() -> TileGeometry:
    boxes = [box(0, 0, 1, 1), box(0.5, 0, 1.5, 1), box(10, 10, 11, 11)]
    return TileGeometry.from_columns({
        "geometry": [b.wkb for b in boxes], "datetime": ["2025-01-10T10:30:00Z", "2025-04-01T00:00:00Z", ""],
        "scene": ["a", "a", "b"], "centre_lon": [b.centroid.x for b in boxes],
        "centre_lat": [b.centroid.y for b in boxes]})


def test_place_and_time_masks_select_the_tiles_by_footprint_time_and_scene():
    tiles = _tiles()
    assert tiles.mask(parse_place(bbox=[0.2, 0.2, 0.4, 0.4])).tolist() == [True, False, False]
    assert tiles.mask(parse_place(bbox=[0.6, 0.2, 0.7, 0.4])).tolist() == [True, True, False]
    tri = {"type": "Polygon", "coordinates": [[[10.5, 10.5], [12, 10.5], [12, 12], [10.5, 10.5]]]}
    assert tiles.mask(parse_place(intersects=tri)).tolist() == [False, False, True]
    assert tiles.mask(parse_place(datetime="2025-03-01/..")).tolist() == [False, True, False]  # no time: never
    assert tiles.mask(parse_place(datetime="../2025-01-10")).tolist() == [True, False, False]
    assert tiles.mask(parse_place(scene="b")).tolist() == [False, False, True]
    assert tiles.mask(parse_place(scene=["a"], bbox=[0, 0, 20, 20])).tolist() == [True, True, False]


def test_overlap_suppression_keeps_the_best_of_tiles_that_overlap_by_more_than_the_threshold():
    geoms = np.array([box(0, 0, 2, 2), box(1, 0, 3, 2), box(1, 1, 3, 3), box(5, 5, 6, 6)], dtype=object)
    # 0 and 1 overlap by half (IoU 2 / 6 = 0.33 > 0.3): 1 goes; 0 and 2 by a quarter (1 / 7): 2 stays
    assert suppress_overlaps([0, 1, 2, 3], geoms) == [0, 2, 3]
    assert suppress_overlaps([1, 0, 2, 3], geoms) == [1, 3]  # 1 first: 0 (IoU 1/3) and 2 (IoU 2/6) go
    assert suppress_overlaps([0, 1], geoms, iou=0.5) == [0, 1]


# --- GeoParquet --------------------------------------------------------------------------------
def test_geoparquet_opens_in_geopandas_in_wgs84_with_its_bbox_covering(tmp_path):
    import geopandas
    import pyarrow.parquet as pq

    boxes = [box(4.0, 51.0, 4.1, 51.1), box(5.0, 52.0, 5.2, 52.1)]
    table = geoparquet_table({"id": ["a", "b"], "geometry": [b.wkb for b in boxes], "thumbnail": [b"x", b""]})
    pq.write_table(table, tmp_path / "t.parquet")
    frame = geopandas.read_parquet(tmp_path / "t.parquet")
    assert frame.crs.equals("OGC:CRS84") and frame.crs.to_epsg() in (4326, None)
    assert frame.geometry.iloc[1].bounds == (5.0, 52.0, 5.2, 52.1) and frame["id"].tolist() == ["a", "b"]
    meta = json.loads(pq.read_schema(tmp_path / "t.parquet").metadata[b"geo"])
    assert meta["columns"]["geometry"]["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    assert meta["columns"]["geometry"]["bbox"] == [4.0, 51.0, 5.2, 52.1]
    assert pq.read_table(tmp_path / "t.parquet").column("bbox").to_pylist()[0] == \
        {"xmin": 4.0, "ymin": 51.0, "xmax": 4.1, "ymax": 51.1}
