"""HarmaModel: a frozen open_clip backbone with HarMA adapters and a learnable temperature.

    from harma.config import ModelConfig
    from harma.model import build_model
    model = build_model(ModelConfig(), seed=0)          # ViT-B-32, official layout
    img, txt = model(images, tokens)                     # L2-normalised (B, D) embeddings

Only adapters, gates and the temperature train unless `train_backbone` is set (used to pre-train
a base model). Adapters are created per instance under their own seed: two models built with the
same seed are identical, and building a model never touches the global random state.
"""

from __future__ import annotations

from collections.abc import Iterator

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from harma.config import ModelConfig
from harma.model.adapters import HarmaAdapters, Injection, text_key_padding_mask
from harma.model.backbone import ArchInfo, build_backbone

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class HarmaModel(nn.Module):
    """Image and text encoders of a CLIP model with HarMA adapters injected from outside."""

    def __init__(self, clip: open_clip.CLIP, arch: ArchInfo, cfg: ModelConfig, seed: int):
        super().__init__()
        self.clip = clip
        self.arch = arch
        self.cfg = cfg
        self.adapters: HarmaAdapters | None = None
        self._injection: Injection | None = None
        if cfg.adapter.kind == "harma":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.adapters = HarmaAdapters(
                    cfg.adapter,
                    image_width=arch.image_width,
                    image_layers=arch.image_layers,
                    text_width=arch.text_width,
                    text_layers=arch.text_layers,
                )
            self._injection = Injection(clip, self.adapters)
        self.temperature = nn.Parameter(torch.full((1,), float(cfg.temperature_init)))
        self.set_trainable()

    # --- what trains ---------------------------------------------------------------------------
    def set_trainable(self) -> None:
        """Freeze everything, then enable adapters + temperature (and the backbone if asked)."""
        self.requires_grad_(False)
        if self.adapters is not None:
            self.adapters.requires_grad_(True)
        self.temperature.requires_grad_(True)
        if self.cfg.train_backbone:
            self.clip.requires_grad_(True)
            self.clip.logit_scale.requires_grad_(False)  # unused: the temperature replaces it

    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> HarmaModel:
        super().train(mode)
        if not self.cfg.train_backbone:
            self.clip.eval()  # a frozen backbone stays in eval mode
        return self

    # --- encoders ------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, D) L2-normalised embeddings."""
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, context) token ids -> (B, D) L2-normalised embeddings."""
        if self._injection is not None:
            use_mask = self.adapters is not None and self.adapters.text_padding_mask
            self._injection.context["key_padding_mask"] = (
                text_key_padding_mask(tokens) if use_mask else None
            )
        try:
            return F.normalize(self.clip.encode_text(tokens), dim=-1)
        finally:
            if self._injection is not None:
                self._injection.context.pop("key_padding_mask", None)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(tokens)


def build_model(cfg: ModelConfig, seed: int = 0) -> HarmaModel:
    """Build the backbone (random or loaded weights), inject adapters, freeze what must not train.

    Random initialisation (backbone and adapters) depends only on `seed`; the global random state
    is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip, arch = build_backbone(cfg.backbone)
    model = HarmaModel(clip, arch, cfg, seed)
    return model.to(_DTYPES[cfg.backbone.precision])


def parameter_summary(model: HarmaModel) -> dict[str, int]:
    """Parameter counts: total, trainable and trainable per part (shared modules counted once)."""
    parts = {"image_adapters": 0, "text_adapters": 0, "mini_adapters": 0, "temperature": 0}
    backbone_trainable = 0
    for name, p in model.trainable_named_parameters():
        if name.startswith("adapters.image."):
            parts["image_adapters"] += p.numel()
        elif name.startswith("adapters.text."):
            parts["text_adapters"] += p.numel()
        elif name.startswith("adapters.mini."):
            parts["mini_adapters"] += p.numel()
        elif name == "temperature":
            parts["temperature"] += p.numel()
        else:
            backbone_trainable += p.numel()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for _, p in model.trainable_named_parameters())
    return {
        "total_params": total,
        "trainable_params": trainable,
        "backbone_params": sum(p.numel() for p in model.clip.parameters()),
        "backbone_trainable_params": backbone_trainable,
        **parts,
    }
