"""deepspeed_config read back through DeepSpeed's own config parser: global batch, ZeRO stage and
precision as DeepSpeed understands them on N workers; and the accelerator choice."""

import os

import pytest

from harma.config import TrainConfig
from harma.train.engine import deepspeed_config


def _train(**kw):
    return TrainConfig.model_validate(kw)


def _parsed(ds_config: dict, world_size: int, monkeypatch):
    """DeepSpeed's own parse of `ds_config` as a run of `world_size` data-parallel workers sees it."""
    import deepspeed.runtime.config as ds

    class DataParallel:  # DeepSpeed's "mpu": the data-parallel world size, without a process group
        @staticmethod
        def get_data_parallel_world_size():
            return world_size

    monkeypatch.setattr(ds.dist, "get_rank", lambda: 0)  # else DeepSpeed assumes 1 worker
    return ds.DeepSpeedConfig(ds_config, mpu=DataParallel())


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_reads_our_global_batch_and_zero_stage_on_any_worker_count(monkeypatch, stage):
    for batch, world in ((128, 1), (128, 2), (128, 4), (128, 8), (96, 3), (16, 16)):
        parsed = _parsed(deepspeed_config(_train(batch_size=batch, deepspeed={"zero_stage": stage}), world,
                                          False, "fp32"), world, monkeypatch)
        assert parsed.world_size == world
        # What every optimizer step sums over is our global batch, whatever the worker count.
        assert parsed.train_batch_size == batch
        assert parsed.train_micro_batch_size_per_gpu * parsed.gradient_accumulation_steps * world == batch
        assert parsed.gradient_accumulation_steps == 1  # one micro-batch per step: our loop steps each
        assert parsed.zero_optimization_stage == stage and parsed.zero_enabled == (stage > 0)
        assert not parsed.bfloat16_config.enabled and not parsed.torch_autocast_enabled
        assert parsed.optimizer_name is None  # ours (AdamW over our param groups), not DeepSpeed's
    # The same config on a wrong worker count is one DeepSpeed refuses: the split is per world size.
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):
        _parsed(deepspeed_config(_train(batch_size=128), 4, False, "fp32"), 2, monkeypatch)


def test_bf16_uses_torch_autocast_on_gpu_and_bf16_on_cpu(monkeypatch):
    import torch

    gpu = _parsed(deepspeed_config(_train(batch_size=64), 2, True, "bf16"), 2, monkeypatch)
    assert gpu.torch_autocast_enabled and gpu.torch_autocast_dtype == torch.bfloat16
    assert not gpu.bfloat16_config.enabled  # it would cast the whole model, fp32 masters included
    cpu = _parsed(deepspeed_config(_train(batch_size=64), 2, False, "bf16"), 2, monkeypatch)
    assert cpu.bfloat16_config.enabled and not cpu.torch_autocast_enabled
    fp32 = _parsed(deepspeed_config(_train(batch_size=64), 2, True, "fp32"), 2, monkeypatch)
    assert not fp32.bfloat16_config.enabled and not fp32.torch_autocast_enabled


def test_uneven_split_is_refused():
    with pytest.raises(ValueError, match="does not split over 3 workers"):
        deepspeed_config(_train(batch_size=64), 3, False, "fp32")


def test_zero_stage_3_is_not_offered():
    with pytest.raises(Exception, match="zero_stage"):
        _train(deepspeed={"zero_stage": 3})


@pytest.mark.parametrize(("use_gpu", "expected"), [(True, "cuda"), (False, "cpu")])
def test_deepspeed_accelerator_follows_the_worker_not_the_forwarded_env(monkeypatch, use_gpu, expected):
    from harma.train.engine import prepare_deepspeed_env

    monkeypatch.setenv("DS_ACCELERATOR", "cpu" if use_gpu else "cuda")  # what a driver may forward
    prepare_deepspeed_env(use_gpu, build_shm_op=True)
    assert os.environ["DS_ACCELERATOR"] == expected
