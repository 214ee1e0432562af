"""harma tune: a rank sweep with ASHA early stopping killed mid-sweep and resumed; its outputs."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from harma.config import load_config
from harma.data.prepare import prepare_dataset


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, synth_root):
    out = tmp_path_factory.mktemp("prepared-tune")
    prepare_dataset(synth_root, str(out), ["train", "val", "test"])
    return out


def _sweep_yaml(path: Path, prepared: Path, out: Path, name: str, ranks: tuple[int, ...] = (16, 8, 4),
                epochs: int = 3) -> Path:
    cfg = {
        "run": {"name": name, "output_dir": str(out), "seed": 0},
        "model": {"backbone": {"arch": "harma-tiny"},
                  "adapter": {"heads": 2, "mini_rank": 8, "mini_heads": 2}},
        "data": {"prepared_uri": str(prepared), "deterministic": True},
        "train": {"epochs": epochs, "batch_size": 16, "log_every": 100, "optimizer": {"lr": 1.0e-2},
                  "workers": {"min": 1, "max": 1, "cpus_per_worker": 1}},
        "tune": {"scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
                 "search_space": {"model.adapter.rank": {"grid": list(ranks)}}},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _kill_processes_of(ray_tmp: str) -> None:
    """SIGKILL every process of the cluster a killed driver left behind (found by its temp dir)."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(ray_tmp in part for part in proc.info["cmdline"] or []):
            try:
                proc.kill()
            except psutil.Error:
                pass


def _checkpoints(trial_dir: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in trial_dir.glob("checkpoint_*/metrics.json")),
                  key=lambda m: m["epoch"])


def _assert_summary_and_tracking(out: Path, name: str) -> list[dict]:
    """The sweep's summary files and its MLflow runs (the session's store, conftest)."""
    from mlflow.tracking import MlflowClient

    summary = out / name / "summary"
    rows = json.loads((summary / "table.json").read_text())
    assert sorted(r["rank"] for r in rows) == [4, 8, 16]
    assert [r["trial"] for r in rows] == [f"{name}-rank{r['rank']}" for r in rows]
    params = {r["rank"]: r["trainable_params"] for r in rows}
    assert params[4] < params[8] < params[16]
    assert "trainable" in (summary / "table.txt").read_text()
    assert (summary / "val_mr_vs_params.png").read_bytes()[:4] == b"\x89PNG"
    best_row = max(rows, key=lambda r: r["val_mr"])
    best = load_config(summary / "best.yaml")
    assert best.tune is None and best.model.adapter.rank == best_row["rank"]
    assert (summary / "best.yaml").read_text().startswith("# harma train --config")
    # the sweep is one parent run (resumed, not duplicated, by the second driver), each trial a child
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    parent = [r for r in runs if r.info.run_name == name]
    assert len(parent) == 1 and parent[0].data.tags["harma.best_checkpoint"] == best_row["checkpoint"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert sorted(r.data.params["model.adapter.rank"] for r in children) == ["16", "4", "8"]
    assert {a.path for a in client.list_artifacts(parent[0].info.run_id, "summary")} >= {"summary/table.txt",
                                                                                       "summary/best.yaml"}
    return rows


def test_killed_sweep_resumes_and_still_stops_a_trial_early(prepared, tmp_path):
    # Three rank trials of 3 epochs with ASHA: the first finishes, then the driver is killed. The
    # resumed sweep must not rerun it, must compare the other two with its rung results (and stop
    # one early, as the uninterrupted sweep does), and must write the summary and tracking.
    out = tmp_path / "out"
    config = _sweep_yaml(tmp_path / "sweep.yaml", prepared, out, "resume", ranks=(16, 8, 4), epochs=3)
    ray_tmp = tempfile.mkdtemp(prefix="hr-")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    cmd = [sys.executable, str(Path(__file__).with_name("tune_run.py")), "--config", str(config)]
    first = out / "resume" / "trials" / "resume-rank16"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            if [m["epoch"] for m in _checkpoints(first)][-1:] == [3]:
                break
            time.sleep(0.5)
        assert [m["epoch"] for m in _checkpoints(first)] == [1, 2, 3], "the first trial never finished"
        time.sleep(8)  # let Tune record the finished trial; the next one is still far from done
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep's driver dies mid-sweep ...
        proc.wait()
    finally:
        _kill_processes_of(ray_tmp)  # ... and its local cluster with it
    finished = _checkpoints(first)
    at_kill = {rank: _checkpoints(out / "resume" / "trials" / f"resume-rank{rank}") for rank in (8, 4)}
    assert not (out / "resume" / "summary").exists()

    ray_tmp = tempfile.mkdtemp(prefix="hr-")
    try:
        done = subprocess.run(cmd, env={**env, "RAY_TMPDIR": ray_tmp}, capture_output=True, text=True,
                              timeout=600)
    finally:
        _kill_processes_of(ray_tmp)
    log = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, log
    assert "resuming sweep" in done.stdout
    assert _checkpoints(first) == finished  # the finished trial was not run again
    rows = _assert_summary_and_tracking(out, "resume")
    epochs = {r["rank"]: r["epochs"] for r in rows}
    assert epochs[16] == 3
    stopped = [r["rank"] for r in rows if r["stopped_early"]]
    assert stopped and 16 not in stopped, (epochs, log)
    # ... judged after the resume, against the restored rungs: its last epoch was not done at the kill
    assert all(len(at_kill[rank]) < epochs[rank] for rank in stopped), (at_kill, epochs)
