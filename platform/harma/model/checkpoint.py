"""Self-describing adapter checkpoints: adapter.safetensors + config.yaml + metrics.json +
numerics.json.

    save_checkpoint("runs/demo/best", model, cfg, metrics, numerics)
    model, cfg = load_checkpoint("runs/demo/best")            # local folder or s3:// prefix
    model, cfg = load_checkpoint("runs/demo/best", "bf16")    # bf16 weights: an explicit choice

`numerics.json` records how the checkpoint was trained and validated: the dtype of the master
weights, the autocast dtype of the forward pass (None without autocast) and the numerics its
validation scores (hence the best-on-val choice) were computed in. A GPU run with
`model.backbone.precision: bf16` trains fp32 weights under bf16 autocast and validates in fp32, so
its checkpoint reloads in fp32 by default, not as a pure-bf16 model nobody validated. Checkpoints
without the file reload in their config's precision.

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
NUMERICS_FILE = "numerics.json"
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def trainable_state_dict(model: HarmaModel) -> dict[str, torch.Tensor]:
    """Every trainable tensor by name, detached, contiguous, on the CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.trainable_named_parameters()}


def model_numerics(model: HarmaModel, autocast: str | None = None) -> dict[str, str | None]:
    """How `model` computes as it is: its weights' dtype, trained and validated without autocast
    unless `autocast` names the autocast dtype of its training forward pass."""
    dtype = DTYPE_NAMES[next(model.parameters()).dtype]
    return {"master_weights": dtype, "autocast": autocast, "validated_in": dtype}


def save_checkpoint(uri: str, model: HarmaModel, config: PlatformConfig, metrics: dict[str, Any],
                    numerics: dict[str, str | None] | None = None) -> None:
    """Write the four files of a checkpoint under `uri` (folder or s3:// prefix); `numerics`:
    how it was trained and validated (default: `model_numerics(model)`)."""
    storage.makedirs(uri)
    storage.write_bytes(storage.join(uri, NUMERICS_FILE),
                        json.dumps(numerics or model_numerics(model), indent=1).encode())
    state = trainable_state_dict(model)
    storage.write_bytes(storage.join(uri, ADAPTER_FILE),
                        save_safetensors_bytes(state, metadata={"format": "harma-adapter-v1"}))
    storage.write_bytes(storage.join(uri, CONFIG_FILE), config.to_yaml().encode())
    storage.write_bytes(storage.join(uri, METRICS_FILE), json.dumps(metrics, indent=1, sort_keys=True).encode())


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint at a URI; the message names it."""


def require_checkpoint(uri: str) -> None:
    """Refuse, naming `uri`, a place that does not hold a checkpoint's config and weights (before
    any cluster starts: a wrong path in a job file is found in a second, not after Ray is up)."""
    missing = [name for name in (CONFIG_FILE, ADAPTER_FILE) if not storage.exists(storage.join(uri, name))]
    if missing:
        raise CheckpointNotFoundError(
            f"{uri}: no checkpoint here (missing {', '.join(missing)}); `harma train` publishes a run's "
            "best-on-val checkpoint at <run.output_dir>/<run.name>/best")


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


def read_numerics(uri: str) -> dict[str, str | None]:
    """A checkpoint's numerics.json; for one written before it existed, its config's precision."""
    path = storage.join(uri, NUMERICS_FILE)
    if storage.exists(path):
        return json.loads(storage.read_bytes(path))
    precision = read_checkpoint_config(uri).model.backbone.precision
    return {"master_weights": precision, "autocast": None, "validated_in": precision}


def load_checkpoint(uri: str, precision: str = "validated") -> tuple[HarmaModel, PlatformConfig]:
    """Rebuild the model a checkpoint describes (backbone from its config) with its weights, in the
    numerics its validation used (`precision="validated"`) or explicitly in "fp32" / "bf16".

    The returned config's `model.backbone.precision` is the one the model was built in.
    """
    config = read_checkpoint_config(uri)
    dtype = read_numerics(uri)["validated_in"] if precision == "validated" else precision
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"precision {precision!r}: give 'validated', 'fp32' or 'bf16'")
    config = config.model_copy(update={"model": config.model.model_copy(update={
        "backbone": config.model.backbone.model_copy(update={"precision": dtype})})})
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
    """Copy a checkpoint's files (not Ray's trainer state) to a stable place, e.g. for serving."""
    storage.makedirs(dst)
    for name in (ADAPTER_FILE, CONFIG_FILE, METRICS_FILE, NUMERICS_FILE):
        if name == NUMERICS_FILE and not storage.exists(storage.join(src, name)):
            continue  # written before numerics.json existed
        storage.write_bytes(storage.join(dst, name), storage.read_bytes(storage.join(src, name)))
