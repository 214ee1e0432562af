"""The training driver's checks before any worker starts, and its step plan (no Ray started)."""

import os
from types import SimpleNamespace

import pytest

from harma.config import PlatformConfig
from harma.data.annotations import read_annotations
from harma.data.synth import synthesize
from harma.train.driver import PreflightError, plan_steps, preflight


def test_plan_steps_from_epochs_or_steps():
    cfg = PlatformConfig().with_overrides({"train.batch_size": 16, "train.epochs": 3})
    assert plan_steps(cfg, 140) == (24, 3)  # 140 // 16 = 8 steps per epoch
    cfg = PlatformConfig().with_overrides({"train.batch_size": 16, "train.steps": 20})
    assert plan_steps(cfg, 140) == (20, 3)
    with pytest.raises(PreflightError, match="fewer than train.batch_size"):
        plan_steps(cfg, 10)


def test_preflight_refuses_unusable_s3_before_any_worker(s3_server, monkeypatch):
    s3_server.create_bucket("preflight-data")
    cfg = PlatformConfig().with_overrides({"data.prepared_uri": "s3://no-such-bucket/synth",
                                           "run.output_dir": "s3://preflight-data/runs"})
    with pytest.raises(PreflightError, match="bucket 'no-such-bucket' does not exist"):
        preflight(cfg)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nope")
    with pytest.raises(PreflightError, match="credentials were rejected"):
        preflight(cfg.with_overrides({"data.prepared_uri": "s3://preflight-data/synth"}))
    with pytest.raises(PreflightError, match="data.prepared_uri is not set"):
        preflight(PlatformConfig())


def test_synth_writes_straight_to_s3(s3_server):
    s3_server.create_bucket("synth-out")
    synthesize("s3://synth-out/aerial", images=12, seed=1)
    entries = read_annotations("s3://synth-out/aerial/annotations/val.json")
    assert len(entries) == 2 and all(len(e.captions) == 5 for e in entries)


def test_local_paths_become_absolute_and_missing_weights_stop_early(tmp_path, monkeypatch):
    from harma.train.driver import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = PlatformConfig().with_overrides({"run.output_dir": "runs", "data.prepared_uri": "store/x",
                                           "model.backbone.weights_uri": "demo/base.safetensors"})
    absolute = with_absolute_paths(cfg)
    assert absolute.run.output_dir == str(tmp_path / "runs")
    assert absolute.model.backbone.weights_uri == str(tmp_path / "demo" / "base.safetensors")
    keep = PlatformConfig().with_overrides({"data.prepared_uri": "s3://b/p"})
    assert with_absolute_paths(keep).data.prepared_uri == "s3://b/p"
    (tmp_path / "store" / "x").mkdir(parents=True)
    with pytest.raises(PreflightError, match="weights_uri .*base.safetensors: no such file"):
        preflight(absolute)


@pytest.mark.parametrize("preset, expected", [(None, "24"), ("7", "7")])
def test_a_local_cluster_keeps_four_idle_workers_per_logical_cpu(monkeypatch, preset, expected):
    # Ray's default (one per CPU) ended Ray Data's surplus worker processes between epochs, and
    # every epoch paid new processes importing torch again.
    import ray
    from harma.serve import ingress
    from harma.train import driver

    started = {}
    monkeypatch.setattr(os, "environ", dict(os.environ))  # nothing ensure_ray sets outlives the test
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    def fake_init(**kw):
        started.update(kw, limit=os.environ.get(driver.WORKER_LIMIT_VAR))
        return SimpleNamespace(address_info={})  # what ensure_ray reads of ray.init's context

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ingress, "ensure_fast_ingress", lambda: None)
    if preset is None:
        monkeypatch.delenv(driver.WORKER_LIMIT_VAR, raising=False)
    else:
        monkeypatch.setenv(driver.WORKER_LIMIT_VAR, preset)
    driver.ensure_ray(num_cpus=6)
    assert _raylet_reads_env_var(driver.WORKER_LIMIT_VAR)  # else the limit is set and never read
    assert started["num_cpus"] == 6 and started["limit"] == expected


def _raylet_reads_env_var(name: str) -> bool:
    """Whether the raylet executable Ray starts holds `name` as a whole string.

    Ray's C++ config reads each entry `x` from the environment variable `RAY_x`, the name spelt out
    as a NUL-terminated literal in the binary (src/ray/common/ray_config.h); no Python API lists them.
    """
    import mmap

    from ray._private.services import RAYLET_EXECUTABLE

    with open(RAYLET_EXECUTABLE, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as binary:
        return binary.find(b"\0" + name.encode() + b"\0") >= 0


def test_the_raylet_check_tells_a_read_variable_from_a_made_up_one():
    assert _raylet_reads_env_var("RAY_num_workers_soft_limit")
    assert not _raylet_reads_env_var("RAY_num_workers_soft_limit_typo")
    assert not _raylet_reads_env_var("RAY_num_workers_soft_limi")
