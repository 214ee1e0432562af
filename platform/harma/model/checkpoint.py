"""Self-describing adapter checkpoints: adapter.safetensors + config.yaml + metrics.json.

    save_checkpoint("runs/demo/best", model, cfg_dict, metrics)
    model, cfg = load_checkpoint("runs/demo/best")      # local folder or s3:// prefix

Only the trainable tensors are saved (adapters, gates, temperature; plus the backbone when it
was trained in full); the backbone comes from `config.yaml`'s `model.backbone`, so loading
rebuilds exactly the trained model. Shared modules are held once in the model and so saved once.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import yaml
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from harma import storage
from harma.config import PlatformConfig
from harma.model.harma import HarmaModel, build_model

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"


def trainable_state_dict(model: HarmaModel) -> dict[str, torch.Tensor]:
    """Every trainable tensor by name, detached, contiguous, on the CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.trainable_named_parameters()}


def save_checkpoint(uri: str, model: HarmaModel, config: PlatformConfig, metrics: dict[str, Any]) -> None:
    """Write the three files of a checkpoint under `uri` (folder or s3:// prefix)."""
    storage.makedirs(uri)
    state = trainable_state_dict(model)
    storage.write_bytes(storage.join(uri, ADAPTER_FILE),
                        save_safetensors_bytes(state, metadata={"format": "harma-adapter-v1"}))
    storage.write_bytes(storage.join(uri, CONFIG_FILE), config.to_yaml().encode())
    storage.write_bytes(storage.join(uri, METRICS_FILE), json.dumps(metrics, indent=1, sort_keys=True).encode())


def read_checkpoint_config(uri: str) -> PlatformConfig:
    raw = yaml.safe_load(storage.read_bytes(storage.join(uri, CONFIG_FILE)).decode())
    return PlatformConfig.model_validate(raw)


def load_adapter_state(model: HarmaModel, state: dict[str, torch.Tensor], uri: str) -> None:
    """Copy saved trainable tensors into `model`; refuse any missing, unexpected or misshapen key."""
    expected = dict(model.trainable_named_parameters())
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        from harma.model.backbone import CheckpointMismatchError

        raise CheckpointMismatchError(storage.join(uri, ADAPTER_FILE), missing, unexpected, shapes)
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(state[name].to(param.dtype))


def load_checkpoint(uri: str) -> tuple[HarmaModel, PlatformConfig]:
    """Rebuild the model a checkpoint describes (backbone from its config) with its weights."""
    config = read_checkpoint_config(uri)
    model = build_model(config.model, seed=config.run.seed)
    state = load_safetensors_bytes(storage.read_bytes(storage.join(uri, ADAPTER_FILE)))
    load_adapter_state(model, state, uri)
    return model, config


def read_metrics(uri: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(storage.join(uri, METRICS_FILE)))


def save_backbone_weights(uri: str, model: HarmaModel) -> None:
    """Write the CLIP backbone as an open_clip state dict in safetensors (a base-model file)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.clip.state_dict().items()}
    storage.write_bytes(uri, save_safetensors_bytes(state))


def copy_checkpoint(src: str, dst: str) -> None:
    """Copy a checkpoint's three files (not Ray's trainer state) to a stable place, e.g. for serving."""
    storage.makedirs(dst)
    for name in (ADAPTER_FILE, CONFIG_FILE, METRICS_FILE):
        storage.write_bytes(storage.join(dst, name), storage.read_bytes(storage.join(src, name)))
