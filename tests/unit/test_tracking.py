"""tracking: runs and sweeps written through harma.tracking, read back with MLflow's own client."""

import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from harma import tracking
from harma.config import PlatformConfig


@pytest.fixture(autouse=True)
def clean_mlflow_env(monkeypatch):
    """No tracking settings leak in from the shell or out of a test. setenv-then-delenv makes
    monkeypatch restore 'unset' afterwards, even for MLFLOW_ALLOW_FILE_STORE, which the module
    itself sets for the local default store."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE",
                "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def warnings_of(caplog):
    return [r for r in caplog.records if r.name == "harma.tracking" and r.levelno == logging.WARNING]


HISTORY = [
    {"step": 0, "val_mr": 10.0, "val_r1": 2.0},
    {"step": 3, "epoch": 0, "loss": 4.5, "bad_images": ["x.jpg"], "note": "text"},
    {"step": 6, "epoch": 1, "loss": 3.0, "val_mr": 20.0, "val_r1": 5.0},
    {"step": 9, "epoch": 1, "loss": 2.5},
    {"step": 12, "epoch": 2, "loss": 2.0, "val_mr": 30.5, "val_r1": 7.5},
]


def test_flatten_config_is_dotted_and_mlflow_shaped():
    flat = tracking.flatten_config({"a": {"b": 1, "c": {"d": None}}, "e": [0.9, 0.98], "f": {},
                                    "g": True, "h": "x" * 7000})
    assert flat["a.b"] == "1" and flat["a.c.d"] == "None" and flat["e"] == "[0.9, 0.98]"
    assert flat["f"] == "{}" and flat["g"] == "True"
    assert len(flat["h"]) == 6000


def test_run_round_trip(tmp_path):
    cfg = PlatformConfig().with_overrides({"model.adapter.rank": 32, "train.optimizer.lr": 3e-4})
    run_dir = str(tmp_path / "runs" / "demo")
    assert tracking.tracking_uri(run_dir) == (tmp_path / "runs" / "demo" / "mlruns").as_uri()
    png, table = b"\x89PNG\r\n\x1a\nfake", tmp_path / "table.txt"
    table.write_bytes(b"mR 30.5\n")
    with tracking.start_run(cfg.to_dict(), run_dir, "demo") as tracker:
        assert tracker.active
        tracker.log_epoch(HISTORY[0], step=0)  # live, then the whole history: no duplicates
        tracker.log_history(HISTORY)
        tracker.log_report({"training.png": png, "table.txt": str(table)})
        tracker.finish(f"{run_dir}/checkpoint_000002", {"test_mr": 28.0})
    assert not tracker.active

    c = client(tracker.tracking_uri)
    run = c.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "demo"
    flat = tracking.flatten_config(cfg.to_dict())
    assert run.data.params == flat
    assert run.data.params["model.adapter.rank"] == "32"
    assert run.data.params["train.optimizer.lr"] == "0.0003"
    for key in ("loss", "val_mr", "val_r1", "epoch"):
        want = [(r["step"], float(r[key])) for r in HISTORY if key in r]
        got = sorted((m.step, m.value) for m in c.get_metric_history(tracker.run_id, key))
        assert got == want, key
    assert "bad_images" not in run.data.metrics and "note" not in run.data.metrics
    assert [(m.step, m.value) for m in c.get_metric_history(tracker.run_id, "test_mr")] == [(12, 28.0)]
    assert run.data.tags[tracking.TAG_BEST_CHECKPOINT] == f"{run_dir}/checkpoint_000002"
    assert run.data.tags[tracking.TAG_RUN_DIR] == run_dir
    listed = {f.path: f.file_size for f in c.list_artifacts(tracker.run_id, "report")}
    assert listed == {"report/training.png": len(png), "report/table.txt": 8}
    local = Path(c.download_artifacts(tracker.run_id, "report", str(tmp_path / "dl")))
    assert (local / "training.png").read_bytes() == png
    assert (local / "table.txt").read_bytes() == b"mR 30.5\n"


def test_crashed_run_resumes_in_the_same_mlflow_run(tmp_path):
    cfg = PlatformConfig().to_dict()
    run_dir = str(tmp_path / "demo")
    with pytest.raises(RuntimeError), tracking.start_run(cfg, run_dir, "demo") as first:
        first.log_history(HISTORY[:3])
        raise RuntimeError("worker died")
    c = client(first.tracking_uri)
    assert c.get_run(first.run_id).info.status == "FAILED"
    changed = PlatformConfig().with_overrides({"train.optimizer.lr": 1e-3}).to_dict()
    with tracking.start_run(changed, run_dir, "demo") as second:
        assert second.run_id == first.run_id
        second.log_history(HISTORY)  # the resumed loop's history starts from the beginning
        second.finish("best")
    run = c.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.optimizer.lr"] == tracking.flatten_config(cfg)["train.optimizer.lr"]
    assert [m.step for m in c.get_metric_history(first.run_id, "loss")] == [3, 6, 9, 12]
    # A finished run is not continued: the next run of that name is a new MLflow run.
    third = tracking.start_run(cfg, run_dir, "demo")
    assert third.run_id != first.run_id
    third.finish()


def test_sweep_parent_with_two_children(tmp_path):
    base = PlatformConfig().to_dict()
    sweep_dir = str(tmp_path / "sweep")
    parent = tracking.start_run(base, sweep_dir, "sweep", kind="sweep")
    children = []
    for rank in (8, 16):
        trial_cfg = PlatformConfig().with_overrides({"model.adapter.rank": rank}).to_dict()
        # The ref is what crosses into a Tune trial: a plain dict.
        child = tracking.start_run(trial_cfg, f"{sweep_dir}/trials/r{rank}", f"sweep-r{rank}",
                                   parent=dict(parent.ref()))
        child.log_history(HISTORY)
        child.finish(f"{sweep_dir}/trials/r{rank}/checkpoint_000002", {"test_mr": float(rank)})
        children.append(child)
    parent.log_report({"val_mr_vs_params.png": b"png"}, artifact_path="summary")
    parent.finish(children[1].run_dir + "/checkpoint_000002", {"best_val_mr": 30.5})

    c = client(parent.tracking_uri)
    assert all(ch.tracking_uri == parent.tracking_uri for ch in children)
    assert not (tmp_path / "sweep" / "trials" / "r8" / "mlruns").exists()
    found = c.search_runs([parent.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.run_id}'")
    assert sorted(r.info.run_name for r in found) == ["sweep-r16", "sweep-r8"]
    for r in found:
        assert r.data.tags[tracking.TAG_KIND] == "trial"
        assert r.data.params["model.adapter.rank"] == r.info.run_name.split("-r")[1]
        assert r.data.metrics["val_mr"] == 30.5
    top = c.get_run(parent.run_id)
    assert top.data.tags[tracking.TAG_KIND] == "sweep" and "mlflow.parentRunId" not in top.data.tags
    assert [f.path for f in c.list_artifacts(parent.run_id, "summary")] == ["summary/val_mr_vs_params.png"]


def test_tracking_uri_env_wins(tmp_path, monkeypatch):
    elsewhere = (tmp_path / "server-store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the user's own file store: their opt-in
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team-harma")
    run_dir = str(tmp_path / "demo")
    assert tracking.tracking_uri(run_dir) == elsewhere
    assert tracking.tracking_uri("s3://bucket/runs/demo") == elsewhere
    tracker = tracking.start_run({"a": {"b": 1}}, run_dir, "demo")
    tracker.finish("best")
    assert tracker.tracking_uri == elsewhere and not (tmp_path / "demo" / "mlruns").exists()
    run = client(elsewhere).get_run(tracker.run_id)
    assert run.data.params == {"a.b": "1"}
    assert client(elsewhere).get_experiment(run.info.experiment_id).name == "team-harma"


def test_env_file_store_without_opt_in_warns(tmp_path, monkeypatch, caplog):
    """A user's own file-store URI gets MLflow's rules: no MLFLOW_ALLOW_FILE_STORE, no tracking."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "store").as_uri())
    tracker = tracking.start_run({"a": 1}, str(tmp_path / "demo"), "demo")
    assert not tracker.active and len(warnings_of(caplog)) == 1


def test_disabled_imports_nothing_and_writes_nothing(tmp_path):
    tracker = tracking.start_run({"a": 1}, str(tmp_path / "demo"), "demo", enabled=False)
    tracker.log_epoch({"loss": 1.0}, 1)
    tracker.log_report({"x.png": b"x"})
    tracker.finish("best", {"test_mr": 1.0})
    assert tracker.ref() is None and tracker.run_id is None
    assert not (tmp_path / "demo").exists()
    code = ("import sys; from harma import tracking; "
            f"tracking.start_run({{'a': 1}}, {str(tmp_path / 'demo')!r}, 'demo', enabled=False).finish(); "
            "assert 'mlflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unwritable_store_warns_once_and_never_raises(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the run folder's parent should be")
    with tracking.start_run({"a": 1}, str(blocker / "demo"), "demo") as tracker:
        tracker.log_epoch({"loss": 1.0}, 1)
        tracker.log_history(HISTORY)
        tracker.log_report({"x.png": b"x"})
        tracker.finish("best", {"test_mr": 1.0})
    assert not tracker.active and tracker.ref() is None
    assert len(warnings_of(caplog)) == 1
    assert "training carries on" in warnings_of(caplog)[0].getMessage()


def test_store_breaking_mid_run_warns_once(tmp_path, caplog):
    run_dir = tmp_path / "demo"
    tracker = tracking.start_run({"a": 1}, str(run_dir), "demo")
    assert tracker.active
    shutil.rmtree(run_dir / "mlruns")
    (run_dir / "mlruns").write_text("the store is gone")
    tracker.log_epoch({"loss": 1.0}, 1)
    tracker.log_epoch({"loss": 0.5}, 2)
    tracker.finish("best")
    assert not tracker.active and len(warnings_of(caplog)) == 1


def test_unreachable_server_fails_fast(tmp_path, monkeypatch, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the with-block ends: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    tracker = tracking.start_run({"a": 1}, str(tmp_path / "demo"), "demo")
    tracker.log_epoch({"loss": 1.0}, 1)
    tracker.finish()
    assert not tracker.active
    assert len(warnings_of(caplog)) == 1 and "no tracking server" in warnings_of(caplog)[0].getMessage()


def test_s3_run_dir_uses_local_store_and_s3_artifacts(s3_server, tmp_path, monkeypatch, caplog):
    s3_server.create_bucket("tracking")
    monkeypatch.chdir(tmp_path)
    run_dir = "s3://tracking/runs/demo"
    assert tracking.tracking_uri(run_dir) == (tmp_path / "mlruns").as_uri()
    assert any("is on S3" in r.getMessage() for r in warnings_of(caplog))
    tracker = tracking.start_run({"a": {"b": 1}}, run_dir, "demo")
    tracker.log_epoch({"loss": 1.0}, 1)
    tracker.log_report({"training.png": b"png-bytes"})
    tracker.finish(f"{run_dir}/checkpoint_000001")
    c = client(tracker.tracking_uri)
    run = c.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"a.b": "1"}
    assert run.info.artifact_uri.startswith(f"{run_dir}/{tracking.S3_ARTIFACTS}/")
    assert [f.path for f in c.list_artifacts(tracker.run_id, "report")] == ["report/training.png"]
    from harma import storage

    assert storage.read_bytes(f"{run.info.artifact_uri}/report/training.png") == b"png-bytes"
