"""CUDA paths: validation and query encoding on the GPU agree with the CPU; search on the GPU.

    pytest tests/gpu/test_cuda_paths.py      # skipped without CUDA
"""

import numpy as np
import pytest
import torch

from harma.config import PlatformConfig
from harma.model.checkpoint import save_checkpoint
from harma.model.harma import build_model
from harma.serve.encoder import QueryEncoder
from harma.serve.index import search_batch
from harma.train.evaluate import embed_split

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def exact_fp32():
    """No TF32 in these comparisons: GPU and CPU should then agree to fp32 rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _inputs(model, n=6):
    rng = np.random.default_rng(0)
    size = model.arch.image_size
    images = rng.normal(size=(n, 3, size, size)).astype(np.float32)
    tokens = rng.integers(1, 400, size=(n, model.arch.context_length)).astype(np.int64)
    return images, tokens


def test_validation_embeds_on_the_models_device(tiny_model_config):
    model = build_model(tiny_model_config, seed=0)
    images, tokens = _inputs(model)
    cpu_img, cpu_txt = embed_split(model, images, tokens, batch_size=4)
    gpu_img, gpu_txt = embed_split(model.cuda(), images, tokens, batch_size=4)
    assert isinstance(gpu_img, np.ndarray) and gpu_img.shape == cpu_img.shape
    np.testing.assert_allclose(gpu_img, cpu_img, atol=1e-4)
    np.testing.assert_allclose(gpu_txt, cpu_txt, atol=1e-4)


def test_query_encoder_and_search_on_cuda_match_the_cpu(tmp_path, tiny_model_config):
    cfg = PlatformConfig(model=tiny_model_config)
    save_checkpoint(str(tmp_path / "ckpt"), build_model(cfg.model, seed=0), cfg, {})
    on_gpu, on_cpu = QueryEncoder(str(tmp_path / "ckpt"), "cuda"), QueryEncoder(str(tmp_path / "ckpt"), "cpu")
    assert on_gpu.device.type == "cuda"
    assert on_gpu.towers == on_cpu.towers == {"text": "traced", "image": "traced"}  # graphs agree with eager
    texts = ["two bridges over a river", "storage tanks next to farmland"]
    np.testing.assert_allclose(on_gpu.encode_texts(texts).cpu().numpy(), on_cpu.encode_texts(texts).numpy(), atol=1e-4)
    pixels = np.random.default_rng(1).integers(0, 256, (3, 3, on_cpu.image_size, on_cpu.image_size), dtype=np.uint8)
    np.testing.assert_allclose(on_gpu.encode_pixels(pixels).cpu().numpy(), on_cpu.encode_pixels(pixels).numpy(),
                               atol=1e-4)
    gallery = torch.nn.functional.normalize(torch.randn(1000, on_cpu.embed_dim), dim=1)
    queries = on_cpu.encode_texts(texts)
    mask = np.zeros(1000, bool)
    mask[::3] = True
    found_cpu = search_batch(queries, gallery, [5, 10], [None, mask])
    found_gpu = search_batch(queries.cuda(), gallery.cuda(), [5, 10], [None, mask])
    for (values_c, rows_c), (values_g, rows_g) in zip(found_cpu, found_gpu, strict=True):
        assert rows_g == rows_c
        np.testing.assert_allclose(values_g, values_c, atol=1e-5)
    assert all(r % 3 == 0 for r in found_gpu[1][1])
