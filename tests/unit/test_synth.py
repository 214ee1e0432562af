"""The generated dataset: layout, determinism, readable by the annotation reader."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from harma.data.annotations import read_annotations
from harma.data.synth import detailed_captions, sample_scene, synthesize


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_layout_and_counts(synth_root):
    root = Path(synth_root)
    manifest = json.loads((root / "dataset.json").read_text())
    assert manifest["splits"] == {"train": 28, "val": 6, "test": 6, "pretrain": 16}
    train = read_annotations(str(root / "annotations" / "train.json"))
    test = read_annotations(str(root / "annotations" / "test.json"))
    assert len(train) == 28 and len(test) == 6
    assert all(len(e.captions) == 5 and len(set(e.captions)) == 5 for e in train + test)
    assert all((root / "images" / e.image).is_file() for e in train + test)
    raw_train = json.loads((root / "annotations" / "train.json").read_text())
    assert isinstance(raw_train[0]["caption"], str)  # train: one entry per caption
    raw_test = json.loads((root / "annotations" / "test.json").read_text())
    assert isinstance(raw_test[0]["caption"], list)  # val/test: one entry per image
    ids = [e.image_id for e in train + test]
    assert len(set(ids)) == len(ids)


def test_deterministic_for_a_seed(tmp_path):
    synthesize(str(tmp_path / "a"), images=12, seed=3)
    synthesize(str(tmp_path / "b"), images=12, seed=3)
    synthesize(str(tmp_path / "c"), images=12, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_captions_describe_the_scene():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = sample_scene(rng)
        captions = detailed_captions(scene, rng)
        assert len(captions) == 5
        text = " ".join(captions).lower()
        assert scene.kind.split()[-1].rstrip("s") in text
        if scene.river:
            assert "river" in text


def test_too_few_images_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 10"):
        synthesize(str(tmp_path), images=3)
