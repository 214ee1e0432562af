"""Annotation files: the real RSITMD/RSICD captions, and clear errors on malformed input."""

import json
from pathlib import Path

import pytest

from harma.data.annotations import AnnotationError, clean_caption, read_annotations

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "annotations"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="shared annotations not present")


@needs_shared
@pytest.mark.parametrize("name, images, captions", [
    ("rsitmd_train.json", 3435, 17175),
    ("rsitmd_val.json", 856, 4280),
    ("rsitmd_test.json", 452, 2260),
    ("rsicd_val.json", 1966, 9830),
    ("rsicd_test.json", 1093, 5465),
])
def test_real_annotation_files(name, images, captions):
    entries = read_annotations(str(SHARED / name))
    assert len(entries) == images
    assert sum(len(e.captions) for e in entries) == captions
    assert all(len(e.captions) == 5 for e in entries)


@needs_shared
def test_train_layout_groups_captions_by_image_id_in_file_order():
    raw = json.loads((SHARED / "rsitmd_train.json").read_text())
    entries = read_annotations(str(SHARED / "rsitmd_train.json"))
    assert entries[0].image == raw[0]["image"] and entries[0].image_id == raw[0]["image_id"]
    assert entries[0].captions == tuple(r["caption"] for r in raw[:5])
    assert entries[0].label_name == raw[0]["label_name"]


def test_clean_caption_matches_the_paper_code():
    assert clean_caption("Two  Storage-tanks, next to a (small) river!") == "two storage tanks next to a small river"
    assert clean_caption("a/b <person> c", max_words=2) == "a b"


def _write(tmp_path, payload, name="ann.json"):
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return str(path)


@pytest.mark.parametrize("payload, message", [
    ("{not json", r"ann\.json: invalid JSON at line 1"),
    ({"a": 1}, "top level must be a list"),
    ([], "no entries"),
    ([{"image": "a.tif", "caption": ["x"]}, {"image": "b.tif", "caption": []}], r"entry 1 \(b\.tif\): 'caption' must be a non-empty list"),
    ([{"image": "a.tif", "caption": ["x", 3]}], r"entry 0 \(a\.tif\): caption 1"),
    ([{"caption": "x", "image": "a.tif", "image_id": 1}, {"caption": "y", "image_id": 2}], r"entry 1: 'image' must be"),
    ([{"caption": "x", "image": "a.tif"}], r"entry 0 \(a\.tif\): missing 'image_id'"),
    ([{"caption": "x", "image": "a.tif", "image_id": "7"}], r"entry 0: 'image_id' must be an integer"),
    ([{"caption": "x", "image": "a.tif", "image_id": 1}, {"caption": "y", "image": "b.tif", "image_id": 1}], r"entry 1: image_id 1 names 'b\.tif'"),
])
def test_malformed_files_name_the_file_and_entry(tmp_path, payload, message):
    path = _write(tmp_path, payload)
    with pytest.raises(AnnotationError, match=message) as err:
        read_annotations(path)
    assert path in str(err.value)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "ann.json"
    path.write_bytes(b"[\xff\xfe]")
    with pytest.raises(AnnotationError, match="not UTF-8"):
        read_annotations(str(path))
