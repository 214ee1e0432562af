"""`harma demo` end to end, small: synth -> prepare -> pre-train -> Ray Train adaptation -> report."""

import json

import pytest

from harma.cli import main

# Test mR points the adapted model must gain over the frozen base (6 test images, 30 captions: one
# caption more at a T2I R@K is 0.56 points, one image more at I2T R@1 2.8). With this base (60
# coarse-caption images, 20 full pre-training steps) 16 steps of image-grouped batches gained +7.8
# to +10.0 in 3 runs; with uniform pair batches 16 steps gained +0.6 in one CI run and more in
# another, so the test trains 24. A no-op optimizer gains exactly 0.
MIN_TEST_MR_GAIN = 0.5


def test_demo_end_to_end_small(ray_cluster, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out, as README's command uses: workers run elsewhere
    out = tmp_path / "demo"
    assert main(["demo", "--out", "demo", "demo.images=40", "demo.pretrain_images=60",
                 "demo.pretrain_steps=20", "demo.pretrain_batch_size=16", "train.steps=24",
                 "train.batch_size=16", "train.log_every=4"]) == 0
    printed = capsys.readouterr().out
    assert "frozen base" in printed and "HarMA-adapted" in printed
    report = json.loads((out / "report" / "metrics.json").read_text())
    assert report["workers"] == 2
    before, after = report["test_before"]["mr"], report["test_after"]["mr"]
    assert after >= before + MIN_TEST_MR_GAIN, f"test mR {before:.2f} -> {after:.2f}"
    assert report["mr_gain"] == pytest.approx(after - before)
    val_steps = [r["step"] for r in report["adapt_history"] if "val_mr" in r]
    assert val_steps == [8, 16, 24]  # 28 train images x 5 captions / 16 = 8 steps per epoch
    assert (out / "report" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "base.safetensors").is_file()
    assert (out / "store" / "synth" / "train" / "part-00000.parquet").is_file()
    assert (out / "report" / "table.txt").read_text().startswith(" " * 18 + "  I2T R@1")
    # [5/5] the test images indexed and served; the queries went over HTTP.
    served = report["serving"]
    assert served["images"] == 6 and len(served["queries"]) == 3
    assert all(len(q["results"]) == 3 and q["results"][0]["id"].startswith("test/") for q in served["queries"])
    assert json.loads((out / "index" / "manifest.json").read_text())["images"] == 6
    assert (out / "model" / "adapter.safetensors").is_file()
    assert f"web page: {served['url']}" in printed and "harma serve serve_configs/demo.yaml" in printed
    # [6/6] generated scenes indexed with footprints, asked by place and time over HTTP as GeoJSON
    scenes = served["scenes"]
    assert scenes["scenes"] == 3 and scenes["tiles"] > 0
    for query in scenes["queries"]:
        w, s, e, n = query["bbox"]
        assert 1 <= len(query["features"]) <= 3
        for feature in query["features"]:
            lon, lat = feature["properties"]["centre"]
            assert w - 0.01 <= lon <= e + 0.01 and s - 0.01 <= lat <= n + 0.01  # a tile touching the box
    assert "place query 'storage tanks next to a river'" in printed
