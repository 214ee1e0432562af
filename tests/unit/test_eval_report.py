"""Scene labels through the data paths, and `harma eval`'s two tie protocols and per-class table."""

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from harma.cli import main
from harma.data.local import load_split
from harma.data.prepare import prepare_dataset
from harma.data.prepared import load_prepared_split
from harma.eval import METRIC_KEYS


def _annotated_labels(root: str, split: str) -> list[str]:
    return [e["label_name"] for e in json.loads((Path(root) / "annotations" / f"{split}.json").read_text())]


def test_splits_carry_each_image_label_and_key_from_annotations_and_shards(tmp_path, synth_root):
    expected = _annotated_labels(synth_root, "val")  # val/test files: one entry per image
    local = load_split(synth_root, "val")
    assert local.labels == expected and len(set(expected)) > 1
    assert local.image_keys == [f"val/val_{i:05d}.png" for i in range(len(expected))]
    prepare_dataset(synth_root, str(tmp_path / "p"), ["val"], shard_images=4)  # 2 shards
    prepared = load_prepared_split(str(tmp_path / "p"), "val")
    assert prepared.labels == expected and prepared.image_keys == local.image_keys


def test_shards_without_a_label_column_still_load(tmp_path, synth_root):
    out = tmp_path / "old"
    prepare_dataset(synth_root, str(out), ["test"])
    for shard in (out / "test").glob("*.parquet"):
        pq.write_table(pq.read_table(shard).drop(["label"]), shard)  # as written before the column
    split = load_prepared_split(str(out), "test")
    assert len(split.images) == 6 and split.labels == [None] * 6
    assert split.image_keys == [f"test/test_{i:05d}.png" for i in range(6)]


def test_eval_writes_and_prints_both_protocols_and_the_class_breakdown(tmp_path, capsys, tiny_model_config):
    from harma.config import PlatformConfig
    from harma.model import build_model
    from harma.model.checkpoint import save_checkpoint

    data, ckpt = tmp_path / "data", tmp_path / "ckpt"
    assert main(["data", "synth", "--out", str(data), "--images", "20", "--seed", "1"]) == 0
    cfg = PlatformConfig(model=tiny_model_config).with_overrides({"data.root": str(data)})
    save_checkpoint(str(ckpt), build_model(cfg.model), cfg, {})
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ckpt), "--split", "test"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((ckpt / "eval_test.json").read_text())
    assert result["metrics"]["protocol"] == "pessimistic ties"
    assert result["metrics_official"]["protocol"] == "official ties (np.argsort reversed)"
    for m in (result["metrics"], result["metrics_official"]):
        assert m["mr"] == pytest.approx(sum(m[k] for k in METRIC_KEYS[:-1]) / 6)

    per_class = result["per_class"]
    labels = Counter(_annotated_labels(str(data), "test"))  # 3 test images, 5 captions each
    assert per_class["label_sources"] == {"label_name": 3, "file_name": 0, "none": 0}
    for protocol in ("pessimistic", "official"):
        classes = per_class[protocol]["classes"]
        assert {name: c["images"] for name, c in classes.items()} == dict(labels)
        assert {name: c["captions"] for name, c in classes.items()} == {n: 5 * k for n, k in labels.items()}
        overall = result["metrics"] if protocol == "pessimistic" else result["metrics_official"]
        for key in ("i2t_r1", "t2i_r1"):  # each class's queries against the whole gallery
            weight = "images" if key.startswith("i2t") else "captions"
            total = sum(c[weight] for c in classes.values())
            assert sum(c[key] * c[weight] for c in classes.values()) / total == pytest.approx(overall[key])

    assert "pessimistic ties" in printed and "official ties" in printed and "per scene class" in printed
    for name, row in per_class["pessimistic"]["classes"].items():  # one printed row per class
        line = next(x for x in printed.splitlines() if x.startswith(name + " "))
        cells = [c for c in line[len(name):].split() if c != "|"]
        off = per_class["official"]["classes"][name]
        assert cells == [str(row["images"]), str(row["captions"]), f"{row['i2t_r1']:.2f}", f"{row['t2i_r1']:.2f}",
                         f"{row['mr']:.2f}", f"{off['i2t_r1']:.2f}", f"{off['t2i_r1']:.2f}", f"{off['mr']:.2f}"]


SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "annotations"


@pytest.mark.skipif(not (SHARED / "rsitmd_train.json").exists(), reason="shared annotations not present")
def test_file_name_classes_agree_with_label_name_on_rsitmd_and_label_its_test_set():
    from harma.data.annotations import read_annotations
    from harma.eval import label_from_file_name

    for name in ("rsitmd_train.json", "rsitmd_val.json"):  # files that have label_name
        entries = read_annotations(str(SHARED / name))
        assert [label_from_file_name(e.image) for e in entries] == [e.label_name.lower() for e in entries]
    test = read_annotations(str(SHARED / "rsitmd_test.json"))  # no label_name: file names only
    assert all(e.label_name is None for e in test)
    assert len({label_from_file_name(e.image) for e in test} - {None}) == 32
