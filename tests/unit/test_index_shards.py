"""Sharded indexes without Ray: the shard plan, the merge of the shards' answers, and the answers
of 3 shards merged against the same index unsharded (exact, filtered, captions, a scene index
with suppression of overlapping tiles) (harma.index.shards, harma.serve.search)."""

import numpy as np
import pytest
import torch
from shapely.geometry import box

from harma.index.shards import merge_hits, place_new_rows, plan_shards, shard_location
from harma.index.update import Rows, kept
from harma.serve.index import EmbeddingIndex
from harma.serve.search import Job, Loaded, hits_of, search_jobs, suppress_hits, wants_suppression


def test_the_plan_is_the_fewest_near_equal_slices_within_the_bound():
    # 10 images of 100 bytes, at most 400 a shard: 4 a shard at most -> 3 shards of 3, 4, 3
    assert plan_shards(10, 100, 400) == [(0, 3), (3, 7), (7, 10)]
    assert plan_shards(10, 100, 1000) == [(0, 10)]  # fits: one
    assert plan_shards(10, 100, None) == [(0, 10)]
    assert plan_shards(7, 2048, 2048) == [(i, i + 1) for i in range(7)]
    with pytest.raises(ValueError, match="at least one image"):
        plan_shards(0, 100, 400)


def test_merge_takes_the_k_best_and_keeps_shard_order_on_ties():
    a = [{"id": "a1", "score": 0.9}, {"id": "a2", "score": 0.5}]
    b = [{"id": "b1", "score": 0.9}, {"id": "b2", "score": 0.7}]
    c: list = []
    assert [h["id"] for h in merge_hits([a, b, c], 3)] == ["a1", "b1", "b2"]
    assert [h["id"] for h in merge_hits([a, b, c], 10)] == ["a1", "b1", "b2", "a2"]


def _unit(n, dim, seed):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _whole(n=60, dim=16, geo=False):
    ids = [f"img/{i:03d}" for i in range(n)]
    images = {"id": ids, "source": ids, "image_id": list(range(n)), "split": ["test" if i % 3 else "train" for i in range(n)],
              "label": ["port" if i % 4 == 0 else "farm" for i in range(n)], "thumbnail": [b"t"] * n}
    captions = {"caption": [f"c{i}" for i in range(2 * n)], "image": [ids[i // 2] for i in range(2 * n)],
                "image_row": [i // 2 for i in range(2 * n)]}
    if geo:  # tiles in rows of 6, each overlapping its neighbour by 4/5 (IoU 2/3)
        boxes = [box(0.004 * (i % 6), 0.02 * (i // 6), 0.004 * (i % 6) + 0.02, 0.02 * (i // 6) + 0.02) for i in range(n)]
        images.update(scene=["s"] * n, datetime=["2025-01-01T00:00:00Z"] * n, window=[[0, 0, 1, 1]] * n,
                      geometry=[b.wkb for b in boxes], centre_lon=[b.centroid.x for b in boxes],
                      centre_lat=[b.centroid.y for b in boxes], gsd=[1.0] * n)
        captions = None
    return Rows(_unit(n, dim, 0), images, None if geo else _unit(2 * n, dim, 1), captions)


def _loaded(rows: Rows) -> Loaded:
    manifest = {"format": "harma-index-v1", "checkpoint_fingerprint": "f", "images": len(rows.vectors)}
    index = EmbeddingIndex(manifest, rows.vectors, rows.images, rows.caption_emb, rows.captions)
    galleries = {"images": torch.from_numpy(rows.vectors)}
    if rows.caption_emb is not None:
        galleries["captions"] = torch.from_numpy(rows.caption_emb)
    return Loaded("mem", index, galleries)


def _shards(rows: Rows, slices) -> list[Loaded]:
    out = []
    for first, end in slices:
        drop = np.ones(len(rows.vectors), bool)
        drop[first:end] = False
        out.append(_loaded(kept(rows, drop)))
    return out


def _answers(loaded: Loaded, target, emb, jobs, suppress=True):
    found = search_jobs(loaded, target, torch.from_numpy(emb), jobs, suppress=suppress)
    return [hits_of(loaded.index, j, *f) for j, f in zip(jobs, found, strict=True)]


def _sharded(shards, target, emb, jobs):
    """What the ingress does with the shards' answers (harma.serve.app: _sharded_answers)."""
    from harma.geo.query import NMS_POOL

    per_shard = [_answers(s, target, emb, jobs, suppress=False) for s in shards]
    out = []
    for n, job in enumerate(jobs):
        pooled = wants_suppression("geometry" in shards[0].index.images, job)
        merged = merge_hits([p[n] for p in per_shard], job.k * NMS_POOL if pooled else job.k)
        out.append(suppress_hits(merged, job.k) if pooled else merged)
    return out


def test_three_shards_merged_answer_as_the_index_unsharded():
    rows = _whole()
    whole, shards = _loaded(rows), _shards(rows, plan_shards(60, 100, 2100))
    assert [s.index.size for s in shards] == [20, 20, 20]
    emb = _unit(4, 16, 2)
    image_jobs = [Job("images", 10, {}, False), Job("images", 12, {"split": "test", "label": "port"}, True),
                  Job("images", 60, {}, False), Job("images", 5, {"label": "none-such"}, False)]
    caption_jobs = [Job("captions", 12, {}, False), Job("captions", 4, {"split": "train"}, False)]
    for target, jobs, queries in (("images", image_jobs, emb), ("captions", caption_jobs, emb[:2])):
        want, got = _answers(whole, target, queries, jobs), _sharded(shards, target, queries, jobs)
        for w, g in zip(want, got, strict=True):
            assert [h.get("id", h.get("caption")) for h in g] == [h.get("id", h.get("caption")) for h in w]
            np.testing.assert_allclose([h["score"] for h in g], [h["score"] for h in w], rtol=1e-6)
    assert len(_sharded(shards, "images", emb[1:2], image_jobs[1:2])[0]) == 10  # 10 test ports in all (i % 4 == 0, i % 3 != 0)
    assert _sharded(shards, "images", emb[3:], image_jobs[3:])[0] == []


def test_three_shards_of_a_scene_index_suppress_overlaps_as_the_whole_does():
    rows = _whole(geo=True)
    whole, shards = _loaded(rows), _shards(rows, [(0, 17), (17, 41), (41, 60)])
    emb = _unit(3, 16, 5)
    jobs = [Job("images", 5, {}, False), Job("images", 8, {}, False, nms=False), Job("images", 3, {}, False)]
    want, got = _answers(whole, "images", emb, jobs), _sharded(shards, "images", emb, jobs)
    for w, g in zip(want, got, strict=True):
        assert [h["id"] for h in g] == [h["id"] for h in w]
    assert len(got[0]) == 5 and got[0] != _answers(whole, "images", emb, jobs, suppress=False)[0][:5]


def test_an_ivf_index_is_made_from_the_actors_codes_and_its_shards_share_one_codec(monkeypatch):
    """harma.serve.build._approximate without Ray: an embedded corpus with the actors' codes gives
    the index its codec makes from the vectors; without codes (a corpus too small for a sample
    pass) the driver trains and encodes; shards are slices of the one index (the same cells)."""
    import faiss

    from harma.config import IndexConfig
    from harma.index.ann import ann_to_bytes, encode, plan_ann, trained_codec
    from harma.serve.build import EmbeddedCorpus, _approximate

    vectors = _unit(3000, 32, 5)
    meta = {"id": [str(i) for i in range(3000)]}
    cfg = IndexConfig(checkpoint_uri="c", corpus_uri="x", output_uri="o", ann="ivf_pq",
                      ann_params={"nlist": 8, "pq_m": 8, "train_rows": 500})
    params = plan_ann("ivf_pq", 3000, 32, 1 << 30, nlist=8, pq_m=8, train_rows=500)
    codec = trained_codec(vectors[:1000], params)
    record = {**params.to_manifest(), "trained_on": "streamed sample", "sample_rows": 1000,
              "encoded_by": "embedding actors"}
    with_codes = EmbeddedCorpus(vectors, meta, None, None, [], [], codes=encode(codec, vectors), codec=codec,
                                ann=record)
    manifest: dict = {}
    [whole] = _approximate(cfg, with_codes, [(0, 3000)], manifest, lambda _: None)
    reference = faiss.clone_index(codec)
    reference.add(vectors)
    assert ann_to_bytes(whole) == ann_to_bytes(reference)
    assert manifest["ann"]["trained_on"] == "streamed sample" and manifest["ann"]["encoded_by"] == "embedding actors"
    assert (manifest["ann"]["kind"], manifest["ann"]["nlist"], manifest["ann"]["pq_m"]) == ("ivf_pq", 8, 8)

    parts = _approximate(cfg, with_codes, [(0, 1000), (1000, 3000)], {}, lambda _: None)
    assert [p.ntotal for p in parts] == [1000, 2000]
    centroids = [faiss.rev_swig_ptr(faiss.downcast_index(faiss.extract_index_ivf(p).quantizer).get_xb(), 8 * 32)
                 for p in parts]
    np.testing.assert_array_equal(centroids[0], centroids[1])  # one codec: the same cells in every shard
    second = faiss.clone_index(codec)
    second.add(vectors[1000:])
    assert ann_to_bytes(parts[1]) == ann_to_bytes(second)

    manifest = {}
    without = EmbeddedCorpus(vectors, meta, None, None, [], [])
    [driver] = _approximate(cfg, without, [(0, 3000)], manifest, lambda _: None)
    assert driver.ntotal == 3000 and manifest["ann"]["trained_on"] == "embedded corpus"
    assert manifest["ann"]["encoded_by"] == "driver" and manifest["ann"]["trained_rows"] == 500
    # the driver adds a chunk at a time to each slice's copy of its codec: chunks of 700 rows cross the
    # slice boundary at 1000, yet each shard holds what adding its own vectors gives, byte for byte
    from harma.index import ann as ann_module
    from harma.serve.build import SAMPLE_SEED

    monkeypatch.setattr(ann_module, "ADD_CHUNK", 700)
    chunked = _approximate(cfg, without, [(0, 1000), (1000, 3000)], {}, lambda _: None)
    driver_codec = trained_codec(vectors, params, seed=SAMPLE_SEED)
    for part, (first, end) in zip(chunked, [(0, 1000), (1000, 3000)], strict=True):
        expected = faiss.clone_index(driver_codec)
        expected.add(vectors[first:end])
        assert ann_to_bytes(part) == ann_to_bytes(expected)


def test_new_rows_go_to_the_shards_with_most_room_first():
    # room 0, 2, 1 (capacity 5): 2 to shard 1, 1 to shard 2, 3 left for new shards
    assert place_new_rows([5, 3, 4], 5, 6) == ([0, 2, 1], 3)
    # ties in room: the earlier shard first; no more than asked
    assert place_new_rows([2, 2, 4], 5, 4) == ([3, 1, 0], 0)
    # a shard over its capacity (a bound lowered since) takes nothing
    assert place_new_rows([7, 1], 5, 3) == ([0, 3], 0)
    # no capacity recorded: all into the last shard
    assert place_new_rows([5, 3], None, 9) == ([0, 9], 0)
    with pytest.raises(ValueError, match="cannot place 3 images into 0 shards"):
        place_new_rows([], 5, 3)


def test_a_shard_is_found_relative_to_the_root_of_the_versions():
    manifest = {"root_uri": "s3://b/idx", "shards": [{"uri": "shards/00000"}, {"uri": "versions/00002/shards/00001"}]}
    assert shard_location("s3://b/idx/versions/00002", manifest, 1) == "s3://b/idx/versions/00002/shards/00001"
    assert shard_location("s3://b/idx/versions/00002", manifest, 0) == "s3://b/idx/shards/00000"
    assert shard_location("/data/idx", {"shards": [{"uri": "shards/00000"}]}, 0) == "/data/idx/shards/00000"
    with pytest.raises(ValueError, match="has 2 shard\\(s\\), no shard 2"):
        shard_location("s3://b/idx", manifest, 2)
