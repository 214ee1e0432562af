"""The checkpoints a run has in storage, read from storage itself rather than from Ray's records.

    stored_checkpoints(run_dir)   # [StoredCheckpoint(uri, step, val_mr)], oldest step first

Ray Train learns of a reported checkpoint only when its controller next polls the worker (every
2 s): the files are already in storage when `ray.train.report` returns, but a worker that dies
before that poll takes the registration with it, and a restarted group's `get_checkpoint()` then
offers an older checkpoint or none (seen: a worker killed 1 s after its first checkpoint restarted
the run from step 0). So the training loop resumes from the newest checkpoint found here, and the
driver picks the best-on-val checkpoint from this list. A checkpoint is a `checkpoint_*` folder of
the run whose files are all there and whole (Ray uploads a checkpoint's files in no fixed order, so
a worker that died mid-upload can leave a readable `metrics.json` beside a cut-short
`adapter.safetensors`); an incomplete one is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import posixpath
import struct
from dataclasses import dataclass

import yaml

from harma import storage
from harma.model.checkpoint import ADAPTER_FILE, CONFIG_FILE, METRICS_FILE

log = logging.getLogger(__name__)
PREFIX = "checkpoint_"
STATE_FILE = "trainer_state.safetensors"  # fp32 weights, Adam moments and step (harma.train.loop)


@dataclass(frozen=True)
class StoredCheckpoint:
    uri: str
    step: int
    val_mr: float | None

    def metrics(self) -> dict:
        return json.loads(storage.read_bytes(storage.join(self.uri, METRICS_FILE)))


def stored_checkpoints(run_dir: str) -> list[StoredCheckpoint]:
    """The run's readable checkpoints, sorted by (step, folder name): the newest is last."""
    found = []
    for metrics_uri in storage.list_files(run_dir, METRICS_FILE):
        folder = _parent(metrics_uri)
        if not _basename(folder).startswith(PREFIX) or _parent(folder).rstrip("/") != str(run_dir).rstrip("/"):
            continue
        try:
            metrics = json.loads(storage.read_bytes(metrics_uri))
            step, val_mr = int(metrics["step"]), metrics.get("val_mr")
            yaml.safe_load(storage.read_bytes(storage.join(folder, CONFIG_FILE)))
            for name in (ADAPTER_FILE, STATE_FILE):
                check_safetensors_whole(storage.join(folder, name))
        except (storage.StorageError, ValueError, KeyError, TypeError, yaml.YAMLError) as err:
            log.warning("skipping incomplete checkpoint %s (%s)", folder, err)
            continue
        found.append(StoredCheckpoint(folder, step, val_mr))
    return sorted(found, key=lambda c: (c.step, _basename(c.uri)))


def check_safetensors_whole(uri: str) -> None:
    """ValueError unless the file is as long as its safetensors header says (reads the header only)."""
    total = storage.size(uri)
    head = storage.read_head(uri, 8)
    if len(head) < 8:
        raise ValueError(f"{uri}: {total} bytes, too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", head)
    if 8 + header_len > total:
        raise ValueError(f"{uri}: cut short inside its header ({total} bytes)")
    header = json.loads(storage.read_head(uri, 8 + header_len)[8:])
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != total:
        raise ValueError(f"{uri}: {total} bytes where its header describes {8 + header_len + end}")


def best_on_val(checkpoints: list[StoredCheckpoint]) -> StoredCheckpoint:
    """The checkpoint with the highest val mR (the latest of equals); ValueError if none has one."""
    scored = [c for c in checkpoints if c.val_mr is not None]
    if not scored:
        raise ValueError("no checkpoint of the run has a val mR")
    return max(reversed(scored), key=lambda c: c.val_mr)


def _parent(uri: str) -> str:  # '/'-separated: s3:// URIs and local paths alike
    return posixpath.dirname(uri.rstrip("/"))


def _basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))
