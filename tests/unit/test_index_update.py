"""Index versions without Ray: the row arithmetic of add and delete, the FAISS structures they
update, `harma index delete` end to end on written indexes (exact, IVF-PQ, a scene index) and
`harma index versions` (harma.index.update, harma.index.versions)."""

import json

import numpy as np
import pytest
from shapely.geometry import box

from harma.cli import main
from harma.index.ann import AnnParams, build_ann
from harma.index.synthetic import clip_like_vectors
from harma.index.update import (
    Rows,
    UnknownItemsError,
    add_config,
    added_ann,
    appended,
    delete_from_index,
    drop_flags,
    kept,
    kept_ann,
)
from harma.index.versions import format_versions, list_versions, next_version, version_uri
from harma.serve.index import EmbeddingIndex, checkpoint_fingerprint, load_index, save_index


def _rows(n, dim=4, first=0, captions_per_image=2, seed=0):
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    ids = [f"img/{first + i}.png" for i in range(n)]
    images = {"id": ids, "source": ids, "image_id": list(range(first, first + n)), "split": ["test"] * n,
              "label": [None] * n, "thumbnail": [b"t%d" % (first + i) for i in range(n)]}
    c = n * captions_per_image
    captions = {"caption": [f"caption {first + i // captions_per_image}.{i % captions_per_image}" for i in range(c)],
                "image": [ids[i // captions_per_image] for i in range(c)],
                "image_row": [i // captions_per_image for i in range(c)]}
    cap_emb = np.arange(c * dim, dtype=np.float32).reshape(c, dim) + 1000 * first
    return Rows(vectors, images, cap_emb, captions)


# --- row arithmetic ----------------------------------------------------------------------------
def test_appended_rows_follow_the_parent_and_new_captions_point_past_its_images():
    parent, new = _rows(3), _rows(2, first=3, seed=1)
    rows = appended(parent, new)
    np.testing.assert_array_equal(rows.vectors, np.concatenate([parent.vectors, new.vectors]))
    assert rows.images["id"] == [f"img/{i}.png" for i in range(5)]
    # the new images' captions (2 each) now point at rows 3 and 4
    assert rows.captions["image_row"] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert rows.captions["caption"][6:] == ["caption 3.0", "caption 3.1", "caption 4.0", "caption 4.1"]
    np.testing.assert_array_equal(rows.caption_emb[6:], new.caption_emb)
    with pytest.raises(ValueError, match="columns"):
        appended(parent, Rows(new.vectors, {"id": ["x", "y"]}, None, None))
    with pytest.raises(ValueError, match="3 dims for an index of 4"):
        appended(parent, Rows(new.vectors[:, :3], new.images, None, None))


def test_kept_rows_drop_images_with_their_captions_and_renumber_the_rest():
    rows = _rows(5)
    out = kept(rows, np.array([False, True, False, True, False]))
    assert out.images["id"] == ["img/0.png", "img/2.png", "img/4.png"]
    np.testing.assert_array_equal(out.vectors, rows.vectors[[0, 2, 4]])
    assert out.captions["caption"] == ["caption 0.0", "caption 0.1", "caption 2.0", "caption 2.1",
                                       "caption 4.0", "caption 4.1"]
    assert out.captions["image_row"] == [0, 0, 1, 1, 2, 2]  # image 2 is row 1 now, image 4 row 2
    np.testing.assert_array_equal(out.caption_emb, rows.caption_emb[[0, 1, 4, 5, 8, 9]])
    with pytest.raises(ValueError, match="4 flags for 5 images"):
        kept(rows, np.zeros(4, bool))


def test_drop_flags_refuse_unknown_ids_and_an_empty_index():
    ids = ["a", "b", "c"]
    assert drop_flags(ids, None, ["b"], []).tolist() == [False, True, False]
    with pytest.raises(UnknownItemsError, match=r"not in the index: 'zz' \(nothing was written"):
        drop_flags(ids, None, ["b", "zz"], [])
    assert drop_flags(ids, None, ["b", "zz"], [], missing_ok=True).tolist() == [False, True, False]
    assert drop_flags(ids, ["s1", "s2", "s1"], [], ["s1"]).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="--scene needs a scene index"):
        drop_flags(ids, None, [], ["s1"])
    with pytest.raises(ValueError, match="deleting all 3 images would leave an empty index"):
        drop_flags(ids, None, ids, [])


# --- the FAISS structures ------------------------------------------------------------------------
def _ivf_flat(n, nlist=16):
    return AnnParams(kind="ivf_flat", nlist=nlist, nprobe=nlist, rerank=1, train_rows=min(n, 64 * nlist))


def test_vectors_added_to_a_trained_ivf_index_land_as_a_fresh_fill_of_the_same_cells_would():
    import faiss

    vectors, queries = clip_like_vectors(3000, 32, queries=20, seed=3)
    params = _ivf_flat(2000)
    parent = build_ann(vectors[:2000], params)
    twin = faiss.deserialize_index(faiss.serialize_index(parent))  # same trained cells
    added = added_ann(parent, vectors[2000:])
    twin.reset()
    twin.add(vectors)  # the same cells filled with all 3000 at once
    assert added.ntotal == 3000 and added.is_trained
    for index in (added, twin):
        index.nprobe = 4
    d1, i1 = added.search(queries, 10)
    d2, i2 = twin.search(queries, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-6)


def test_an_add_encodes_under_the_parents_emptied_cells_and_appends_as_adding_the_vectors_would():
    """`harma index add` of an IVF index: the embedding actors get `_codec_of(parent)` (the parent's
    trained cells, no vectors) and the driver appends their codes; an exact or HNSW parent has none."""
    import faiss

    from harma.index.ann import ann_to_bytes, append_codes, encode
    from harma.index.update import _codec_of

    vectors, _ = clip_like_vectors(3000, 32, seed=4)
    params = _ivf_flat(2000)
    parent = build_ann(vectors[:2000], params)
    codec = _codec_of(parent, {"ann": params.to_manifest()})
    assert codec.ntotal == 0 and parent.ntotal == 2000 and codec.is_trained
    twin = faiss.clone_index(parent)
    by_actors = append_codes(parent, encode(faiss.deserialize_index(faiss.serialize_index(codec)), vectors[2000:]))
    assert ann_to_bytes(by_actors) == ann_to_bytes(added_ann(twin, vectors[2000:]))
    assert _codec_of(None, {}) is None
    hnsw = build_ann(vectors[:100], AnnParams(kind="hnsw", hnsw_m=8, ef_search=16))
    assert _codec_of(hnsw, {"ann": {"kind": "hnsw"}}) is None


@pytest.mark.parametrize("kind", ["ivf_pq", "ivf_flat", "hnsw"])
def test_a_kept_ann_index_finds_the_kept_vectors_under_their_new_rows(kind):
    vectors, queries = clip_like_vectors(2000, 32, queries=10, seed=4)
    params = AnnParams(kind=kind, nlist=16 if kind != "hnsw" else 0, nprobe=16 if kind != "hnsw" else 0,
                       pq_m=8 if kind == "ivf_pq" else 0, hnsw_m=16 if kind == "hnsw" else 0,
                       ef_search=256 if kind == "hnsw" else 0, rerank=1, train_rows=1024 if kind != "hnsw" else 0)
    index = build_ann(vectors, params)
    drop = np.zeros(2000, bool)
    drop[::3] = True
    keep_vectors = vectors[~drop]
    out = kept_ann(index, params, keep_vectors, progress=lambda _: None)
    assert out.ntotal == len(keep_vectors)
    if kind == "ivf_flat":  # every cell probed: exactly the exact top-10 of the kept vectors
        out.nprobe = 16
        _, found = out.search(queries, 10)
        exact = np.argsort(-(queries @ keep_vectors.T), axis=1, kind="stable")[:, :10]
        np.testing.assert_array_equal(np.sort(found, axis=1), np.sort(exact, axis=1))
    else:  # each of some kept vectors is its own nearest neighbour, at its new row
        probe = keep_vectors[:50]
        if kind == "hnsw":
            out.hnsw.efSearch = 256
        _, found = out.search(probe, 1)
        assert (found[:, 0] == np.arange(50)).mean() >= 0.96


# --- versions on disk ----------------------------------------------------------------------------
def _checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.yaml").write_text("model: {}\n")
    (ckpt / "adapter.safetensors").write_bytes(b"weights")
    return str(ckpt), checkpoint_fingerprint(str(ckpt))


def _manifest(ckpt, fp, n, captions, **extra):
    return {"format": "harma-index-v1", "checkpoint_uri": ckpt, "checkpoint_fingerprint": fp["fingerprint"],
            "config_sha256": fp["config_sha256"], "adapter_sha256": fp["adapter_sha256"], "embed_dim": 32,
            "images": n, "captions": captions, "corpus_uri": "/corpus", "corpus_format": "images", "splits": [],
            "skipped": [], "thumbnails": True, "thumbnail_size": 64, "built_at": "2026-12-03T10:00:00+00:00",
            "version": 1, "parent": None, "precision": {"weights": "fp32", "validated_in": "fp32", "cost": None},
            **extra}


def test_delete_writes_the_next_version_of_an_exact_index_and_versions_lists_both(tmp_path, capsys):
    ckpt, fp = _checkpoint(tmp_path)
    rows = _rows(6, dim=32)
    root = str(tmp_path / "index")
    save_index(root, EmbeddingIndex(_manifest(ckpt, fp, 6, 12), rows.vectors, rows.images, rows.caption_emb,
                                    rows.captions))
    assert main(["index", "delete", "--index", root, "--ids", "img/1.png", "img/4.png"]) == 0
    assert "index version 2: -2 images (-4 captions) -> 4 images" in capsys.readouterr().out
    v2 = load_index(version_uri(root, 2))
    assert v2.images["id"] == ["img/0.png", "img/2.png", "img/3.png", "img/5.png"]
    np.testing.assert_array_equal(v2.image_emb, rows.vectors[[0, 2, 3, 5]])
    assert v2.captions["image_row"] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert v2.thumbnail("img/5.png") == b"t5" and v2.thumbnail("img/4.png") is None
    assert v2.manifest["parent"] == root and v2.manifest["root_uri"] == root
    assert v2.manifest["change"]["kind"] == "delete" and v2.manifest["change"]["deleted"] == 2
    assert load_index(root).size == 6  # the parent is untouched
    # deleting from version 2 writes version 3 under the same root; an unknown id writes nothing
    assert main(["index", "delete", "--index", version_uri(root, 2), "--ids", "img/0.png"]) == 0
    assert main(["index", "delete", "--index", root, "--ids", "nope.png"]) == 2
    assert "not in the index: 'nope.png'" in capsys.readouterr().err
    versions = list_versions(root)
    assert [(v["version"], v["images"], v["captions"]) for v in versions] == [(1, 6, 12), (2, 4, 8), (3, 3, 6)]
    assert versions[2]["parent"] == version_uri(root, 2)
    table = format_versions(versions)
    assert "-2 images (2 id(s))" in table and version_uri(root, 3) in table
    assert main(["index", "versions", root, "--json"]) == 0
    assert [v["version"] for v in json.loads(capsys.readouterr().out)] == [1, 2, 3]
    # a version folder holding files but no manifest (an update that died) is refused, not overwritten
    (tmp_path / "index" / "versions" / "00004").mkdir()
    (tmp_path / "index" / "versions" / "00004" / "images.npy").write_bytes(b"half")
    with pytest.raises(FileExistsError, match="00004 already holds files"):
        next_version(root)


def test_delete_from_an_ivf_pq_index_keeps_its_trained_quantiser(tmp_path):
    import faiss

    from harma.index.ann import ann_from_bytes, plan_ann

    ckpt, fp = _checkpoint(tmp_path)
    vectors, _ = clip_like_vectors(3000, 32, seed=5)
    params = plan_ann("ivf_pq", 3000, 32, 1 << 30)
    ann = build_ann(vectors, params)
    rows = _rows(3000, dim=32, captions_per_image=0)
    root = str(tmp_path / "index")
    save_index(root, EmbeddingIndex(_manifest(ckpt, fp, 3000, 0, ann=params.to_manifest()), vectors, rows.images),
               ann)
    gone = [f"img/{i}.png" for i in range(0, 3000, 10)]
    manifest = delete_from_index(root, gone, progress=lambda _: None)
    assert manifest["images"] == 2700 and manifest["ann"]["kind"] == "ivf_pq"
    v2 = load_index(version_uri(root, 2))
    stored = ann_from_bytes((tmp_path / "index" / "versions" / "00002" / "images.ann").read_bytes())
    parent = ann_from_bytes((tmp_path / "index" / "images.ann").read_bytes())
    assert stored.ntotal == 2700
    # the same coarse cells (no k-means again)
    np.testing.assert_array_equal(faiss.vector_to_array(faiss.downcast_index(stored.quantizer).codes),
                                  faiss.vector_to_array(faiss.downcast_index(parent.quantizer).codes))
    # served answers: the kept vectors found at their new rows, never a deleted id
    [(scores, hits)] = v2.ann.search(np.asarray(v2.image_emb[:1], np.float32), [10], [None])
    assert hits[0] == 0 and scores[0] == pytest.approx(1.0, abs=2e-3)
    assert not set(v2.images["id"]) & set(gone)


def test_deleting_a_scene_drops_its_tiles_and_renumbers_the_overviews(tmp_path):
    ckpt, fp = _checkpoint(tmp_path)
    n = 6
    boxes = [box(4.0 + 0.01 * i, 51.0, 4.02 + 0.01 * i, 51.02) for i in range(n)]
    scenes = ["a", "a", "b", "b", "c", "c"]
    images = {"id": [f"{s}/{i}" for i, s in enumerate(scenes)], "source": [f"{s}.tif" for s in scenes],
              "image_id": [-1] * n, "split": [""] * n, "label": [None] * n, "thumbnail": [b""] * n, "scene": scenes,
              "datetime": ["2025-02-01T10:00:00Z"] * n, "window": [[0, 0, 256, 256]] * n,
              "geometry": [b.wkb for b in boxes], "centre_lon": [b.centroid.x for b in boxes],
              "centre_lat": [b.centroid.y for b in boxes], "gsd": [1.0] * n}
    root = tmp_path / "index"
    (root / "quicklooks").mkdir(parents=True)
    listed = []
    for i, s in enumerate("abc"):
        (root / "quicklooks" / f"{i:05d}.png").write_bytes(f"png of {s}".encode())
        listed.append({"scene": s, "datetime": "2025-02-01T10:00:00Z", "quicklook": f"quicklooks/{i:05d}.png"})
    geo = {"crs": "OGC:CRS84", "scenes": 3, "tiles_nodata": 0, "scene_list": listed}
    vectors = np.eye(n, 32, dtype=np.float32)
    save_index(str(root), EmbeddingIndex(_manifest(ckpt, fp, n, 0, corpus_format="geotiff", geo=geo), vectors,
                                         images))
    with pytest.raises(UnknownItemsError, match="'z'"):
        delete_from_index(str(root), scenes=["b", "z"])
    manifest = delete_from_index(str(root), scenes=["b"], progress=lambda _: None)
    v2 = version_uri(str(root), 2)
    index = load_index(v2)
    assert index.images["scene"] == ["a", "a", "c", "c"] and index.has_footprints
    assert [s["scene"] for s in manifest["geo"]["scene_list"]] == ["a", "c"] and manifest["geo"]["scenes"] == 2
    # scene c's overview moved from position 2 to 1, inside the new version
    assert (tmp_path / "index" / "versions" / "00002" / "quicklooks" / "00001.png").read_bytes() == b"png of c"
    assert index.tiles.geometries[2].equals(boxes[4])


def test_an_added_version_embeds_as_its_parent_did(tmp_path):
    ckpt, fp = _checkpoint(tmp_path)
    manifest = _manifest(ckpt, fp, 6, 12, corpus_format="prepared", splits=["test"],
                         precision={"weights": "bf16", "validated_in": "fp32"}, ann={"kind": "ivf_pq"})
    cfg = add_config(manifest, "/out", {"splits": ["train", "test"], "actors": 2})
    assert (cfg.checkpoint_uri, cfg.precision, cfg.thumbnail_size, cfg.ann) == (ckpt, "bf16", 64, "ivf_pq")
    assert (cfg.splits, cfg.actors, cfg.captions, cfg.corpus_uri) == (["train", "test"], 2, True, "/corpus")
    with pytest.raises(ValueError, match="cannot change precision, thumbnail_size"):
        add_config(manifest, "/out", {"precision": "fp32", "thumbnail_size": 0})


def _sharded(tmp_path, sizes, capacity, ann_kind="exact", dim=32):
    """A sharded index written as the build writes one: shards/NNNNN, each a whole index of a
    slice, and the root manifest listing them (ids img/0.png ..., 2 captions an image)."""
    ckpt, fp = _checkpoint(tmp_path)
    n = sum(sizes)
    rows = _rows(n, dim=dim)
    rows.vectors /= np.linalg.norm(rows.vectors, axis=1, keepdims=True)
    params = None if ann_kind == "exact" else AnnParams(ann_kind, nlist=4, nprobe=4, train_rows=n)
    codec = None if params is None else build_ann(rows.vectors, params)
    root = tmp_path / "sharded"
    entries, first = [], 0
    for position, size in enumerate(sizes):
        drop = np.ones(n, dtype=bool)
        drop[first:first + size] = False
        part = kept(rows, drop)
        extra = {} if params is None else {"ann": params.to_manifest()}
        shard = _manifest(ckpt, fp, size, 2 * size, **extra)
        ann = None
        if codec is not None:
            import faiss

            ann = faiss.clone_index(codec)
            ann.reset()
            ann.add(part.vectors)
        save_index(str(root / f"shards/{position:05d}"),
                   EmbeddingIndex(shard, part.vectors, part.images, part.caption_emb, part.captions), ann)
        entries.append({"uri": f"shards/{position:05d}", "images": size, "captions": 2 * size, "first_row": first})
        first += size
    manifest = _manifest(ckpt, fp, n, 2 * n, shards=entries, shard_images_max=capacity,
                         **({} if params is None else {"ann": {"kind": ann_kind}}))
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root), rows


def test_delete_from_a_sharded_index_rewrites_only_the_shards_it_touches(tmp_path, capsys):
    from harma.index.shards import shard_location

    root, rows = _sharded(tmp_path, [4, 4, 4], capacity=5)
    assert main(["index", "delete", "--index", root, "--ids", "img/1.png", "img/9.png", "img/10.png"]) == 0
    v2 = version_uri(root, 2)
    assert f"-> 9 images; serve it with user_config: {{index_uri: {v2}}}" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "sharded" / "versions" / "00002" / "manifest.json").read_text())
    # shard 1 untouched: listed where version 1 keeps it; shards 0 and 2 rewritten under version 2
    assert [(e["uri"], e["images"], e["captions"], e["first_row"]) for e in manifest["shards"]] == \
        [("versions/00002/shards/00000", 3, 6, 0), ("shards/00001", 4, 8, 3), ("versions/00002/shards/00002", 2, 4, 7)]
    assert (manifest["images"], manifest["captions"], manifest["root_uri"]) == (9, 18, root)
    assert manifest["change"]["deleted"] == 3 and manifest["change"]["deleted_captions"] == 6
    shards = [load_index(shard_location(v2, manifest, p)) for p in range(3)]
    assert [s.images["id"] for s in shards] == [["img/0.png", "img/2.png", "img/3.png"],
                                               [f"img/{i}.png" for i in range(4, 8)], ["img/8.png", "img/11.png"]]
    np.testing.assert_array_equal(shards[2].image_emb, rows.vectors[[8, 11]])
    assert shards[2].captions["image_row"] == [0, 0, 1, 1]
    assert not (tmp_path / "sharded" / "versions" / "00002" / "shards" / "00001").exists()
    # version 3 from version 2: shards of both earlier versions listed, the emptied shard left out
    assert main(["index", "delete", "--index", v2, "--ids", "img/8.png", "img/11.png", "img/0.png"]) == 0
    out = capsys.readouterr().out
    assert "shard 3/3: all 2 images deleted, the shard is left out; serving this version needs the application " \
           "deployed again" in out
    assert f"its shard count changed (3 -> 2): serve it by deploying the application again with args.index_uri: " \
           f"{version_uri(root, 3)}" in out
    v3 = json.loads((tmp_path / "sharded" / "versions" / "00003" / "manifest.json").read_text())
    assert [(e["uri"], e["images"]) for e in v3["shards"]] == [("versions/00003/shards/00000", 2),
                                                              ("shards/00001", 4)]
    assert [(v["version"], v["images"]) for v in list_versions(root)] == [(1, 12), (2, 9), (3, 6)]
    assert main(["index", "delete", "--index", root, "--ids", "img/99.png"]) == 2
    assert "not in the index: 'img/99.png'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is an index of 3 shards .*shards/00000, ...\\) or serve the whole"):
        load_index(root)


def test_an_add_fills_the_shards_with_room_first_then_writes_new_shards(tmp_path):
    """`_added_shards` (what `harma index add` does with the embedded new items of a sharded
    index): an IVF index's new vectors land in its shards' trained cells, found at their rows."""
    from harma.index.shards import shard_location
    from harma.index.update import Part, _added_shards, _parent

    root, rows = _sharded(tmp_path, [5, 3, 4], capacity=5, ann_kind="ivf_flat")
    new = _rows(6, dim=32, first=100, seed=3)
    new.vectors /= np.linalg.norm(new.vectors, axis=1, keepdims=True)
    _, manifest, parts = _parent(root)
    assert [p.size for p in parts] == [5, 3, 4]
    lines = []
    entries = _added_shards(parts, manifest, root, 2, new, None, lines.append)
    # room: shard 1 takes 2 (3 -> 5), shard 2 takes 1 (4 -> 5), shard 0 none; 3 left: a new shard
    assert [(e["uri"], e["images"], e["first_row"]) for e in entries] == [
        ("shards/00000", 5, 0), ("versions/00002/shards/00001", 5, 5), ("versions/00002/shards/00002", 5, 10),
        ("versions/00002/shards/00003", 3, 15)]
    assert any("deployed again (its shard count changed)" in line for line in lines)
    version = {**manifest, "root_uri": root, "shards": entries}
    shards = [load_index(shard_location(version_uri(root, 2), version, p)) for p in range(4)]
    assert shards[1].images["id"] == ["img/5.png", "img/6.png", "img/7.png", "img/100.png", "img/101.png"]
    assert shards[2].images["id"][-1] == "img/102.png"
    assert shards[3].images["id"] == ["img/103.png", "img/104.png", "img/105.png"]
    assert shards[1].captions["image_row"][-4:] == [3, 3, 4, 4] and shards[3].caption_count == 6
    for shard, wanted in ((shards[1], [3, 4]), (shards[3], [0, 1, 2])):
        for row in wanted:  # each new vector is its own nearest neighbour in the shard's FAISS index
            [(scores, hits)] = shard.ann.search(np.asarray(shard.image_emb[row:row + 1], np.float32), [1], [None])
            assert hits[0] == row and scores[0] == pytest.approx(1.0, abs=2e-3)
    assert Part(shard_location(version_uri(root, 2), version, 3)).manifest["version"] == 2
