"""DeepSpeedEngine's trainable state: gather -> restore into a fresh engine -> identical next step.

Real DeepSpeed (CPU accelerator, gloo, one process) at ZeRO 0, 1 and 2.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist

from harma.config import LossConfig, ScheduleConfig, TrainConfig
from harma.model import build_model
from harma.model.backbone import build_tokenizer
from harma.train.engine import DeepSpeedEngine, deepspeed_config, prepare_deepspeed_env
from harma.train.optim import param_groups
from harma.train.step import train_step


@pytest.fixture(scope="module")
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _engine(tiny_model_config, stage: int, gpu_bf16_config: bool = False) -> DeepSpeedEngine:
    prepare_deepspeed_env(use_gpu=False, build_shm_op=False)
    import deepspeed

    model = build_model(tiny_model_config, seed=0)
    train = TrainConfig.model_validate({"batch_size": 4, "workers": {"min": 1, "max": 1},
                                        "deepspeed": {"zero_stage": stage}})
    optimizer = torch.optim.AdamW(param_groups(model, train.optimizer), lr=1e-2)
    ds_config = deepspeed_config(train, 1, True, "bf16") if gpu_bf16_config else deepspeed_config(train, 1, False, "fp32")
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                      dist_init_required=False)
    return DeepSpeedEngine(engine, model, total_steps=20, schedule=ScheduleConfig(), peak_lr=1e-2)


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.from_numpy(build_tokenizer("harma-tiny")(["one red ship", "two ponds", "a plane", "three trees"]))
    return {"image": torch.randn(4, 3, 48, 48, generator=g), "tokens": tokens,
            "image_id": torch.tensor([0, 1, 2, 3])}


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_state_round_trip_gives_the_same_next_step(process_group, tiny_model_config, stage):
    first = _engine(tiny_model_config, stage)
    for seed in range(3):
        train_step(first, _batch(seed), LossConfig())
    state = first.gather_state()
    assert int(state["__step__"][0]) == 3
    assert any(float(v.abs().sum()) > 0 for k, v in state.items() if k.startswith("exp_avg/"))

    second = _engine(tiny_model_config, stage)  # fresh weights and moments
    second.restore_state(state)
    again = second.gather_state()
    for key, value in state.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=key)
    assert second.lr == pytest.approx(first.lr)

    a = train_step(first, _batch(9), LossConfig())
    b = train_step(second, _batch(9), LossConfig())
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    for (name, p), (_, q) in zip(first.model.trainable_named_parameters(),
                                 second.model.trainable_named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_gpu_bf16_config_autocasts_the_forward_and_keeps_fp32_master_weights(process_group, tiny_model_config,
                                                                              stage):
    """The config GPU workers get (DeepSpeed's torch_autocast, bf16) is accepted by DeepSpeed at every
    ZeRO stage; here it runs on DeepSpeed's CPU accelerator, whose autocast is CPU bf16."""
    engine = _engine(tiny_model_config, stage, gpu_bf16_config=True)
    image_emb, text_emb = engine.embed(_batch(0)["image"], _batch(0)["tokens"])
    assert image_emb.dtype == text_emb.dtype == torch.bfloat16  # matmuls ran in bf16
    before = {n: p.detach().clone() for n, p in engine.model.trainable_named_parameters()}
    for seed in range(3):
        out = train_step(engine, _batch(seed), LossConfig())
    assert torch.isfinite(torch.tensor(out["loss"]))
    after = dict(engine.model.trainable_named_parameters())
    assert all(p.dtype == torch.float32 for p in after.values())  # master weights stay fp32
    assert all(not torch.equal(before[n], after[n]) for n in before)  # every trainable tensor moved
    state = engine.gather_state()
    assert int(state["__step__"][0]) == 3 and all(v.dtype == torch.float32 for k, v in state.items() if "/" in k)
