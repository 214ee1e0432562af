"""The frozen open_clip backbone: build it from an architecture name or JSON, load its weights.

    from harma.config import BackboneConfig
    from harma.model.backbone import build_backbone
    clip, arch = build_backbone(BackboneConfig(arch="harma-tiny"))

Weights come from a local path or an `s3://` URI (see `harma.storage`) and are read without
executing pickled code: `.safetensors`, or a `torch.save` file read with `weights_only=True`. An
OpenAI-style TorchScript archive (the original CLIP `.pt` files) is read by TorchScript's own
deserializer, which rebuilds tensors and scripted modules but runs no Python pickle code; only its
state dict is kept. Key prefixes such as `module.` (DataParallel/DDP) and wrappers such as
`{"state_dict": ...}` are handled, and a checkpoint that does not fit is rejected with the list of
missing, unexpected and wrongly shaped keys.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import load as load_safetensors_bytes

from harma import storage
from harma.config import BackboneConfig
from harma.data.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

BUNDLED_ARCHS = ("harma-tiny",)
# Entries of OpenAI's TorchScript state dicts that are not weights.
_OPENAI_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_PREFIXES = ("module.", "model.", "clip.", "_orig_mod.")


class CheckpointMismatchError(ValueError):
    """A weights file does not fit the architecture."""

    def __init__(self, uri: str, missing: list[str], unexpected: list[str], shapes: list[str]):
        self.missing, self.unexpected, self.shapes = missing, unexpected, shapes
        parts = [f"weights {uri} do not fit the architecture:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
                parts.append(f"  {title} keys ({len(keys)}): {shown}")
        super().__init__("\n".join(parts))


@dataclass(frozen=True)
class ArchInfo:
    """What the rest of the platform needs to know about an architecture."""

    name: str
    image_size: int
    context_length: int
    embed_dim: int
    image_width: int
    text_width: int
    image_layers: int
    text_layers: int


def load_arch_config(arch: str) -> dict[str, Any]:
    """The open_clip architecture dict for a model name, a bundled arch or a JSON path."""
    if arch in BUNDLED_ARCHS:
        text = resources.files("harma.model").joinpath(f"archs/{arch}.json").read_text()
        cfg = json.loads(text)
    elif arch.endswith(".json"):
        try:
            cfg = json.loads(Path(arch).read_text())
        except OSError as err:
            raise ValueError(f"cannot read architecture file {arch}: {err.strerror}") from None
    else:
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise ValueError(
                f"unknown architecture {arch!r}: not an open_clip model name, not one of "
                f"{list(BUNDLED_ARCHS)} and not a .json file"
            )
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ValueError(f"architecture {arch!r} lacks {key!r}")
    if "timm_model_name" in cfg["vision_cfg"] or "hf_model_name" in cfg["text_cfg"]:
        raise ValueError(
            f"architecture {arch!r} is not ViT-style: HarMA adapters need open_clip's own "
            "vision and text transformers (no timm or Hugging Face towers)"
        )
    return cfg


def arch_info(arch: str) -> ArchInfo:
    cfg = load_arch_config(arch)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    size = v.get("image_size", 224)
    return ArchInfo(
        name=arch,
        image_size=size if isinstance(size, int) else size[0],
        context_length=t.get("context_length", 77),
        embed_dim=cfg["embed_dim"],
        image_width=v.get("width", 768),
        text_width=t.get("width", 512),
        image_layers=v.get("layers", 12),
        text_layers=t.get("layers", 12),
    )


def build_tokenizer(arch: str) -> ClipTokenizer:
    """CLIP's BPE tokenizer (open_clip's ids, numpy out) with the architecture's context length."""
    return ClipTokenizer(arch_info(arch).context_length)


def build_backbone(cfg: BackboneConfig) -> tuple[open_clip.CLIP, ArchInfo]:
    """A frozen open_clip CLIP with random or loaded weights.

    Every scalar parameter is made 1-dimensional (`logit_scale`): DeepSpeed on GPU cannot broadcast
    0-dim parameters.
    """
    arch_cfg = load_arch_config(cfg.arch)
    model = open_clip.CLIP(
        embed_dim=arch_cfg["embed_dim"],
        vision_cfg=arch_cfg["vision_cfg"],
        text_cfg=arch_cfg["text_cfg"],
        quick_gelu=arch_cfg.get("quick_gelu", False),
        nonscalar_logit_scale=True,
    )
    if cfg.weights_uri:
        state = read_state_dict(cfg.weights_uri)
        load_backbone_weights(model, state, cfg.weights_uri)
        log.info("loaded backbone weights from %s", cfg.weights_uri)
    model.requires_grad_(False)
    model.eval()
    return model, arch_info(cfg.arch)


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Read a weights file by URI into a flat {name: tensor} dict, never unpickling code."""
    data = storage.read_bytes(uri)
    if str(uri).endswith(".safetensors"):
        return load_safetensors_bytes(data)
    if _is_torchscript(data):
        scripted = torch.jit.load(io.BytesIO(data), map_location="cpu")
        return {k: v for k, v in scripted.state_dict().items()}
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several unrelated types here
        raise ValueError(
            f"{uri} is not a loadable weights file (safetensors, torch state dict or TorchScript "
            f"archive); refusing to unpickle arbitrary objects: {str(err).splitlines()[0][:200]}"
        ) from None
    return _unwrap(obj, uri)


def _is_torchscript(data: bytes) -> bool:
    if not data.startswith(b"PK"):
        return False
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in zf.namelist())


def _unwrap(obj: Any, uri: str) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{uri} holds no state dict (a mapping of names to tensors)")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def normalize_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (`module.` ...) and OpenAI's non-weight entries."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        if key in _OPENAI_NON_WEIGHTS:
            continue
        out[key] = value
    return out


def load_backbone_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], uri: str) -> None:
    """Copy `state` into `model` exactly, or raise CheckpointMismatchError listing every problem."""
    state = normalize_keys(state)
    expected = model.state_dict()
    # TorchScript archives also carry non-persistent buffers (the text causal mask), rebuilt here.
    transient = {name for name, _ in model.named_buffers()} - set(expected)
    state = {k: v for k, v in state.items() if k not in transient}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = []
    fixed: dict[str, torch.Tensor] = {}
    for key in sorted(set(expected) & set(state)):
        want, got = expected[key], state[key]
        if got.shape != want.shape and got.numel() == want.numel() and got.numel() == 1:
            got = got.reshape(want.shape)  # 0-dim logit_scale from other writers
        if got.shape != want.shape:
            shapes.append(f"{key} {tuple(got.shape)} != {tuple(want.shape)}")
            continue
        fixed[key] = got.to(want.dtype)
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(uri, missing, unexpected, shapes)
    model.load_state_dict(fixed, strict=True)
