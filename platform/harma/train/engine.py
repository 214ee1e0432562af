"""DeepSpeed behind the small Engine interface of `train.step`, and its config derived from ours.

`deepspeed_config()` is pure (no DeepSpeed import): our TrainConfig -> the DeepSpeed dict. There is
no hand-written DeepSpeed JSON anywhere. `DeepSpeedEngine` wraps `deepspeed.initialize`'s engine:
the learning rate follows `optim.lr_factor` of the global step (world-size independent), and the
trainable state (fp32 weights, Adam moments, step) can be gathered into one world-size-independent
dict and put back on any number of workers: ZeRO shards cannot be re-sharded, but this state is
small.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from harma.config import ScheduleConfig, TrainConfig
from harma.model.harma import HarmaModel
from harma.train.optim import lr_factor

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def deepspeed_config(train: TrainConfig, world_size: int, use_gpu: bool, precision: str) -> dict[str, Any]:
    """The DeepSpeed config for `world_size` workers sharing the global batch `train.batch_size`.

    Raises:
        ValueError: the global batch does not split evenly over the workers.
    """
    if train.batch_size % world_size:
        raise ValueError(f"train.batch_size {train.batch_size} does not split over {world_size} workers")
    cfg: dict[str, Any] = {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": train.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": train.deepspeed.zero_stage},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        if use_gpu:
            # DeepSpeed's torch_autocast keeps fp32 master weights and runs matmuls in bf16; its bf16
            # section would cast the whole model (and fails on 0-dim parameters on GPU).
            cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        else:
            cfg["bf16"] = {"enabled": True}
    return cfg


def prepare_deepspeed_env(use_gpu: bool, build_shm_op: bool) -> None:
    """Environment DeepSpeed needs before its import; optionally skip the CPU shm op JIT build.

    The accelerator follows the worker's kind, whatever the driver's environment forwarded: a GPU
    worker that inherited `DS_ACCELERATOR=cpu` (as CPU test runs set it) would train on its CPU.
    """
    os.environ["DS_ACCELERATOR"] = "cuda" if use_gpu else "cpu"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/harma/torch_extensions"))
    if not build_shm_op:
        import deepspeed.ops

        # The op serves only DeepSpeed's inference all-reduce; building it costs ~1 min per fresh
        # environment. This private table is the only switch DeepSpeed 0.19 offers.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedEngine:
    """The DeepSpeed engine behind the Engine protocol of `train.step`."""

    def __init__(self, engine, model: HarmaModel, total_steps: int, schedule: ScheduleConfig, peak_lr: float):
        self.engine, self.model = engine, model
        self.total_steps, self.schedule, self.peak_lr = total_steps, schedule, peak_lr
        self.global_step = 0
        self._apply_lr()

    @property
    def _optimizer(self):
        return self.engine.optimizer

    def _apply_lr(self) -> None:
        lr = self.peak_lr * lr_factor(self.global_step, self.total_steps, self.schedule)
        for group in self._optimizer.param_groups:
            group["lr"] = lr

    @property
    def lr(self) -> float:
        return float(self._optimizer.param_groups[0]["lr"])

    def embed(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.engine(images, tokens)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()
        self.global_step += 1
        self._apply_lr()

    # --- world-size-independent trainable state ------------------------------------------------
    def _base_optimizer(self) -> torch.optim.Optimizer:
        opt = self._optimizer
        return getattr(opt, "optimizer", opt)

    def gather_state(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights and Adam moments of every trainable parameter, plus the step.

        Collective under ZeRO 1/2: every rank must call it.
        """
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._ensure_optimizer_state()
        out: dict[str, torch.Tensor] = {"__step__": torch.tensor([self.global_step])}
        base = self._base_optimizer()
        for name, p in self.model.trainable_named_parameters():
            full = safe_get_full_fp32_param(p)
            if full is None:  # ZeRO stage 0: the optimizer holds the parameter itself
                out[f"param/{name}"] = p.detach().float().cpu().clone()
                state = base.state.get(p, {})
                for key in ADAM_KEYS:
                    out[f"{key}/{name}"] = (state[key] if key in state else torch.zeros_like(p)).float().cpu().clone()
            else:
                out[f"param/{name}"] = full.float().cpu().clone()
                for key in ADAM_KEYS:
                    out[f"{key}/{name}"] = safe_get_full_optimizer_state(p, key).float().cpu().clone()
        return out

    def _ensure_optimizer_state(self) -> None:
        """Give a fresh ZeRO 1/2 optimizer its Adam state, linked to the parameters.

        DeepSpeed creates the state lazily and links the per-parameter views of it only after its
        first step(), and then only for the param groups already stepped (0.19.8 links group 0
        alone, leaving the no-decay group unlinked); gathering and restoring need every group
        linked. This reaches into DeepSpeed's ZeRO
        optimizer (`single_partition_of_fp32_groups`, `_lazy_init_hp_params_optimizer_state`),
        the only way to do it in DeepSpeed 0.19.
        """
        zero = self._optimizer
        flats = getattr(zero, "single_partition_of_fp32_groups", None)
        if flats is None:
            return
        base = self._base_optimizer()
        for flat in flats:
            slot = base.state[flat]
            if "exp_avg" not in slot:
                slot["step"] = torch.tensor(0.0)
                slot["exp_avg"] = torch.zeros_like(flat)
                slot["exp_avg_sq"] = torch.zeros_like(flat)
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def restore_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put a gathered state back, on whatever number of workers this run has."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        step = int(state["__step__"][0])
        self._ensure_optimizer_state()
        base = self._base_optimizer()
        names = dict(self.model.trainable_named_parameters())
        missing = sorted(n for n in names if f"param/{n}" not in state)
        if missing:
            raise ValueError(f"trainer state lacks {len(missing)} parameter(s), e.g. {missing[0]}")
        for name, p in names.items():
            value = state[f"param/{name}"]
            if getattr(p, "_hp_mapping", None) is None and not hasattr(p, "ds_id"):
                with torch.no_grad():
                    p.copy_(value.to(p.dtype))
                slot = base.state.setdefault(p, {})
                for key in ADAM_KEYS:
                    slot[key] = state[f"{key}/{name}"].to(p.device, torch.float32).clone()
                slot["step"] = torch.tensor(float(step))
            else:
                safe_set_full_fp32_param(p, value.to(p.device))
                for key in ADAM_KEYS:
                    safe_set_full_optimizer_state(p, state[f"{key}/{name}"].to(p.device), key)
                with torch.no_grad():
                    p.copy_(value.to(p.dtype))
        for slot in base.state.values():
            if "step" in slot:
                slot["step"] = torch.tensor(float(step)) if torch.is_tensor(slot["step"]) else step
        self.global_step = step
        self._apply_lr()
