"""Training across two Ray nodes (ray.cluster_utils.Cluster, in a separate process)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from harma.data.prepare import prepare_dataset


def test_trains_across_two_nodes(tmp_path, synth_root):
    prepare_dataset(synth_root, str(tmp_path / "prep"), ["train", "val", "test"])
    ray_tmp = tempfile.mkdtemp(prefix="hr-")  # short: Ray's unix socket paths must stay < 108 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("multinode_run.py")), str(tmp_path / "prep"),
         str(tmp_path / "runs")], capture_output=True, text=True, timeout=400, env=env)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["steps"] == 8
    assert len(set(result["nodes"])) == 2
    assert set(result["nodes"]) == set(result["worker_nodes"])
