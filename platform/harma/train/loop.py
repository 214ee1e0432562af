"""The Ray Train worker: `train_worker(loop_config)` runs on every worker of `harma train`.

One linear function, split by section comments: config -> model -> DeepSpeed -> resume -> epochs of
`train_step` on this worker's shard of the Ray Data stream (the next epoch's stream started before
validation, `harma.train.prefetch`) -> validation on rank 0 -> checkpoint and report on every rank.
A checkpoint holds `adapter.safetensors`, `config.yaml`, `metrics.json` and
`trainer_state.safetensors` (fp32 weights, Adam moments and step of the trainable parameters, gathered
into one world-size-independent copy), so a run written by N workers resumes on M workers.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time

import numpy as np
import ray.train
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

import ray
from harma import storage
from harma.config import PlatformConfig
from harma.console import attach_relay
from harma.data.local import eval_arrays
from harma.data.prepared import load_prepared_split
from harma.data.transforms import normalize_pixels
from harma.model.backbone import build_tokenizer
from harma.model.checkpoint import METRICS_FILE, model_numerics, save_checkpoint
from harma.model.harma import build_model
from harma.train.engine import DeepSpeedEngine, deepspeed_config, prepare_deepspeed_env
from harma.train.evaluate import evaluate_arrays
from harma.train.input_wait import InputWaitMeter
from harma.train.optim import param_groups
from harma.train.prefetch import EpochStreams
from harma.train.step import train_step
from harma.train.stored import STATE_FILE, stored_checkpoints

log = logging.getLogger(__name__)
PROGRESS_FILE = "progress.json"


def _to_torch(batch: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], list[str]]:
    keep = batch["image_id"] >= 0
    bad = [str(k) for k in batch["bad_key"][~keep]]
    return {
        "image": torch.from_numpy(np.ascontiguousarray(batch["pixels"][keep])),
        "tokens": torch.from_numpy(np.ascontiguousarray(batch["tokens"][keep])),
        "image_id": torch.from_numpy(batch["image_id"][keep]),
    }, bad


def train_worker(loop_config: dict) -> dict:
    """Per-worker training function (Ray Train). Returns rank 0's summary."""
    # --- config and context ------------------------------------------------------------------
    attach_relay(loop_config.get("console"))  # this worker's harma log lines -> the driver's console
    cfg = PlatformConfig.model_validate(loop_config["config"])
    total_steps: int = loop_config["total_steps"]
    epochs: int = loop_config["epochs"]
    images_total: int = loop_config["images"]
    run_dir: str = loop_config["run_dir"]
    uniform_share: float | None = loop_config.get("uniform_same_image_share")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg.train.workers.use_gpu
    prepare_deepspeed_env(use_gpu, cfg.train.deepspeed.shm_comm_op)
    import deepspeed

    # --- model and DeepSpeed -------------------------------------------------------------------
    precision = cfg.model.backbone.precision
    fp32_model_cfg = cfg.model.model_copy(update={"backbone": cfg.model.backbone.model_copy(
        update={"precision": "fp32" if use_gpu or precision == "fp32" else precision})})
    model = build_model(fp32_model_cfg, seed=cfg.run.seed)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.optimizer), lr=cfg.train.optimizer.lr,
                                  betas=cfg.train.optimizer.betas, eps=cfg.train.optimizer.eps)
    ds_config = deepspeed_config(cfg.train, world, use_gpu, precision)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                      dist_init_required=False)
    trainer = DeepSpeedEngine(engine, model, total_steps, cfg.train.schedule, cfg.train.optimizer.lr)
    device = engine.device
    # How this run computes: the weights as built (fp32 masters on GPU), DeepSpeed's autocast in the
    # training forward, validation (below) on the weights as they are, without autocast.
    autocast = ds_config.get("torch_autocast", {}).get("dtype")
    numerics = model_numerics(model, {"bfloat16": "bf16"}.get(autocast, autocast))
    nodes: list = [None] * world
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    micro_batch = ds_config["train_micro_batch_size_per_gpu"]

    # --- resume --------------------------------------------------------------------------------
    history: list[dict] = []
    loop_seconds, pairs_seen = 0.0, 0
    input_wait = InputWaitMeter()

    def summary() -> dict:  # rank 0's summary for the driver, as things stand when called
        return {"steps": trainer.global_step, "best_val": best_val, "bad_images": bad_images,
                "restarts": restarts, "world_size": world, "nodes": nodes,
                "loop_seconds": loop_seconds, "input_wait_seconds": input_wait.total_wait_s,
                "pairs_per_worker": pairs_seen, "device": str(device),
                "startup_wait_seconds": input_wait.startup_wait_s}

    bad_images: list[str] = []
    restarts: list[dict] = []
    start_epoch, best_val = 0, None
    # The newest checkpoint in storage, not only the one Ray registered (see harma.train.stored);
    # rank 0 chooses so that every rank loads the same one.
    resume_uri, loaded = _choose_resume_checkpoint(run_dir, ray.train.get_checkpoint()) if rank == 0 else (None, None)
    chosen = [resume_uri]
    torch.distributed.broadcast_object_list(chosen, src=0)
    if chosen[0] is not None:
        state, saved = loaded or _read_resume_state(chosen[0])  # rank 0 read it while choosing
        trainer.restore_state(state)
        start_epoch = saved["epoch"]
        history, bad_images, restarts = saved["history"], saved["bad_images"], saved["restarts"]
        best_val = saved.get("best_val")
        reached = _read_progress(run_dir)
        redone = max(0, reached - trainer.global_step)
        restarts.append({"resumed_at_step": trainer.global_step, "steps_redone": redone,
                         "world_size": world})
        if rank == 0:
            log.info("[harma] resumed at step %d (epoch %d) on %d worker(s) from %s; %d step(s) will "
                     "be redone", trainer.global_step, start_epoch, world, chosen[0], redone)
        if start_epoch >= epochs or trainer.global_step >= total_steps:
            # Nothing left to train (the run ended, but its end was not recorded, e.g. a sweep whose
            # driver died after this trial's last checkpoint): report its last figures again, so a
            # Tune trial still ends with its metric; every rank reports (a barrier).
            final = {k: v for k, v in saved.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            ray.train.report(final if rank == 0 else {})
            return summary()

    # --- validation data (rank 0 evaluates; ZeRO <= 2 keeps full weights on every rank) --------
    val = None
    if rank == 0:
        val_split = load_prepared_split(cfg.data.prepared_uri, cfg.data.val_split)
        val = (*eval_arrays(val_split, model.arch.image_size, build_tokenizer(model.arch.name),
                            cfg.data.max_words), val_split.caption_image)

    # --- epochs --------------------------------------------------------------------------------
    shard = ray.train.get_dataset_shard("train")
    streams = EpochStreams(lambda epoch: shard.iter_batches(
        batch_size=micro_batch, drop_last=True, batch_format="numpy",
        local_shuffle_buffer_size=max(4 * micro_batch, cfg.data.shuffle_buffer_pairs), prefetch_batches=2,
        local_shuffle_seed=(cfg.run.seed + epoch) if cfg.data.deterministic else None))
    t_start, steps_at_start = time.perf_counter(), trainer.global_step
    for epoch in range(start_epoch, epochs):
        last: dict = {}
        shares: list[float] = []  # each global batch's same-image share (harma.data.composition)
        t_epoch = time.perf_counter()
        for batch in input_wait.batches(streams.take(epoch)):
            if trainer.global_step >= total_steps:
                break
            tensors, bad = _to_torch(batch)
            if bad:
                bad_images.extend(bad)
                _check_bad_fraction(bad_images, images_total, cfg.data.max_bad_fraction)
            if len(tensors["image_id"]) == 0:
                raise ValueError("a whole training batch was unusable images; see the run report")
            tensors = {k: v.to(device) for k, v in tensors.items()}
            tensors["image"] = normalize_pixels(tensors["image"])
            last = train_step(trainer, tensors, cfg.train.loss)
            shares.append(last["same_image_share"])
            pairs_seen += len(tensors["image_id"])
            history.append({"step": trainer.global_step, "epoch": epoch, **last})
            if rank == 0 and (trainer.global_step % cfg.train.log_every == 0):
                _log_progress(trainer.global_step, total_steps, last, t_start, steps_at_start,
                              input_wait.window_fraction())
                _write_progress(run_dir, trainer.global_step)

        loop_seconds += time.perf_counter() - t_epoch
        if epoch + 1 < epochs and trainer.global_step < total_steps:
            streams.start(epoch + 1)  # every rank alike; its start-up overlaps validation

        # --- validate, checkpoint, report (every rank reports: it is a barrier) ----------------
        waited = {"input_wait_s": input_wait.epoch_wait_s, "first_batch_s": input_wait.first_batch_s}
        # What the epoch's batches were made of, beside what uniform sampling would give.
        composition = {"batch_same_image_share": float(np.mean(shares)) if shares else float("nan"),
                       "batch_same_image_share_uniform": uniform_share}
        metrics = {"epoch": epoch + 1, "step": trainer.global_step, "loss": last.get("loss", float("nan")),
                   **waited, **composition}
        if rank == 0:
            scores = evaluate_arrays(model, *val, batch_size=cfg.train.eval_batch_size)
            metrics.update({f"val_{k}": v for k, v in scores.items()})
            if best_val is None or scores["mr"] > best_val["mr"]:
                best_val = {**scores, "step": trainer.global_step}
            history.append({"step": trainer.global_step, "epoch": epoch + 1,
                            **{f"val_{k}": v for k, v in scores.items()}, **waited, **composition})
            log.info("[harma] epoch %d/%d step %d: val mR %.2f (best %.2f); waited %.1f s for input "
                     "(%.1f s of it for the first batch); %.1f%% of samples shared their batch with "
                     "another caption of their image (uniform sampling: %s)", epoch + 1, epochs,
                     trainer.global_step, scores["mr"], best_val["mr"], input_wait.epoch_wait_s,
                     input_wait.first_batch_s, 100 * composition["batch_same_image_share"],
                     "n/a" if uniform_share is None else f"{100 * uniform_share:.1f}%")
        state = trainer.gather_state()  # collective
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_file(state, os.path.join(tmp, STATE_FILE))
                save_checkpoint(tmp, model, cfg, {
                    **metrics, "history": history, "bad_images": bad_images, "restarts": restarts,
                    "best_val": best_val, "world_size": world}, numerics)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics if rank == 0 else {}, checkpoint=ckpt)
        if trainer.global_step >= total_steps:
            break
    return summary()


def _read_resume_state(uri: str) -> tuple[dict[str, torch.Tensor], dict]:
    state = load_safetensors(storage.read_bytes(storage.join(uri, STATE_FILE)))
    return state, json.loads(storage.read_bytes(storage.join(uri, METRICS_FILE)))


def _choose_resume_checkpoint(
    run_dir: str, registered: ray.train.Checkpoint | None,
) -> tuple[str | None, tuple[dict[str, torch.Tensor], dict] | None]:
    """(uri, its state and metrics) of the newest stored checkpoint whose state loads; Ray's
    registered one if storage lists none; (None, None) if nothing loads."""
    try:
        candidates = [c.uri for c in reversed(stored_checkpoints(run_dir))]
    except storage.StorageError as err:
        log.warning("[harma] cannot list the run's checkpoints (%s); using Ray's record", err)
        candidates = []
    if registered is not None:
        candidates.append(storage.from_ray_path(registered.path, run_dir))
    for uri in candidates:
        try:
            return uri, _read_resume_state(uri)
        except (storage.StorageError, SafetensorError, ValueError, KeyError) as err:
            log.warning("[harma] checkpoint %s cannot be resumed from (%s); trying an older one", uri, err)
    return None, None


def _check_bad_fraction(bad: list[str], total_images: int, limit: float) -> None:
    # Each epoch meets every bad image again; count distinct ones.
    distinct = list(dict.fromkeys(bad))
    if len(distinct) / max(1, total_images) > limit:
        raise ValueError(f"{len(distinct)} unusable images (more than data.max_bad_fraction={limit}); "
                         f"first: {', '.join(distinct[:5])}")


def _log_progress(step: int, total: int, metrics: dict, t_start: float, first: int,
                  input_wait: float) -> None:
    """One progress line; `input_wait`: share of the time since the last line spent waiting for data."""
    elapsed = time.perf_counter() - t_start
    rate = (step - first) / elapsed if elapsed > 0 else 0.0
    eta = (total - step) / rate if rate > 0 else 0.0
    # Logged, not printed: the `harma` logger's records reach the driver's console through
    # harma.console (Ray's forwarding of worker output is off).
    log.info("[harma] step %d/%d  loss %.4f  lr %.2e  %.2f steps/s  input wait %d%%  ETA %d:%02d",
             step, total, metrics["loss"], metrics["lr"], rate, round(100 * input_wait),
             int(eta) // 60, int(eta) % 60)


def _write_progress(run_dir: str, step: int) -> None:
    try:
        storage.write_bytes(storage.join(run_dir, PROGRESS_FILE), json.dumps({"step": step}).encode())
    except storage.StorageError as err:  # progress is advisory; never fail training for it
        log.warning("could not record progress: %s", err)


def _read_progress(run_dir: str) -> int:
    uri = storage.join(run_dir, PROGRESS_FILE)
    try:
        return int(json.loads(storage.read_bytes(uri))["step"]) if storage.exists(uri) else 0
    except (storage.StorageError, ValueError, KeyError):
        return 0
