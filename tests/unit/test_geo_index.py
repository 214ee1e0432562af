"""A scene index without Ray: footprints saved as GeoParquet and loaded back, place masks, hits
with geometry, and the API's place and time parameters (harma.serve.index, harma.serve.api)."""

import geopandas
import numpy as np
import pytest
from shapely.geometry import box

from harma.geo.query import parse_place
from harma.serve.api import ApiError, Limits, parse_image_params, parse_text_query, wants_geojson
from harma.serve.index import EmbeddingIndex, load_index, save_index

LIMITS = Limits(max_top_k=20, max_text_chars=80, max_batch_queries=3)


def _scene_index(n=6) -> EmbeddingIndex:
    boxes = [box(4.0 + 0.01 * i, 51.0, 4.02 + 0.01 * i, 51.02) for i in range(n)]  # half-overlapping in a row
    emb = np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)
    images = {"id": [f"s/{i}" for i in range(n)], "source": ["s.tif"] * n, "image_id": [-1] * n, "split": [""] * n,
              "label": [None] * n, "thumbnail": [b""] * n, "scene": ["s"] * (n - 1) + ["t"],
              "datetime": ["2025-02-01T10:00:00Z"] * (n - 1) + ["2025-07-01T10:00:00Z"],
              "window": [[128 * i, 0, 256, 256] for i in range(n)], "geometry": [b.wkb for b in boxes],
              "centre_lon": [b.centroid.x for b in boxes], "centre_lat": [b.centroid.y for b in boxes],
              "gsd": [1.0] * n}
    manifest = {"format": "harma-index-v1", "checkpoint_fingerprint": "f", "images": n, "captions": 0}
    return EmbeddingIndex(manifest, emb / np.linalg.norm(emb, axis=1, keepdims=True), images)


def test_a_scene_index_round_trips_as_geoparquet_that_geopandas_opens(tmp_path):
    index = _scene_index()
    save_index(str(tmp_path / "idx"), index)
    frame = geopandas.read_parquet(tmp_path / "idx" / "images.parquet")
    assert frame.crs.equals("OGC:CRS84") and frame.geometry.iloc[2].bounds == pytest.approx((4.02, 51.0, 4.04, 51.02))
    assert frame["scene"].tolist() == index.images["scene"] and frame["window"].iloc[1].tolist() == [128, 0, 256, 256]
    loaded = load_index(str(tmp_path / "idx"))
    assert loaded.has_footprints and "bbox" not in loaded.images
    hit = loaded.image_result(2, 0.5)
    assert hit["centre"] == pytest.approx([4.03, 51.01]) and hit["geometry"]["type"] == "Polygon"
    assert hit["metadata"]["scene"] == "s" and hit["metadata"]["datetime"] == "2025-02-01T10:00:00Z"


def test_place_masks_of_a_scene_index_and_a_refusal_on_an_index_without_footprints():
    index = _scene_index()
    assert index.place_mask(None) is None
    mask = index.place_mask(parse_place(bbox=[4.045, 51.0, 4.046, 51.01], datetime="../2025-03-01"))
    assert mask.tolist() == [False, False, False, True, True, False]  # tiles 3, 4 cover lon 4.045; 5 is July
    plain = EmbeddingIndex({"format": "harma-index-v1", "checkpoint_fingerprint": "f"}, index.image_emb,
                           {k: index.images[k] for k in ("id", "source", "image_id", "split", "label", "thumbnail")})
    with pytest.raises(ValueError, match="no footprints"):
        plain.place_mask(parse_place(bbox=[0, 0, 1, 1]))


@pytest.mark.parametrize("extra, message", [
    ({"bbox": [4, 52, 5, 51]}, "north of max_lat"), ({"bbox": [0, 0, 1]}, "min_lon"),
    ({"datetime": "2025-06-01/2025-01-01"}, "ends before it starts"),
    ({"intersects": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}}, "Self-intersection"),
    ({"scene": []}, "empty list"),
])
def test_bad_place_or_time_in_a_query_is_a_422_with_its_reason(extra, message):
    import json

    with pytest.raises(ApiError) as err:
        parse_text_query(json.dumps({"text": "tanks", **extra}).encode(), "application/json", LIMITS)
    assert err.value.status == 422 and message in err.value.message


def test_image_upload_parameters_carry_place_time_and_format():
    query = parse_image_params({"k": "3", "bbox": "4.0,51.0,4.1,51.1", "datetime": "2025-01-01/..", "scene": "s",
                                "nms": "false", "format": "geojson"}, LIMITS)
    assert query.bbox == [4.0, 51.0, 4.1, 51.1] and query.scene == "s" and query.nms is False
    assert wants_geojson({"format": "geojson"}, None) and wants_geojson({}, "application/geo+json")
    assert not wants_geojson({}, "application/json")
    with pytest.raises(ApiError, match="format must be json or geojson"):
        wants_geojson({"format": "kml"}, None)
    with pytest.raises(ApiError, match="bbox must be"):
        parse_image_params({"bbox": "4,fifty"}, LIMITS)


class _TwoClassEncoder:
    """'tanks' points along e0, 'ships' along e1."""

    def encode_texts(self, texts):
        import torch

        return torch.tensor([[1.0, 0.0] if t == "tanks" else [0.0, 1.0] for t in texts])


def test_place_search_scores_count_tiles_holding_objects_after_suppression():
    from shapely.geometry import Point

    from harma.geo.evaluate import place_search_scores

    index = _scene_index()
    vectors = np.array([[1, 0], [0.9, 0.1], [0.8, 0.2], [0, 1], [0.1, 0.9], [0.5, 0.5]], np.float32)
    index.image_emb = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    truth = [{"class": "tanks", "scene": "s", "centre": Point(4.005, 51.01)},   # in tile 0
             {"class": "tanks", "scene": "s", "centre": Point(4.035, 51.01)},   # in tiles 2, 3
             {"class": "tanks", "scene": "t", "centre": Point(4.065, 51.01)},   # in tile 5
             {"class": "ships", "scene": "s", "centre": Point(4.045, 51.01)}]   # in tiles 3, 4
    # tanks: 0, 1, 2, 5, 4, 3 by score; 1 overlaps 0 by IoU 1/3 (> 0.3) and goes: top 2 = tiles 0, 2,
    # both holding a tank (P@2 1.0), 2 of the 3 tanks found. ships: 3, (4 goes), 5: one of 2 holds it.
    result = place_search_scores(index, _TwoClassEncoder(), truth, k=2)
    assert result["classes"]["tanks"] == {"precision_at_k": 1.0, "recall": pytest.approx(2 / 3), "objects": 3,
                                          "tiles_returned": 2}
    assert result["classes"]["ships"]["precision_at_k"] == 0.5 and result["classes"]["ships"]["recall"] == 1.0
    assert result["mean_precision_at_k"] == 0.75 and result["mean_recall"] == pytest.approx(5 / 6)
    # within scene "s" only: tile 5 (scene t) is out, and so is the tank in it
    inside = place_search_scores(index, _TwoClassEncoder(), truth, k=2, place=parse_place(scene="s"))
    assert inside["classes"]["tanks"]["objects"] == 2 and inside["classes"]["tanks"]["recall"] == 1.0
    assert inside["tiles_searched"] == 5
