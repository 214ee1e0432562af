"""The training step: one function shared by the local loop and the Ray Train workers.

    metrics = train_step(engine, batch, loss_cfg)

`engine` hides what updates the weights: `TorchEngine` (a plain optimizer, here) or the
DeepSpeed-wrapped model on Ray Train workers; both offer `embed`, `backward`, `step`, `lr` and
`model`. The loss is computed over the global batch (see `harma.model.losses`).
"""

from __future__ import annotations

from typing import Protocol

import torch

from harma.config import LossConfig
from harma.data.composition import same_image_share
from harma.model.harma import HarmaModel
from harma.model.losses import gather_ids, harma_loss


class Engine(Protocol):
    model: HarmaModel

    def embed(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

    @property
    def lr(self) -> float: ...


class TorchEngine:
    """A plain PyTorch optimizer + LR scheduler behind the Engine interface."""

    def __init__(self, model: HarmaModel, optimizer: torch.optim.Optimizer, scheduler, grad_clip: float | None = None):
        self.model, self.optimizer, self.scheduler, self.grad_clip = model, optimizer, scheduler, grad_clip

    def embed(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(images, tokens)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.grad_clip:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def train_step(engine: Engine, batch: dict[str, torch.Tensor], loss_cfg: LossConfig) -> dict[str, float]:
    """One optimizer step on a batch {"image": (b,3,H,W), "tokens": (b,ctx), "image_id": (b,)}.

    Returns:
        {"loss", "contrastive", "triplet", "uniformity", "lr", "temperature", "same_image_share"}
        as floats; the lr is the one this step used; same_image_share: the share of the global
        batch's samples that another caption of their own image shares it with
        (`harma.data.composition`).
    """
    engine.model.train()
    lr = engine.lr
    image_emb, text_emb = engine.embed(batch["image"], batch["tokens"])
    parts = harma_loss(image_emb.float(), text_emb.float(), batch["image_id"],
                       engine.model.temperature.float(), loss_cfg)
    if not torch.isfinite(parts["loss"]):
        raise FloatingPointError(f"non-finite loss {float(parts['loss'].detach())}; lower the learning rate")
    engine.backward(parts["loss"])
    engine.step()
    out = {k: float(v.detach()) for k, v in parts.items()}
    out["lr"] = lr
    out["temperature"] = float(engine.model.temperature.detach().float()[0])
    out["same_image_share"] = same_image_share(gather_ids(batch["image_id"]).cpu().numpy())
    return out
