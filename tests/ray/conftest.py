"""The Ray tier: one local Ray cluster for the whole session (explicit logical CPUs)."""

import os
import tempfile

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/ray/" in str(item.fspath):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """`ray.init` with 8 logical CPUs, so Train workers and Ray Data tasks never starve on 2 cores."""
    import ray

    if "RAY_TMPDIR" not in os.environ:
        # Short: Ray's unix socket paths under it must stay below 108 bytes.
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="hr-")
    from harma.train.driver import ensure_ray

    ensure_ray(num_cpus=8)
    yield
    ray.shutdown()
