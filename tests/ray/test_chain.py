"""The shipped synth job files chained on the S3 store, as a user runs them:

    harma train --config jobs/train_synth.yaml -> harma eval --config jobs/eval_synth.yaml
    -> harma index build --config jobs/index_synth.yaml -> harma serve serve_configs/local.yaml

Only the storage prefixes (and the test's small sizes) are overridden; every later step names the
run's published best-on-val checkpoint, <output_dir>/<name>/best. The run's reported test scores
equal `harma eval`'s of the same checkpoint exactly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from harma.cli import main
from harma.data.prepare import prepare_dataset

sys.path.insert(0, str(Path(__file__).parent))
from console_lines import foreign_lines, harma_lines  # noqa: E402
from test_serve import shipped_local_service  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BEST = "s3://chain-runs/runs/synth-adapt/best"


SUMMARY_LINES = (r"^$", r"^ +I2T R@1", r"^best val ", r"^test \(best on val\) ", r"^\d+ steps on \d+ worker",
                 r"^best checkpoint: ", r"^report: ")


@pytest.mark.ray
def test_train_eval_index_serve_chain_from_the_shipped_files_on_s3(ray_cluster, s3_server, synth_root, tmp_path,
                                                                    capsys):
    """The shipped synth files chained on the S3 store: `harma train` (run as a user runs it, its
    console harma's progress and summary only: Ray's internals stay in Ray's log files) -> `harma
    eval` of its published best -> `harma index build` -> `harma serve`."""
    import os

    import ray
    from harma import storage

    s3_server.create_bucket("chain-data")
    s3_server.create_bucket("chain-runs")
    prepare_dataset(synth_root, "s3://chain-data/synth", ["train", "val", "test"])
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.run(
        [sys.executable, "-m", "harma", "train", "--config", str(REPO / "jobs" / "train_synth.yaml"),
         "run.output_dir=s3://chain-runs/runs", "data.prepared_uri=s3://chain-data/synth",
         "model.backbone.weights_uri=null", "train.epochs=2", "train.batch_size=16", "train.log_every=4",
         "train.workers.min=2", "train.workers.max=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = proc.stdout + proc.stderr
    foreign = foreign_lines(printed, SUMMARY_LINES)
    assert foreign == [], "\n".join(foreign)
    harma = harma_lines(printed)
    assert sum("[harma] step " in line for line in harma) >= 4  # the workers' progress reached the console
    assert sum("[harma] epoch " in line and "val mR" in line for line in harma) == 2
    assert any("Ray's own logs: " in line for line in harma)
    assert "\x1b[" not in printed and "Reporting training result" not in printed

    report = json.loads(storage.read_bytes("s3://chain-runs/runs/synth-adapt/report/metrics.json"))
    assert report["best_checkpoint"] == BEST and report["best_source"].startswith("s3://chain-runs/runs/synth-adapt/checkpoint_")
    for name in ("config.yaml", "adapter.safetensors"):  # published: the same bytes as its source
        assert storage.read_bytes(f"{BEST}/{name}") == storage.read_bytes(f"{report['best_source']}/{name}")

    out = tmp_path / "eval.json"
    assert main(["eval", "--config", str(REPO / "jobs" / "eval_synth.yaml"), f"eval.checkpoint_uri={BEST}",
                 "eval.prepared_uri=s3://chain-data/synth", f"eval.out={out}"]) == 0
    evaluated = json.loads(out.read_text())
    assert evaluated["metrics"] == report["test"]  # the run's test report is harma eval's, exactly

    assert main(["index", "build", "--config", str(REPO / "jobs" / "index_synth.yaml"), f"index.checkpoint_uri={BEST}",
                 "index.corpus_uri=s3://chain-data/synth", "index.output_uri=s3://chain-runs/index-synth"]) == 0
    capsys.readouterr()

    with shipped_local_service(BEST, "s3://chain-runs/index-synth") as url:
        hits = requests.post(url + "v1/text-to-images", json={"text": "a red ship", "k": 3}, timeout=30).json()
        info = requests.get(url + "v1/info", timeout=30).json()
    assert len(hits["results"]) == 3
    assert info["checkpoint_uri"] == BEST

    # The run in MLflow, read back with MLflow's own client (the session's store, conftest).
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.info.run_name == "synth-adapt" and r.data.tags.get("harma.best_checkpoint") == BEST]
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["train.batch_size"] == "16" and run.data.params["run.output_dir"] == "s3://chain-runs/runs"
    assert run.data.metrics["test_mr"] == pytest.approx(report["test"]["mr"])
    val = [m.value for m in client.get_metric_history(run.info.run_id, "val_mr")]
    assert len(val) == 2  # one per epoch
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} >= {"report/training.png",
                                                                                "report/metrics.json"}

