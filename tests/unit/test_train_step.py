"""The shared training step, the optimizer groups and the learning-rate schedule."""

import pytest
import torch

from harma.config import LossConfig, OptimizerConfig, ScheduleConfig
from harma.model import build_model
from harma.model.backbone import build_tokenizer
from harma.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from harma.train.step import TorchEngine, train_step


def test_schedule_warms_up_then_decays_linearly():
    cfg = ScheduleConfig(warmup_fraction=0.1, min_lr_fraction=0.0)
    factors = [lr_factor(s, 100, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert factors[55] == pytest.approx(1 - 45 / 90)
    assert factors[99] == pytest.approx(1 / 90)
    floor = ScheduleConfig(warmup_fraction=0.0, min_lr_fraction=0.2)
    assert lr_factor(0, 10, floor) == pytest.approx(1.0)
    assert lr_factor(10, 10, floor) == pytest.approx(0.2)


def test_weight_decay_groups(tiny_model_config):
    model = build_model(tiny_model_config)
    groups = param_groups(model, OptimizerConfig(weight_decay=0.04))
    decayed = {id(p) for p in groups[0]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("bias" not in names[i] for i in decayed)
    assert id(model.temperature) in decayed  # the paper code decays gates and temperature
    no_scalars = param_groups(model, OptimizerConfig(decay_scalars=False))
    assert id(model.temperature) not in {id(p) for p in no_scalars[0]["params"]}


def test_train_step_lowers_the_loss_and_touches_only_trainable_weights(tiny_model_config):
    torch.manual_seed(0)
    model = build_model(tiny_model_config, seed=0)
    backbone_before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    opt_cfg = OptimizerConfig(lr=1e-2)
    optimizer = build_optimizer(model, opt_cfg)
    engine = TorchEngine(model, optimizer, build_scheduler(optimizer, 30, ScheduleConfig(warmup_fraction=0)))
    tokens = torch.from_numpy(build_tokenizer("harma-tiny")([f"{n} red ships" for n in ("one", "two", "three", "four")] * 2))
    batch = {"image": torch.randn(8, 3, 48, 48), "tokens": tokens,
             "image_id": torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])}
    losses = [train_step(engine, batch, LossConfig())["loss"] for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    after = model.clip.state_dict()
    assert all(torch.equal(backbone_before[k], after[k]) for k in after)
    metrics = train_step(engine, batch, LossConfig())
    assert set(metrics) == {"loss", "contrastive", "triplet", "uniformity", "lr", "temperature", "same_image_share"}
    assert metrics["same_image_share"] == 0.0  # 8 distinct images
    shared = {**batch, "image_id": torch.tensor([0, 0, 2, 3, 4, 4, 4, 7])}
    assert train_step(engine, shared, LossConfig())["same_image_share"] == 5 / 8


def test_non_finite_loss_stops_with_a_clear_message(tiny_model_config):
    model = build_model(tiny_model_config, seed=0)
    optimizer = build_optimizer(model, OptimizerConfig())
    engine = TorchEngine(model, optimizer, build_scheduler(optimizer, 5, ScheduleConfig()))
    with torch.no_grad():
        model.temperature.fill_(0.0)  # logits / 0 -> inf
    tokens = torch.from_numpy(build_tokenizer("harma-tiny")(["a", "b"]))
    batch = {"image": torch.randn(2, 3, 48, 48), "tokens": tokens, "image_id": torch.tensor([0, 1])}
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train_step(engine, batch, LossConfig())
