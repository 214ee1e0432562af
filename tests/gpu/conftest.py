"""The GPU tier: CUDA paths of training and serving. Skipped where CUDA is missing (tests/conftest.py).

On a CUDA machine with the project installed:   pytest tests/gpu
On the device machine (no venv; Ray, DeepSpeed and open_clip from the kit):  benchmarks/gpu_suite.sh tests
"""

import os
import tempfile

import pytest


@pytest.fixture(scope="session")
def ray_gpu_cluster():
    """A local Ray cluster with the machine's GPUs and 8 logical CPUs."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import ray

    if "RAY_TMPDIR" not in os.environ:
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="hr-")  # short: socket paths < 108 bytes
    from harma.train.driver import ensure_ray

    ensure_ray(num_cpus=8)
    yield
    ray.shutdown()
