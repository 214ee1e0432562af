"""Every benchmark in benchmarks/ runs in its --smoke mode (seconds, tiny sizes) and writes its
JSON, so a broken benchmark is a red CI. Each runs as a user runs it: its own process and its
own local Ray (not the session's cluster).

They run one after another. Two at a time saved ~50 s of 350 on 2 cores, but serve_latency's smoke
run then failed twice in fresh-clone CI (alone it passes): it times queries in short blocks and
stops when a busy machine finishes none in a block."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py"))
# What each JSON must hold: the benchmark's own figure against its ceiling, measured.
KEYS = {
    "ingest.py": ("ratio_per_core", "bare_pairs_per_s_1core", "ray_data_pairs_per_s"),
    "train_step.py": ("bare_pairs_per_s", "runs"),
    "serve_latency.py": ("overhead_p50_ms", "throughput_ratio", "direct_batched_qps"),
    "paper_table.py": ("variants", "verdict"),
    "batch_composition.py": ("rows", "train_images"),
    "ann.py": ("rows", "sizing_100m"),
    "index_update.py": ("add_ratio", "rebuild_s", "ceiling_ratio", "delete_s"),
    "shard_fanout.py": ("fanout_overhead_p50_ms", "identical", "low_load"),
    "place_search.py": ("models", "mean_precision_gain"),
    "geo_tiles.py": ("ratio", "bare_tiles_per_s_all_cores", "pipeline_tiles_per_s", "memory"),
}


# Other modes of a benchmark that its plain --smoke does not run.
VARIANTS = {"ann.py": [["--source", "model"]]}
RUNS = [(script, []) for script in BENCHMARKS] + [(s, extra) for s, variants in VARIANTS.items() for extra in variants]


def test_every_benchmark_is_known_here():
    assert set(BENCHMARKS) == set(KEYS), "add the new benchmark's JSON keys to KEYS"


@pytest.mark.ray
@pytest.mark.parametrize(("script", "extra"), RUNS, ids=[" ".join([s, *e]) for s, e in RUNS])
def test_benchmark_smoke_mode_runs_and_writes_its_json(script, extra, tmp_path):
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="hb-")  # short: Ray's socket paths live under it
    env["PYTHONPATH"] = str(REPO / "platform")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke", *extra, "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in KEYS[script]:
        assert key in result, f"{script}: no {key!r} in its JSON"
