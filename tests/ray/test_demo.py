"""`harma demo` end to end, small: synth -> prepare -> pre-train -> Ray Train adaptation -> report.
Run as a user runs it (`python -m harma demo`, a process of its own on the shared cluster), so the
console it shows is checked too: harma's progress and its closing summary, nothing of Ray's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from console_lines import foreign_lines, harma_lines  # noqa: E402

# Test mR points the adapted model must gain over the frozen base (6 test images, 30 captions: one
# caption more at a T2I R@K is 0.56 points, one image more at I2T R@1 2.8). With this base (60
# coarse-caption images, 20 full pre-training steps) 16 steps of image-grouped batches gained +7.8
# to +10.0 in 3 runs; with uniform pair batches 16 steps gained +0.6 in one CI run and more in
# another, so the test trains 24. A no-op optimizer gains exactly 0.
MIN_TEST_MR_GAIN = 0.5

# The demo's closing summary (harma.cli.cmd_demo): everything else it prints is a harma log line.
SUMMARY_LINES = (r"^$", r"^ +I2T R@1", r"^frozen base ", r"^HarMA-adapted ", r"^test mR ", r"^search service over ",
                 r"^  '[^']*': top ", r"^web page: ", r"^report: ")


def test_demo_end_to_end_small(ray_cluster, tmp_path):
    import ray

    out = tmp_path / "demo"  # a relative --out, as README's command uses: workers run elsewhere
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.run(
        [sys.executable, "-m", "harma", "demo", "--out", "demo", "demo.images=40", "demo.pretrain_images=60",
         "demo.pretrain_steps=20", "demo.pretrain_batch_size=16", "train.steps=24", "train.batch_size=16",
         "train.log_every=4"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = proc.stdout + proc.stderr
    foreign = foreign_lines(printed, SUMMARY_LINES)
    assert foreign == [], "\n".join(foreign)  # Ray's internals stay in Ray's log files
    harma = harma_lines(printed)
    assert [n for n in range(1, 7) if any(f"[{n}/6] " in line for line in harma)] == [1, 2, 3, 4, 5, 6]
    assert sum("[harma] step " in line for line in harma) >= 4  # the workers' progress reached the console
    assert any("Ray's own logs: " in line for line in harma)
    assert "\x1b[" not in printed and "Reporting training result" not in printed
    assert "frozen base" in proc.stdout and "HarMA-adapted" in proc.stdout
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
    assert f"web page: {served['url']}" in proc.stdout and "harma serve serve_configs/demo.yaml" in printed
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
    assert f"test mR {before:.2f} -> {after:.2f} ({after - before:+.2f})" in proc.stdout
