"""A GeoTIFF scene archive on the S3 store, indexed with its footprints and searched by place and
time over HTTP (harma.geo, `harma index build` with corpus_format geotiff, the serve API)."""

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from harma.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_serve import shipped_local_service  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ROOT = "s3://geo-archive"
BBOX = None  # set from the generated scene (the west half of the first one)


@pytest.fixture(scope="module")
def archive(ray_cluster, s3_server, tmp_path_factory, tiny_model_config):
    """3 generated scenes written straight to S3, a STAC file naming them plus a missing and a
    truncated scene, and a (random-weight) checkpoint."""
    from harma import storage
    from harma.config import PlatformConfig
    from harma.geo.scenes import synthesize_scenes
    from harma.model.checkpoint import save_checkpoint
    from harma.model.harma import build_model

    s3_server.create_bucket("geo-archive")
    synthesize_scenes(f"{ROOT}/scenes", 3, seed=5, size=768)
    items = json.loads(storage.read_bytes(f"{ROOT}/scenes/stac/items.json"))
    good = storage.read_bytes(f"{ROOT}/scenes/scenes/scene-000-rotterdam.tif")
    # A COG holds its overviews before the full resolution: cut inside the smallest overview, so
    # even the tiny model's decimated reads (192 px -> 48 px) reach missing bytes.
    storage.write_bytes(f"{ROOT}/scenes/scenes/cut.tif", good[: len(good) // 40])
    extra = []
    for name, href in (("missing", "../scenes/missing.tif"), ("cut", "../scenes/cut.tif")):
        item = json.loads(json.dumps(items["features"][0]))
        item["id"] = name
        item["assets"]["image"]["href"] = href
        extra.append(item)
    items["features"] += extra
    storage.write_bytes(f"{ROOT}/scenes/stac/with-bad.json", json.dumps(items).encode())
    cfg = PlatformConfig(model=tiny_model_config)
    ckpt = str(tmp_path_factory.mktemp("geo") / "ckpt")
    save_checkpoint(ckpt, build_model(cfg.model, seed=0), cfg, {})
    return {"ckpt": ckpt, "items": items}


def _build(archive, *overrides) -> int:
    return main(["index", "build", "--config", str(REPO / "jobs" / "index_scenes.yaml"),
                 f"index.checkpoint_uri={archive['ckpt']}", f"index.corpus_uri={ROOT}/scenes/stac/with-bad.json",
                 "index.geo.tile_size=192", "index.geo.tile_stride=96", *overrides])


@pytest.mark.ray
def test_too_many_bad_scenes_stop_the_build_with_each_reason_and_write_nothing(archive, capsys):
    from harma import storage

    assert _build(archive, f"index.output_uri={ROOT}/index-refused") != 0  # 2 of 5 bad > 0.1
    message = capsys.readouterr().err
    assert "2 of 5 scenes unreadable" in message and "nothing was written" in message
    assert "missing.tif" in message and "cut.tif: read failed" in message
    assert not storage.exists(f"{ROOT}/index-refused/manifest.json")


@pytest.fixture(scope="module")
def scene_index(archive):
    from harma.serve.index import read_manifest

    assert _build(archive, f"index.output_uri={ROOT}/index", "index.geo.max_bad_fraction=0.5") == 0
    return read_manifest(f"{ROOT}/index")


@pytest.mark.ray
def test_a_scene_index_from_s3_opens_in_geopandas_with_every_tile_footprinted(scene_index):
    import geopandas
    from shapely.geometry import shape

    from harma import storage

    skipped = {s["scene"]: s["reason"] for s in scene_index["skipped"]}
    assert set(skipped) == {"missing", "cut"}
    assert skipped["missing"].startswith("cannot open") and skipped["cut"].startswith("read failed")
    assert scene_index["geo"]["scenes"] == 3 and scene_index["corpus_format"] == "geotiff"
    frame = geopandas.read_parquet(io.BytesIO(storage.read_bytes(f"{ROOT}/index/images.parquet")))
    assert frame.crs.equals("OGC:CRS84")
    # 768 px, tiles of 192 every 96: 7 x 7 per scene, less those mostly nodata
    assert len(frame) + scene_index["geo"]["tiles_nodata"] == 3 * 49 == scene_index["images"] + scene_index["geo"]["tiles_nodata"]
    items = {i["id"]: shape(i["geometry"]) for i in json.loads(storage.read_bytes(f"{ROOT}/scenes/stac/items.json"))["features"]}
    assert all(items[s].buffer(1e-7).contains(g) for s, g in zip(frame["scene"], frame.geometry, strict=True))


@pytest.mark.ray
def test_new_scenes_are_added_to_a_scene_index_on_s3_without_embedding_the_old_ones(archive, scene_index):
    """An IVF index of two scenes (its cells trained on a sample of their tiles streamed through the
    embedding actors, which then encode every tile), then `harma index add` from the STAC file of
    all three: only the third scene's tiles are embedded (as the full build embedded them) and
    encoded by the actors under the parent's cells, the overviews of all three are in the new
    version, and `harma index versions` lists both on S3."""
    from harma import storage
    from harma.index.ann import ann_from_bytes
    from harma.index.versions import list_versions, version_uri
    from harma.serve.index import load_index

    items = archive["items"]
    two = {**items, "features": items["features"][:2]}
    storage.write_bytes(f"{ROOT}/scenes/stac/two.json", json.dumps(two).encode())
    root = f"{ROOT}/index-two"
    assert main(["index", "build", "--config", str(REPO / "jobs" / "index_scenes.yaml"),
                 f"index.checkpoint_uri={archive['ckpt']}", f"index.corpus_uri={ROOT}/scenes/stac/two.json",
                 "index.geo.tile_size=192", "index.geo.tile_stride=96", f"index.output_uri={root}",
                 "index.ann=ivf_flat", "index.ann_params.nlist=2", "index.ann_params.train_rows=16"]) == 0
    assert main(["index", "add", "--index", root, "--corpus", f"{ROOT}/scenes/stac/items.json"]) == 0
    v1, v2, full = load_index(root), load_index(version_uri(root, 2)), load_index(f"{ROOT}/index")
    ann = v1.manifest["ann"]
    assert (ann["kind"], ann["trained_on"], ann["encoded_by"]) == ("ivf_flat", "streamed sample", "embedding actors")
    assert ann["planned_for"] >= v1.size > ann["sample_rows"] >= 2  # tiles counted from the headers; a sample
    for uri, index in ((root, v1), (version_uri(root, 2), v2)):  # row i of FAISS's lists is tile i's vector
        faiss_index = ann_from_bytes(storage.read_bytes(storage.join(uri, "images.ann")))
        faiss_index.make_direct_map()
        np.testing.assert_allclose(faiss_index.reconstruct_n(0, index.size), np.asarray(index.image_emb, np.float32),
                                   atol=1e-3)
    third = items["features"][2]["id"]
    assert third not in v1.images["scene"] and v2.manifest["change"]["added"] == v2.images["scene"].count(third)
    assert v2.images["scene"].count(third) == full.images["scene"].count(third) > 0
    assert v2.size == full.size and v2.manifest["geo"]["scenes"] == 3
    np.testing.assert_array_equal(v2.image_emb[:v1.size], v1.image_emb)
    for row in range(v1.size, v2.size):
        np.testing.assert_allclose(v2.image_emb[row], full.image_emb[full.row_of[v2.images["id"][row]]],
                                   atol=1e-3)  # stored as fp16 in an IVF index: 2^-11 at most
    listed = v2.manifest["geo"]["scene_list"]
    assert [s["scene"] for s in listed] == [f["id"] for f in items["features"][:3]]  # (then the bad ones)
    for position, scene in enumerate(listed):  # each overview in the version, as the full build made it
        want = next(s for s in full.manifest["geo"]["scene_list"] if s["scene"] == scene["scene"])
        assert storage.read_bytes(storage.join(version_uri(root, 2), f"quicklooks/{position:05d}.png")) == \
            storage.read_bytes(storage.join(f"{ROOT}/index", want["quicklook"]))
    assert [(v["version"], v["images"]) for v in list_versions(root)] == [(1, v1.size), (2, v2.size)]
    assert v2.tiles.geometries[v1.size].equals(full.tiles.geometries[full.row_of[v2.images["id"][v1.size]]])


@pytest.mark.ray
def test_place_and_time_search_over_http_answers_geojson_like_brute_force(archive, scene_index):
    import shapely
    from shapely.geometry import box, shape

    from harma.serve.encoder import QueryEncoder
    from harma.serve.index import load_index

    index = load_index(f"{ROOT}/index")
    first = [i for i in archive["items"]["features"] if i["id"] == "scene-000-rotterdam"][0]
    w, s, e, n = shape(first["geometry"]).bounds
    bbox = [w, s, (w + e) / 2, n]  # the western half of the first scene
    text = "three storage tanks next to a river"
    query = {"text": text, "k": 5, "bbox": bbox, "datetime": "2025-01-01/2025-02-28"}
    with shipped_local_service(archive["ckpt"], f"{ROOT}/index") as base:
        url = base + "v1/text-to-images"
        geo = requests.post(url, json=query, headers={"Accept": "application/geo+json"}, timeout=60)
        plain = requests.post(url + "?format=json", json={**query, "nms": False}, timeout=60).json()
        later = requests.post(url, json={**query, "datetime": "2026-01-01/.."}, timeout=60).json()
        inverted = requests.post(url, json={**query, "bbox": [e, s, w, n]}, timeout=60)
        backwards = requests.post(url, json={**query, "datetime": "2025-03-01/2025-01-01"}, timeout=60)
        info = requests.get(base + "v1/info", timeout=60).json()
        overview = requests.get(base + info["index"]["scenes"][0]["quicklook"], timeout=60)
        missing = requests.get(base + "v1/quicklooks/99", timeout=60)
        page = _page_session(base, info)
    assert geo.status_code == 200 and geo.headers["content-type"].startswith("application/geo+json")
    collection = geo.json()
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 5
    shapes = [shape(f["geometry"]) for f in collection["features"]]
    assert all(g.intersects(box(*bbox)) for g in shapes)
    assert all(f["properties"]["metadata"]["scene"] == "scene-000-rotterdam" for f in collection["features"])
    for i, a in enumerate(shapes):  # suppression: no two hits overlap by more than IoU 0.3
        for b in shapes[i + 1:]:
            assert a.intersection(b).area <= 0.3 * a.union(b).area + 1e-15
    # Without suppression: the top 5 of a brute-force scoring of the tiles in the box and interval.
    encoder = QueryEncoder(archive["ckpt"], "cpu", trace=False)
    scores = index.image_emb @ encoder.encode_texts([text]).cpu().numpy()[0]
    inside = shapely.intersects(index.tiles.geometries, box(*bbox)) & (index.tiles.times <= 1740787199.999)
    expected = [index.images["id"][r] for r in np.argsort(-np.where(inside, scores, -np.inf))[:5]]
    assert [h["id"] for h in plain["results"]] == expected
    assert all(h["centre"] and h["geometry"] for h in plain["results"])
    assert later["results"] == []  # nothing acquired then
    assert inverted.status_code == 422 and "east of max_lon" in inverted.json()["error"]["message"]
    assert backwards.status_code == 422 and "ends before it starts" in backwards.json()["error"]["message"]
    # overviews made at index time, one per indexed scene, with the corners the page maps drags with
    assert [sc["scene"] for sc in info["index"]["scenes"]] == sorted(
        f["id"] for f in archive["items"]["features"] if f["id"] not in ("missing", "cut"))
    assert overview.headers["content-type"] == "image/png" and overview.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert missing.status_code == 404
    if page is None:
        return  # no chromium on this machine: the page part is skipped
    # the page: hits drawn on the overviews, a dragged bbox as lon/lat, the hits as GeoJSON
    assert page["drawn"] == 5 and all(c for c in page["coords"])
    west, south, east, north = page["bbox"]
    assert w <= west < east <= e and s <= south < north <= n  # inside the first scene's bounds
    assert page["dragged_hits_in_bbox"] and page["geojson"]["type"] == "FeatureCollection"
    assert len(page["geojson"]["features"]) == 5


def _page_session(base: str, info: dict) -> dict | None:
    """Drive the web page in headless Chromium: search, drag a bbox on the first overview, search
    again, download the hits; returns what it saw (None without chromium)."""
    import shutil

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return None
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from shapely.geometry import box, shape
    from test_serve import ARTIFACTS, headless_chromium

    with headless_chromium() as browser:
        browser.get(base)
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#scenes canvas")) == len(info["index"]["scenes"]))
        browser.find_element(By.ID, "k").clear()
        browser.find_element(By.ID, "k").send_keys("5")
        browser.find_element(By.ID, "q").send_keys("storage tanks next to a river")
        browser.find_element(By.ID, "search").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .hit")) == 5)
        drawn = browser.execute_script(
            "return [...document.querySelectorAll('#scenes canvas')].reduce((n, c) => n + Number(c.dataset.hits || 0), 0)")
        coords = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .coords")]
        canvas = browser.find_elements(By.CSS_SELECTOR, "#scenes canvas")[0]
        size = canvas.size
        ActionChains(browser).move_to_element_with_offset(canvas, -size["width"] // 4, -size["height"] // 4) \
            .click_and_hold().move_by_offset(size["width"] // 3, size["height"] // 3).release().perform()
        wait.until(lambda b: b.find_element(By.ID, "bbox").get_attribute("value"))
        bbox = [float(v) for v in browser.find_element(By.ID, "bbox").get_attribute("value").split(",")]
        browser.find_element(By.ID, "search").click()
        wait.until(lambda b: "images for" in b.find_element(By.ID, "status").text)
        hits = browser.execute_script("return [...document.querySelectorAll('#results .hit')].map(h => h.dataset.id)")
        browser.save_screenshot(str(ARTIFACTS / "serve_page_scenes.png"))
        browser.find_element(By.ID, "download").click()
        wait.until(lambda b: b.execute_script("return window.lastGeoJSON || null"))
        geojson = browser.execute_script("return window.lastGeoJSON")
    inside = all(shape(f["geometry"]).intersects(box(*bbox)) for f in geojson["features"])
    return {"drawn": drawn, "coords": coords, "bbox": bbox, "geojson": geojson,
            "dragged_hits_in_bbox": bool(hits) and inside}
