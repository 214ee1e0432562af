"""HarMA adapter modules and their injection into an open_clip model from the outside.

Structure (harma-method.md section 1): after each residual block's MLP, the MLP output `h` becomes
`h + sigmoid(g_blk) * delta(h)`, where `delta` is the Multimodal Gated Adapter (MGA):

    z = GELU(down(h)); r = attn(z); [r = mini(r)]; r = attn(r)       # the same attention twice
    m = sigmoid(g_ad) * z + (1 - sigmoid(g_ad)) * r;   delta = up(m)  # up is zero-initialised

and `mini` is the per-layer mini-adapter (MMS-Adapter): `a + up2(s*attn'(down2 a) + (1-s)*down2 a)`.
With `layout="official"` the mini-adapter is used by the text adapters only (the paper code's
behaviour); with `layout="paper"` the layer-l mini-adapter is shared by the image and the text
adapter of layer l. The written form `h + sigmoid(g) * delta(h)` equals the paper code's
`sigmoid(g) * (h + delta) + (1 - sigmoid(g)) * h` algebraically, and keeps the adapted model
bit-identical to the backbone while `up` is zero.

Injection uses forward hooks on each block's `mlp`, so open_clip's modules, files and state-dict
keys are untouched; `remove()` detaches them. Every scalar parameter is 1-dimensional.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harma.config import AdapterConfig


def _zero_linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _gate(value: float) -> nn.Parameter:
    return nn.Parameter(torch.full((1,), float(value)))


class MiniAdapter(nn.Module):
    """The mini (shared) adapter: width -> rank -> attention -> gated mix -> width (residual)."""

    def __init__(self, width: int, rank: int, heads: int, gate_init: float):
        super().__init__()
        self.down = nn.Linear(width, rank)
        self.attn = nn.MultiheadAttention(rank, heads, batch_first=True)
        self.gate = _gate(gate_init)
        self.up = _zero_linear(rank, width)

    def forward(self, a: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """a: (B, L, width) -> (B, L, width)."""
        u = self.down(a)
        q = self.attn(u, u, u, key_padding_mask=key_padding_mask, need_weights=False)[0]
        s = torch.sigmoid(self.gate)
        # The paper code also computes GELU(u) here and discards it; it has no effect.
        return a + self.up(s * q + (1 - s) * u)


class GatedAdapter(nn.Module):
    """The Multimodal Gated Adapter of one block, with its block gate `block_gate`."""

    def __init__(self, width: int, rank: int, heads: int, gate_init: float):
        super().__init__()
        self.down = nn.Linear(width, rank)
        self.attn = nn.MultiheadAttention(rank, heads, batch_first=True)
        self.gate = _gate(gate_init)
        self.up = _zero_linear(rank, width)
        self.block_gate = _gate(gate_init)

    def delta(
        self,
        h: torch.Tensor,
        mini: MiniAdapter | None,
        key_padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """h: (B, L, width) MLP output -> (B, L, width) adapter update (zero at init)."""
        z = F.gelu(self.down(h))
        r = self.attn(z, z, z, key_padding_mask=key_padding_mask, need_weights=False)[0]
        if mini is not None:
            r = mini(r, key_padding_mask)
        r = self.attn(r, r, r, key_padding_mask=key_padding_mask, need_weights=False)[0]
        g = torch.sigmoid(self.gate)
        return self.up(g * z + (1 - g) * r)

    def adapt(
        self,
        h: torch.Tensor,
        mini: MiniAdapter | None,
        key_padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        return h + torch.sigmoid(self.block_gate) * self.delta(h, mini, key_padding_mask)


class HarmaAdapters(nn.Module):
    """All adapters of one model: `image[l]`, `text[l]` and the per-layer `mini[l]`.

    Each mini-adapter is held once, here, and handed to the adapters that use it at call time, so
    a shared module appears once in `state_dict()` and in the parameter count.
    """

    def __init__(
        self,
        cfg: AdapterConfig,
        image_width: int,
        image_layers: int,
        text_width: int,
        text_layers: int,
    ):
        super().__init__()
        self.layout = cfg.layout
        self.text_padding_mask = cfg.text_padding_mask
        self.image = nn.ModuleList(
            GatedAdapter(image_width, cfg.rank, cfg.heads, cfg.gate_init) for _ in range(image_layers)
        )
        self.text = nn.ModuleList(
            GatedAdapter(text_width, cfg.rank, cfg.heads, cfg.gate_init) for _ in range(text_layers)
        )
        mini_count = text_layers if cfg.layout == "official" else max(image_layers, text_layers)
        self.mini = nn.ModuleList(
            MiniAdapter(cfg.rank, cfg.mini_rank, cfg.mini_heads, cfg.gate_init)
            for _ in range(mini_count)
        )

    def mini_for(self, tower: str, layer: int) -> MiniAdapter | None:
        if tower == "image" and self.layout == "official":
            return None
        return self.mini[layer] if layer < len(self.mini) else None


class _MlpHook:
    """Forward hook on a block's MLP: output -> adapter.adapt(output)."""

    def __init__(self, adapters: HarmaAdapters, tower: str, layer: int, context: dict):
        self.adapters, self.tower, self.layer, self.context = adapters, tower, layer, context

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        adapter = getattr(self.adapters, self.tower)[self.layer]
        mask = self.context.get("key_padding_mask") if self.tower == "text" else None
        return adapter.adapt(output, self.adapters.mini_for(self.tower, self.layer), mask)


class Injection:
    """Handles of the hooks that put `adapters` into a CLIP model; `remove()` takes them out."""

    def __init__(self, clip: nn.Module, adapters: HarmaAdapters):
        self.context: dict = {}
        self._handles = []
        towers = (("image", clip.visual.transformer.resblocks), ("text", clip.transformer.resblocks))
        for tower, blocks in towers:
            expected = len(getattr(adapters, tower))
            if len(blocks) != expected:
                raise ValueError(f"{tower} tower has {len(blocks)} blocks, adapters {expected}")
            for layer, block in enumerate(blocks):
                hook = _MlpHook(adapters, tower, layer, self.context)
                self._handles.append(block.mlp.register_forward_hook(hook))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def text_key_padding_mask(tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) token ids -> (B, L) bool, True at positions after the end-of-text token.

    open_clip pads with 0 after the end-of-text token, which has the largest id in the vocabulary
    (the same rule open_clip uses to pool the text embedding).
    """
    eot = tokens.argmax(dim=-1, keepdim=True)  # (B, 1)
    positions = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
    return positions > eot
