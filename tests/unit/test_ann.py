"""Approximate search (harma.index.ann): the auto rule, recall against brute force, exact scores,
filters inside FAISS with k hits whenever k rows pass, and the approximate index on disk."""

import numpy as np
import pytest

from harma.index import ann as ann_module
from harma.index.ann import (
    AnnParams,
    AnnSearcher,
    ann_from_bytes,
    ann_to_bytes,
    build_ann,
    choose_kind,
    default_nlist,
    default_pq_m,
    plan_ann,
    ram_bytes_per_vector,
)
from harma.index.synthetic import clip_like_vectors


@pytest.fixture(scope="module")
def data():
    vectors, queries = clip_like_vectors(20_000, 64, queries=40, seed=3)
    return vectors, queries, vectors.astype(np.float16)


def _exact(vectors16, query, k, rows=None):
    """Brute force over the stored fp16 vectors (the scores every kind must report)."""
    rows = np.arange(len(vectors16)) if rows is None else rows
    scores = vectors16[rows].astype(np.float32) @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return rows[order].tolist(), scores[order]


def test_the_auto_rule_and_the_bytes_it_weighs():
    # 512-d: ivf_flat keeps the float32 vector and an int64 id, ivf_pq 64 code bytes and the id
    assert ram_bytes_per_vector("ivf_flat", 512) == 2056 and ram_bytes_per_vector("ivf_pq", 512) == 72
    assert ram_bytes_per_vector("exact", 512) == 2048
    assert choose_kind(49_999, 512, 1 << 40) == "exact"
    assert choose_kind(49_999, 512, 2048 * 49_999 - 1) == "ivf_pq"  # its float32 copy does not fit
    assert choose_kind(50_000, 512, 1 << 40) == choose_kind(1_000_000, 512, 72 * 1_000_000) == "ivf_pq"
    with pytest.raises(ValueError, match=r"1,000,000 vectors need 0.1 GiB as ivf_pq codes, over"):
        choose_kind(1_000_000, 512, 72 * 1_000_000 - 1)
    assert default_nlist(1_000_000) == 2048 and default_nlist(200_000) == 1024
    assert default_nlist(1_000) == 25  # at least 39 training vectors a cell
    assert default_pq_m(512) == 64 and default_pq_m(100) == 10
    p = plan_ann("auto", 1_000_000, 512, 1 << 30)  # 1 GiB: 2 GB of vectors do not fit
    assert (p.kind, p.nlist, p.nprobe, p.pq_m, p.train_rows) == ("ivf_pq", 2048, 8, 64, 131_072)
    assert plan_ann("auto", 100, 512, 1 << 30) == AnnParams("exact")
    with pytest.raises(ValueError, match="unknown kind 'ivf'"):
        plan_ann("ivf", 10, 8, 1)
    with pytest.raises(ValueError, match="pq_m 7 does not divide the embedding size 64"):
        plan_ann("ivf_pq", 20_000, 64, 1, pq_m=7)
    with pytest.raises(ValueError, match="100 vectors cannot train 512 cells"):
        plan_ann("ivf_flat", 100, 64, 1, nlist=512)


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq", "hnsw"])
def test_each_kind_finds_the_exact_top_10_and_reports_exact_scores(data, kind):
    vectors, queries, vectors16 = data
    params = plan_ann(kind, len(vectors), 64, 1 << 40)
    searcher = AnnSearcher(build_ann(vectors, params), vectors16, params)
    found = searcher.search(queries, [10] * len(queries), [None] * len(queries))
    recall = []
    for q, (scores, rows) in zip(queries, found, strict=True):
        truth, _ = _exact(vectors16, q, 10)
        recall.append(len(set(rows) & set(truth)) / 10)
        # every reported score is the cosine of the stored vector, best first
        np.testing.assert_allclose(scores, vectors16[rows].astype(np.float32) @ q, rtol=0, atol=1e-6)
        assert scores == sorted(scores, reverse=True)
    assert np.mean(recall) >= 0.95, f"{kind}: recall@10 {np.mean(recall):.3f}"
    assert searcher.take_reranked() >= 10 * len(queries) and searcher.reranked == 0


def test_filters_run_inside_faiss_and_a_filtered_query_gets_k_hits(data, monkeypatch):
    vectors, queries, vectors16 = data
    params = plan_ann("ivf_flat", len(vectors), 64, 1 << 40)
    searcher = AnnSearcher(build_ann(vectors, params), vectors16, params)
    monkeypatch.setattr(ann_module, "EXACT_SUBSET_ROWS", 0)  # every filter through the FAISS selector
    half = np.arange(len(vectors)) % 2 == 0
    found = searcher.search(queries, [10] * len(queries), [half] * len(queries))
    recall = []
    for q, (_, rows) in zip(queries, found, strict=True):
        assert len(rows) == 10 and all(r % 2 == 0 for r in rows)
        truth, _ = _exact(vectors16, q, 10, np.flatnonzero(half))
        recall.append(len(set(rows) & set(truth)) / 10)
    assert np.mean(recall) >= 0.95
    # 5 rows pass: 5 hits, in exact order, although k is 10
    five = np.zeros(len(vectors), bool)
    five[[3, 999, 5000, 12345, 19999]] = True
    (scores, rows), = searcher.search(queries[:1], [10], [five])
    assert rows == _exact(vectors16, queries[0], 10, np.flatnonzero(five))[0] and len(rows) == 5
    # rows far from the query: the probed cells hold none of them, the exact scan of the allowed rows answers
    far = np.zeros(len(vectors), bool)
    far[np.argsort(vectors16.astype(np.float32) @ queries[0])[:300]] = True
    (_, rows), = searcher.search(queries[:1], [10], [far])
    assert rows == _exact(vectors16, queries[0], 10, np.flatnonzero(far))[0]
    none = np.zeros(len(vectors), bool)
    assert searcher.search(queries[:2], [10, 3], [none, None])[0] == ([], [])


def test_a_small_filtered_subset_is_scanned_exactly(data):
    vectors, queries, vectors16 = data
    params = plan_ann("ivf_pq", len(vectors), 64, 1 << 40)
    searcher = AnnSearcher(build_ann(vectors, params), vectors16, params)
    tenth = np.arange(len(vectors)) % 10 == 0  # 2,000 rows <= EXACT_SUBSET_ROWS
    masks = [tenth, None, tenth]
    found = searcher.search(queries[:3], [5, 5, 20], masks)
    assert found[0][1] == _exact(vectors16, queries[0], 5, np.flatnonzero(tenth))[0]
    assert found[2][1] == _exact(vectors16, queries[2], 20, np.flatnonzero(tenth))[0]
    assert len(found[1][1]) == 5


def test_a_serialised_index_answers_as_the_one_built(data):
    vectors, queries, vectors16 = data
    params = plan_ann("ivf_pq", len(vectors), 64, 1 << 40)
    built = build_ann(vectors, params)
    again = ann_from_bytes(ann_to_bytes(built))
    a = AnnSearcher(built, vectors16, params).search(queries, [10] * 40, [None] * 40)
    b = AnnSearcher(again, vectors16, AnnParams.from_manifest({**params.to_manifest(), "build_seconds": 1.0}))
    assert b.search(queries, [10] * 40, [None] * 40) == a
    with pytest.raises(ValueError, match="holds 20000 vectors, the re-rank store 10"):
        AnnSearcher(built, vectors16[:10], params)
    with pytest.raises(ValueError, match="an exact index has no FAISS structure"):
        build_ann(vectors, AnnParams("exact"))


def test_an_approximate_index_round_trips_with_mapped_fp16_vectors(tmp_path, data):
    from harma.serve.index import EmbeddingIndex, load_index, save_index

    vectors, queries, vectors16 = data
    n = 2_000
    params = plan_ann("ivf_flat", n, 64, 1 << 40, nlist=16)
    images = {"id": [f"t{i}" for i in range(n)], "source": ["s"] * n, "image_id": list(range(n)),
              "split": ["test"] * n, "label": ["a" if i % 4 else "b" for i in range(n)], "thumbnail": [b""] * n}
    manifest = {"format": "harma-index-v1", "checkpoint_fingerprint": "f" * 64, "images": n, "captions": 0,
                "ann": params.to_manifest()}
    with pytest.raises(ValueError, match="needs its FAISS index"):
        save_index(str(tmp_path / "bad"), EmbeddingIndex(manifest, vectors[:n], images))
    save_index(str(tmp_path / "ix"), EmbeddingIndex(manifest, vectors[:n], images), build_ann(vectors[:n], params))
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == [
        "images.ann", "images.f16.npy", "images.parquet", "manifest.json"]  # no float32 copy
    loaded = load_index(str(tmp_path / "ix"))
    assert isinstance(loaded.image_emb, np.memmap) and loaded.image_emb.dtype == np.float16
    import faiss

    # the IVF lists view the mapped file: none of them owns its codes
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(loaded.ann.index).invlists)
    assert lists.nlist == 16 and not any(lists.codes.at(i).is_owned for i in range(lists.nlist))
    assert loaded.ann.params == params
    mask = loaded.search_mask("images", {"label": "b"})
    (scores, rows), (_, any_rows) = loaded.ann.search(queries[:2], [5, 5], [mask, None])
    assert rows == _exact(vectors16[:n], queries[0], 5, np.flatnonzero(mask))[0]
    assert all(loaded.images["label"][r] == "b" for r in rows) and len(any_rows) == 5


def test_a_remote_file_is_fetched_once_per_node_and_a_local_one_used_in_place(tmp_path, monkeypatch):
    from harma.index import cache

    fetched = []
    monkeypatch.setenv(cache.CACHE_VAR, str(tmp_path / "cache"))
    monkeypatch.setattr(cache.storage, "is_s3", lambda uri: uri.startswith("s3://"))
    monkeypatch.setattr(cache.storage, "read_bytes", lambda uri: fetched.append(uri) or b"vectors")
    first = cache.local_file("s3://b/ix", "images.f16.npy", "abc/2026")
    assert cache.local_file("s3://b/ix", "images.f16.npy", "abc/2026") == first
    assert fetched == ["s3://b/ix/images.f16.npy"] and open(first, "rb").read() == b"vectors"
    assert first == str(tmp_path / "cache" / "abc_2026" / "images.f16.npy")
    assert not [p for p in (tmp_path / "cache" / "abc_2026").iterdir() if p.name.startswith(".")]
    assert cache.local_file(str(tmp_path / "ix"), "images.f16.npy", "k") == str(tmp_path / "ix" / "images.f16.npy")


def test_the_cache_evicts_the_versions_used_longest_ago_beyond_its_bound(tmp_path, monkeypatch):
    import os

    from harma.index import cache

    monkeypatch.setenv(cache.CACHE_VAR, str(tmp_path / "cache"))
    monkeypatch.setenv(cache.LIMIT_VAR, "250")
    monkeypatch.setattr(cache.storage, "is_s3", lambda uri: True)
    monkeypatch.setattr(cache.storage, "read_bytes", lambda uri: b"x" * 100)
    for i, key in enumerate(["v1", "v2"]):
        cache.local_file("s3://b/ix", "images.f16.npy", key)
        os.utime(tmp_path / "cache" / key, (1000 + i, 1000 + i))
    cache.local_file("s3://b/ix", "images.f16.npy", "v1")  # v1 used again: v2 is now the oldest
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["v1", "v2"]  # 200 bytes <= 250
    cache.local_file("s3://b/ix", "images.f16.npy", "v3")  # 300 bytes: the least recently used goes
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["v1", "v3"]
    monkeypatch.setenv(cache.LIMIT_VAR, "10")  # smaller than one version: the new one stays
    cache.local_file("s3://b/ix", "images.f16.npy", "v4")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["v4"]


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq"])
def test_codes_encoded_apart_and_appended_make_the_index_adding_the_vectors_makes(data, kind):
    """The embedding actors' path: a trained, empty codec shipped as bytes encodes batches anywhere;
    appending those codes gives the same FAISS index, byte for byte, as adding the vectors."""
    import faiss

    from harma.index.ann import append_codes, encode, filled, trained_codec

    vectors = data[0][:6000]
    params = plan_ann(kind, len(vectors), 64, 1 << 30, nlist=32, train_rows=2000)
    assert params.train_rows == 2000
    codec = trained_codec(vectors, params)
    assert codec.is_trained and codec.ntotal == 0
    added = faiss.clone_index(codec)
    added.add(vectors)
    shipped = ann_from_bytes(ann_to_bytes(codec))  # as an actor receives it
    codes = np.concatenate([encode(shipped, vectors[i:i + 1000]) for i in range(0, 6000, 1000)])
    assert codes.dtype == np.uint8 and codes.shape == (6000, codec.sa_code_size())
    assert ann_to_bytes(filled(codec, codes)) == ann_to_bytes(added)
    halves = append_codes(filled(codec, codes[:2500]), codes[2500:])  # `harma index add`: onto a filled index
    assert ann_to_bytes(halves) == ann_to_bytes(added)
    assert codec.ntotal == 0  # `filled` copies the codec
    assert encode(codec, vectors[:0]).shape == (0, codec.sa_code_size())


def test_a_codec_is_trained_on_at_most_its_train_rows_and_refuses_a_sample_smaller_than_its_cells(data):
    from harma.index.ann import trained_codec

    vectors = data[0]
    params = plan_ann("ivf_flat", 20_000, 64, 1 << 30, nlist=16, train_rows=800)
    messages = []
    trained_codec(vectors, params, progress=messages.append)
    assert "trained 16 cells on 800 vectors" in messages[0]
    with pytest.raises(ValueError, match="10 sample vectors cannot train 16 cells"):
        trained_codec(vectors[:10], params)
    with pytest.raises(ValueError, match="a hnsw index has no trained codec"):
        trained_codec(vectors, plan_ann("hnsw", 100, 64, 1))


def _recall(searcher, queries, truth, k=10):
    found = searcher.search(queries, [k] * len(queries), [None] * len(queries))
    return float(np.mean([len(set(rows) & set(t)) / k for (_, rows), t in zip(found, truth, strict=True)]))


def test_exact_top_k_in_chunks_is_the_full_sort(data):
    from harma.index.ann import exact_top_k

    vectors, queries, _ = data
    full = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(exact_top_k(queries, vectors, 10, chunk=3_000), full)


def test_the_build_tunes_nprobe_to_the_smallest_doubling_that_meets_the_target(data):
    """Queries off the gallery's cone (the modality gap of text queries) miss at the planned
    nprobe 1 of 64 cells; tuning doubles it until 0.95 of the brute-force top 10 is found (brute
    force over the fp16 vectors here, independently of the tuner's float32 truth) and no further."""
    from harma.index.ann import tune_search

    vectors, queries, vectors16 = data
    tune_q, test_q = queries[:20], queries[20:]
    params = AnnParams(kind="ivf_flat", nlist=64, nprobe=1, rerank=2, train_rows=64 * 64)
    index = build_ann(vectors, params)
    tuned, record = tune_search(index, vectors, params, tune_q, 0.95)
    truth = [_exact(vectors16, q, 10)[0] for q in tune_q]
    assert record["knob"] == "nprobe" and record["planned"] == 1 and record["met"]
    assert tuned.nprobe == record["chosen"] > 1 and (tuned.nlist, tuned.rerank) == (64, 2)
    assert [v for v, _ in record["tried"]] == [2 ** i for i in range(len(record["tried"]))]
    assert _recall(AnnSearcher(index, vectors16, tuned), tune_q, truth) >= 0.95
    half = AnnParams(**{**params.to_manifest(), "nprobe": tuned.nprobe // 2})
    assert _recall(AnnSearcher(index, vectors16, half), tune_q, truth) < 0.95  # the smallest that meets it
    # on queries it was not tuned on, the tuned probe still finds far more than the planned one
    test_truth = [_exact(vectors16, q, 10)[0] for q in test_q]
    assert _recall(AnnSearcher(index, vectors16, tuned), test_q, test_truth) > \
        _recall(AnnSearcher(index, vectors16, params), test_q, test_truth) + 0.2


def test_a_target_out_of_reach_stops_at_every_cell_and_says_so(data):
    from harma.index.ann import tune_search

    vectors, queries, _ = data
    params = AnnParams(kind="ivf_pq", nlist=16, nprobe=4, pq_m=4, rerank=1, train_rows=16 * 64)
    index = build_ann(vectors, params)  # 4-byte codes, no re-rank beyond k: never all of the exact top 10
    tuned, record = tune_search(index, vectors, params, queries[:20], 1.0)
    assert record["met"] is False and record["recall_at_10"] < 1.0
    (*_, (before, had)), (last, got) = record["tried"][:-1], record["tried"][-1]
    if last == 16 and got - had >= 0.01:  # every cell probed, still short
        assert tuned.nprobe == 16 and record["recall_at_10"] == got
    else:  # a doubling that gained under 0.01: the value before it is kept
        assert got - had < 0.01 and tuned.nprobe == before == last // 2 and record["recall_at_10"] == had


def test_tuning_stops_where_a_doubling_no_longer_pays(data, monkeypatch):
    """Recall 0.5, 0.7, 0.705 at ef_search 16, 32, 64 (target 0.95): 64 adds 0.005, so 32 is kept."""
    from harma.index import ann

    vectors, queries, _ = data
    recalls = iter([0.5, 0.7, 0.705])
    truth = ann.exact_top_k(queries[:4], vectors, 10)

    class Fake:
        def __init__(self, index, rows, params):
            self.params = params

        def search(self, q, ks, masks):
            share = next(recalls)
            return [([], t[:round(share * 10)].tolist() + [-1] * (10 - round(share * 10))) for t in truth]

    monkeypatch.setattr(ann, "AnnSearcher", Fake)
    tuned, record = ann.tune_search(None, vectors, AnnParams(kind="hnsw", hnsw_m=8, ef_search=16), queries[:4], 0.95)
    assert record["tried"] == [[16, 0.5], [32, 0.7], [64, 0.7]] and tuned.ef_search == 32 and not record["met"]
