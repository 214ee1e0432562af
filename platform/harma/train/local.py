"""Single-process training: the same `train_step` as the Ray Train workers, on in-memory data.

    result = fit_local(cfg, out_uri="runs/demo/adapt")

Validates on the val split every `train.eval_every` steps and at the end; the best checkpoint is
chosen on val (never on test) and written to `<out_uri>/best`. Progress (steps/s, ETA, loss, val
mR) is logged as it runs.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import torch

from harma import storage
from harma.config import PlatformConfig
from harma.data.local import Split, eval_arrays, load_split, train_batches
from harma.model.backbone import build_tokenizer
from harma.model.checkpoint import save_checkpoint
from harma.model.harma import HarmaModel, build_model
from harma.train.evaluate import evaluate_arrays
from harma.train.optim import build_optimizer, build_scheduler
from harma.train.step import TorchEngine, train_step

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    best_checkpoint: str | None
    best_step: int
    best_val: dict[str, float]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def fit_local(
    cfg: PlatformConfig,
    out_uri: str,
    model: HarmaModel | None = None,
    train_split: Split | None = None,
    val_split: Split | None = None,
    save_best: bool = True,
) -> TrainResult:
    """Train `cfg` in this process; returns the history and where the best (val) checkpoint is.

    `model`, `train_split` and `val_split` may be passed in to reuse what the caller built.
    """
    torch.manual_seed(cfg.run.seed)
    model = model or build_model(cfg.model, seed=cfg.run.seed)
    arch = model.arch
    tokenizer = build_tokenizer(arch.name)
    train_split = train_split or load_split(cfg.data.root, cfg.data.train_split)
    val_split = val_split or load_split(cfg.data.root, cfg.data.val_split)
    val_images, val_tokens = eval_arrays(val_split, arch.image_size, tokenizer, cfg.data.max_words)

    optimizer = build_optimizer(model, cfg.train.optimizer)
    scheduler = build_scheduler(optimizer, cfg.train.steps, cfg.train.schedule)
    engine = TorchEngine(model, optimizer, scheduler)
    batches = train_batches(train_split, arch.image_size, tokenizer, cfg.data.max_words,
                            cfg.data.augment, cfg.train.batch_size, cfg.run.seed,
                            grouped=cfg.data.batch_composition == "image_grouped")

    def validate() -> dict[str, float]:
        return evaluate_arrays(model, val_images, val_tokens, val_split.caption_image,
                               cfg.train.eval_batch_size)

    history: list[dict] = []
    best = TrainResult(None, 0, validate(), history)
    history.append({"step": 0, **{f"val_{k}": v for k, v in best.best_val.items()}})
    log.info("step 0: val mR %.2f (before training)", best.best_val["mr"])
    if save_best:
        best.best_checkpoint = storage.join(out_uri, "best")
        save_checkpoint(best.best_checkpoint, model, cfg, {"step": 0, "val": best.best_val})

    start = time.perf_counter()
    for step in range(1, cfg.train.steps + 1):
        metrics = train_step(engine, next(batches), cfg.train.loss)
        row = {"step": step, **metrics}
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            elapsed = time.perf_counter() - start
            rate = step / elapsed
            log.info("step %d/%d  loss %.4f  (con %.3f trip %.3f)  lr %.2e  %.2f steps/s  ETA %s",
                     step, cfg.train.steps, metrics["loss"], metrics["contrastive"],
                     metrics["triplet"], metrics["lr"], rate,
                     _format_eta((cfg.train.steps - step) / rate))
        if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
            val = validate()
            row.update({f"val_{k}": v for k, v in val.items()})
            improved = val["mr"] > best.best_val["mr"]
            log.info("step %d: val mR %.2f%s", step, val["mr"],
                     "  (best so far, checkpoint saved)" if improved and save_best else "")
            if improved:
                best.best_val, best.best_step = val, step
                if save_best:
                    save_checkpoint(best.best_checkpoint, model, cfg, {"step": step, "val": val})
        history.append(row)
    best.seconds = time.perf_counter() - start
    storage.write_bytes(storage.join(out_uri, "history.jsonl"),
                        "".join(json.dumps(r) + "\n" for r in history).encode())
    return best

