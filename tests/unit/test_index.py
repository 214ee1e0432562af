"""The retrieval index: exact search against brute force, filters, manifest checks, round trip."""

import numpy as np
import pytest
import torch

from harma.serve.index import (
    EmbeddingIndex,
    IndexMismatchError,
    check_index_matches,
    checkpoint_fingerprint,
    load_index,
    save_index,
    search_batch,
)


def _unit(rows, dim, seed):
    x = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _index(n=50, dim=8, captions=True):
    images = {
        "id": [f"img/{i:03d}.png" for i in range(n)],
        "source": [f"img/{i:03d}.png" for i in range(n)],
        "image_id": list(range(n)),
        "split": ["test" if i % 2 else "train" for i in range(n)],
        "label": ["port" if i % 5 == 0 else "farm" for i in range(n)],
        "thumbnail": [bytes([i]) * 3 for i in range(n)],
    }
    manifest = {"format": "harma-index-v1", "checkpoint_fingerprint": "f", "images": n,
                "captions": 2 * n if captions else 0}
    cap = None
    if captions:
        cap = {"caption": [f"c{i}" for i in range(2 * n)], "image": [images["id"][i // 2] for i in range(2 * n)],
               "image_row": [i // 2 for i in range(2 * n)]}
    return EmbeddingIndex(manifest, _unit(n, dim, 0), images, _unit(2 * n, dim, 1) if captions else None, cap)


def test_search_equals_brute_force_per_query_k():
    index = _index()
    queries = _unit(4, 8, 2)
    found = search_batch(torch.from_numpy(queries), torch.from_numpy(index.image_emb), [1, 5, 10, 50], [None] * 4)
    scores = queries @ index.image_emb.T
    for q, (k, (values, rows)) in enumerate(zip([1, 5, 10, 50], found, strict=False)):
        expected = np.argsort(-scores[q], kind="stable")[:k]
        assert rows == expected.tolist()
        np.testing.assert_allclose(values, scores[q][expected], rtol=1e-5)


def test_filters_mask_rows_and_shorten_results():
    index = _index()
    mask = index.image_mask({"split": "test", "label": "port"})  # odd multiples of 5
    assert np.flatnonzero(mask).tolist() == [5, 15, 25, 35, 45]
    queries = torch.from_numpy(_unit(2, 8, 3))
    found = search_batch(queries, torch.from_numpy(index.image_emb), [10, 3], [mask, None])
    assert sorted(found[0][1]) == [5, 15, 25, 35, 45]  # only 5 match: 5 results, not 10
    assert len(found[1][1]) == 3
    scores = _unit(2, 8, 3)[0] @ index.image_emb.T
    assert found[0][1] == sorted([5, 15, 25, 35, 45], key=lambda r: -scores[r])
    assert index.image_mask({"label": ["port", "farm"]}).all()
    assert index.image_mask({"image_id": "7"}).sum() == 1  # values compared as strings
    caption_mask = index.caption_mask({"image_id": "7"})
    assert np.flatnonzero(caption_mask).tolist() == [14, 15]
    with pytest.raises(ValueError, match="cannot filter on 'thumbnail'"):
        index.image_mask({"thumbnail": "x"})


def test_results_and_thumbnail_lookup_never_touch_paths():
    index = _index()
    assert index.image_result(3, 0.5) == {"id": "img/003.png", "score": 0.5, "metadata": {
        "split": "test", "label": "farm", "image_id": 3, "source": "img/003.png"}}
    assert index.caption_result(7, 0.25) == {"caption": "c7", "image": "img/003.png", "score": 0.25}
    assert index.thumbnail("img/004.png") == b"\x04\x04\x04"
    assert index.thumbnail("../../etc/passwd") is None


def test_index_rejects_inconsistent_or_duplicate_rows():
    good = _index(captions=False)
    with pytest.raises(ValueError, match="4 image embeddings for 50"):
        EmbeddingIndex(good.manifest, good.image_emb[:4], good.images)
    dup = dict(good.images, id=["same"] * 50)
    with pytest.raises(ValueError, match="not unique"):
        EmbeddingIndex(good.manifest, good.image_emb, dup)


def test_save_load_round_trip(tmp_path):
    index = _index()
    save_index(str(tmp_path / "idx"), index)
    back = load_index(str(tmp_path / "idx"))
    assert np.array_equal(back.image_emb, index.image_emb)
    assert np.array_equal(back.caption_emb, index.caption_emb)
    assert back.images == index.images and back.captions == index.captions
    assert back.manifest == index.manifest
    with pytest.raises(FileNotFoundError, match="no index here"):
        load_index(str(tmp_path / "missing"))


def test_manifest_must_name_the_served_checkpoint(tmp_path, tiny_model_config):
    from harma.config import PlatformConfig
    from harma.model.checkpoint import copy_checkpoint, save_checkpoint
    from harma.model.harma import build_model

    cfg = PlatformConfig(model=tiny_model_config)
    save_checkpoint(str(tmp_path / "a"), build_model(cfg.model, seed=0), cfg, {})
    save_checkpoint(str(tmp_path / "b"), build_model(cfg.model, seed=1), cfg, {})  # other adapters
    copy_checkpoint(str(tmp_path / "a"), str(tmp_path / "a-copy"))
    fa, fb = checkpoint_fingerprint(str(tmp_path / "a")), checkpoint_fingerprint(str(tmp_path / "b"))
    assert fa["config_sha256"] == fb["config_sha256"] and fa["fingerprint"] != fb["fingerprint"]
    manifest = {"format": "harma-index-v1", "checkpoint_uri": str(tmp_path / "a"),
                "checkpoint_fingerprint": fa["fingerprint"], "config_sha256": fa["config_sha256"]}
    check_index_matches(manifest, str(tmp_path / "a"), fa)
    check_index_matches(manifest, str(tmp_path / "a-copy"), checkpoint_fingerprint(str(tmp_path / "a-copy")))
    with pytest.raises(IndexMismatchError, match="adapter weights differ"):
        check_index_matches(manifest, str(tmp_path / "b"), fb)
    with pytest.raises(IndexMismatchError, match="not a harma-index-v1"):
        check_index_matches({"format": "other"}, str(tmp_path / "a"), fa)
