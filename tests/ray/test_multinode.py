"""Training across Ray nodes (ray.cluster_utils.Cluster, in a separate process).

One scenario covers both: a run that starts on one node and grows to two workers on two nodes when
a second node joins, then trains every remaining step across the two nodes. (A fixed two-node run
was a test of its own; it added nothing this one does not check and cost 100 s of CI.)"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from harma.data.prepare import prepare_dataset


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, synth_root):
    out = tmp_path_factory.mktemp("multinode") / "prep"
    prepare_dataset(synth_root, str(out), ["train", "val", "test"])
    return str(out)


def run_scenario(script: str, prepared: str, runs: Path) -> dict:
    """Run tests/ray/<script> with its own Ray cluster; its last `RESULT {json}` line."""
    ray_tmp = tempfile.mkdtemp(prefix="hr-")  # short: Ray's unix socket paths must stay < 108 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name(script)), prepared, str(runs)],
                              capture_output=True, text=True, timeout=600, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    print(f"{script}: {result}")  # shown with -s
    return result


def test_elastic_run_grows_when_a_node_joins(tmp_path, prepared):
    result = run_scenario("elastic_run.py", prepared, tmp_path / "runs")
    assert result["checkpoints_before"] >= 1  # the node joined after a checkpoint at 1 worker
    assert result["steps"] == 8 * 8  # every step of the run, none lost to the resize
    assert result["world_size"] == 2
    # the two workers ran on the two different nodes: the new node got the second worker
    assert len(set(result["nodes"])) == 2 and set(result["nodes"]) == set(result["node_ids"])
    grown = [r for r in result["restarts"] if r["world_size"] == 2]
    assert grown, result["restarts"]
    # resumed from a checkpoint written at 1 worker, not from scratch, with steps left for 2 workers
    assert 8 <= grown[0]["resumed_at_step"] < 8 * 8
    assert grown[0]["resumed_at_step"] % 8 == 0
