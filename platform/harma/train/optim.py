"""AdamW parameter groups and the warm-up + linear-decay schedule (pure, no Ray).

Weight decay follows the paper code: every trainable parameter whose name lacks "bias" decays
(adapter weights, attention in-projections and, unless `decay_scalars` is off, the gates and the
temperature); biases do not.
"""

from __future__ import annotations

import torch
from torch import nn

from harma.config import OptimizerConfig, ScheduleConfig


def param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_scalar = p.numel() == 1
        if "bias" in name or (is_scalar and not cfg.decay_scalars):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_factor(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, linear decay.

    The schedule is sized on the steps actually run, so it ends at `min_lr_fraction` (the paper
    code sizes it with ceil while dropping the last batch, and never quite reaches the end).
    """
    warmup = int(round(cfg.warmup_fraction * total_steps))
    if warmup and step < warmup:
        return (step + 1) / warmup
    remaining = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / remaining)
    return cfg.min_lr_fraction + (1 - cfg.min_lr_fraction) * (1 - progress)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: ScheduleConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))
