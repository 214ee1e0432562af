"""deepspeed_config arithmetic, ZeRO/precision mapping and the accelerator choice (no DeepSpeed import)."""

import os

import pytest

from harma.config import TrainConfig
from harma.train.engine import deepspeed_config


def _train(**kw):
    return TrainConfig.model_validate(kw)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_batch_split_and_zero_stage(stage):
    cfg = deepspeed_config(_train(batch_size=128, deepspeed={"zero_stage": stage}), 4, False, "fp32")
    assert cfg["train_batch_size"] == 128
    assert cfg["train_micro_batch_size_per_gpu"] == 32
    assert cfg["gradient_accumulation_steps"] == 1
    assert cfg["zero_optimization"] == {"stage": stage}
    assert "bf16" not in cfg and "torch_autocast" not in cfg and "optimizer" not in cfg


def test_bf16_uses_torch_autocast_on_gpu_and_bf16_on_cpu():
    gpu = deepspeed_config(_train(batch_size=64), 2, True, "bf16")
    assert gpu["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in gpu
    cpu = deepspeed_config(_train(batch_size=64), 2, False, "bf16")
    assert cpu["bf16"] == {"enabled": True} and "torch_autocast" not in cpu


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
