"""Shared fixtures: a tiny model config, a small generated dataset, an S3 store on loopback.

Tiers: tests/unit (no Ray, default), tests/ray (marked `ray`, one shared local cluster),
tests/gpu (marked `gpu`, skipped without CUDA; its Ray tests use the same `ray_cluster`).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Runs the tests train log to one MLflow store of the session's (an s3:// run would otherwise keep
# its runs in ./mlruns, the repository); tests/unit/test_tracking.py clears these for its own.
if "MLFLOW_TRACKING_URI" not in os.environ:
    os.environ["MLFLOW_TRACKING_URI"] = Path(tempfile.mkdtemp(prefix="harma-mlflow-")).as_uri()
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"

REPO = Path(__file__).resolve().parents[1]
ANNOTATIONS = REPO.parent / "shared" / "data" / "annotations"


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_config():
    from harma.config import ModelConfig

    return ModelConfig.model_validate({
        "backbone": {"arch": "harma-tiny"},
        "adapter": {"rank": 16, "heads": 4, "mini_rank": 8, "mini_heads": 4},
    })


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> str:
    """A small generated dataset (40 downstream + 16 pre-training images), made once."""
    from harma.data.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(str(root), images=40, seed=7, pretrain_images=16)
    return str(root)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 endpoint on 127.0.0.1 with real credentials; env vars set for the session."""
    from s3server import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3_server):
    """`ray.init` with 8 logical CPUs (and the machine's GPUs), so Train workers and Ray Data tasks
    never starve on 2 cores. Started after the S3 store, so every Ray process has its settings in
    its environment, as a real cluster's nodes do (jobs and Serve apps started later by other
    drivers read S3 too)."""
    import ray

    if "RAY_TMPDIR" not in os.environ:
        # Short: Ray's unix socket paths under it must stay below 108 bytes.
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="hr-")
    from harma.train.driver import ensure_ray

    ensure_ray(num_cpus=8)
    yield
    ray.shutdown()
