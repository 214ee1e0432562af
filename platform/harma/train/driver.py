"""`harma train`: Ray Data -> Ray Train workers running the DeepSpeed-wrapped HarMA model.

    harma train --config jobs/train_synth.yaml [overrides]

`fit(cfg)` is the one function the CLI, a Ray Job and (later) a Tune trial call. It checks storage
before any worker starts, streams `data.prepared_uri`'s train split through Ray Data into
`train.workers` workers (a fixed count or an elastic `min..max` range), restarts from the last
checkpoint when a worker or node fails (`train.workers.max_failures`), and resumes a run of the
same name in the same `run.output_dir`. The best checkpoint is chosen on val; the final test
report uses it. The run folder `<output_dir>/<name>/` holds Ray's checkpoints and our `report/`
(metrics.json, history.jsonl, training.png).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import ray.train
from ray.train.torch import TorchTrainer

import ray
from harma import storage
from harma.config import PlatformConfig
from harma.console import WorkerLogRelay, quiet_ray_loggers, route_ray_error_messages
from harma.data.composition import uniform_same_image_share
from harma.data.datasets import (
    FOOTER_ACTORS,
    FOOTER_ACTORS_VAR,
    STREAM_CPUS,
    build_train_dataset,
    resolve_image_visits,
)
from harma.data.prepared import captions_per_image, count_captions, read_report
from harma.eval import format_table
from harma.model.backbone import arch_info
from harma.model.checkpoint import copy_checkpoint
from harma.serve.build import READ_CPUS as INDEX_READ_CPUS
from harma.train.evaluate import evaluate_prepared
from harma.train.loop import train_worker
from harma.train.stored import best_on_val, stored_checkpoints

log = logging.getLogger(__name__)


class PreflightError(ValueError):
    """The run cannot start: storage unusable, data missing or too many bad images."""


BEST = "best"  # <output_dir>/<name>/best: the run's best-on-val checkpoint, a stable URI


@dataclass
class FitResult:
    run_dir: str
    best_checkpoint: str  # <run_dir>/best (published there from best_source)
    best_step: int  # the step the best-on-val checkpoint was taken at
    best_val: dict[str, float]
    test: dict[str, float]
    steps: int
    world_size: int
    nodes: list[str]
    restarts: list[dict]
    bad_images: list[str]
    seconds: float
    report_dir: str
    loop_seconds: float = 0.0  # rank 0's time in the step loop (data waits included), this attempt
    input_wait_seconds: float = 0.0  # of which waiting for the next batch (harma.train.input_wait)
    startup_wait_seconds: float = 0.0  # of which the first batch of this attempt's first epoch
    pairs_per_worker: int = 0
    device: str = ""  # rank 0's torch device ("cpu", "cuda:0")
    best_source: str = ""  # the Ray checkpoint folder the best-on-val checkpoint was copied from
    test_official: dict = field(default_factory=dict)  # test scores with the paper code's tie order
    test_per_class: dict | None = None  # per scene class (harma.eval.per_class_metrics), both protocols


_FORWARDED_ENV = ("AWS_ENDPOINT_URL", "HARMA_S3_ENDPOINT", "AWS_REGION", "AWS_DEFAULT_REGION",
                  "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                  "AWS_EC2_METADATA_DISABLED", "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR",
                  FOOTER_ACTORS_VAR)


def worker_env() -> dict[str, str]:
    """The driver's storage, DeepSpeed and Ray Data settings, for worker processes (values never logged)."""
    return {key: os.environ[key] for key in _FORWARDED_ENV if os.environ.get(key)}


# Ray keeps idle worker processes up to `num_workers_soft_limit` (default: the node's CPU count) and
# ends the rest after 1 s idle. Ray Data's fractional-CPU tasks run on more processes than that, so
# the surplus was ended while an epoch validated and the next epoch started new ones, each importing
# torch and the tokenizer again (~2 s of CPU each; on 2 cores an epoch of the demo's stream took
# 6.7 s instead of 1.3 s). Set before a node starts: here for local clusters, in cluster.yaml for
# real ones (`WORKERS_PER_CPU` x the node's CPUs there too).
WORKER_LIMIT_VAR = "RAY_num_workers_soft_limit"
STARTUP_CONCURRENCY_VAR = "RAY_worker_maximum_startup_concurrency"
# The most Data tasks one logical CPU holds at once: the training stream's tasks or the index
# build's reads, whichever ask less CPU.
WORKERS_PER_CPU = round(1 / min(STREAM_CPUS, INDEX_READ_CPUS))


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS, or start a local one sized so Data and Train fit."""
    if ray.is_initialized():
        return
    os.environ.setdefault(FOOTER_ACTORS_VAR, FOOTER_ACTORS)
    env = {"env_vars": worker_env()}
    # Ray's internals (worker output, controller, raylet) stay in Ray's log files; harma's own lines
    # from the workers reach the console through harma.console.WorkerLogRelay. While Ray starts,
    # only its errors show (not its notice that token authentication is on).
    quiet_ray_loggers(logging.ERROR)
    route_ray_error_messages()
    if os.environ.get("RAY_ADDRESS"):
        context = ray.init(runtime_env=env, log_to_driver=False, logging_level=logging.ERROR)
    else:
        from harma.serve.ingress import ensure_fast_ingress

        ensure_fast_ingress()  # read by Serve's processes when the cluster starts
        # Logical CPUs above the core count: Train workers and Data tasks use fractions of them.
        num_cpus = num_cpus or max(4, 2 * (os.cpu_count() or 2))
        os.environ.setdefault(WORKER_LIMIT_VAR, str(WORKERS_PER_CPU * num_cpus))
        # The raylet warns on the console when it starts more than 4 x this many worker processes
        # (default: the physical cores); fractional-CPU Data tasks, the index build's actors and
        # Serve's replicas start that many on purpose (a demo reached 16 at 4 x num_cpus).
        os.environ.setdefault(STARTUP_CONCURRENCY_VAR, str(2 * num_cpus))
        context = ray.init(num_cpus=num_cpus, runtime_env=env, log_to_driver=False, logging_level=logging.ERROR)
    quiet_ray_loggers()
    log.info("Ray's own logs: %s", os.path.join(context.address_info.get("session_dir", "?"), "logs"))


def with_absolute_paths(cfg: PlatformConfig) -> PlatformConfig:
    """The config with every local path absolute: workers do not share the driver's working dir."""
    paths = {"run.output_dir": cfg.run.output_dir, "data.root": cfg.data.root,
             "data.prepared_uri": cfg.data.prepared_uri,
             "model.backbone.weights_uri": cfg.model.backbone.weights_uri}
    return cfg.with_overrides({k: storage.absolute(v) for k, v in paths.items() if v})


def preflight(cfg: PlatformConfig) -> tuple[int, int]:
    """Check storage and data before any worker starts; returns (images, pairs) of the train split."""
    if not cfg.data.prepared_uri:
        raise PreflightError("data.prepared_uri is not set: run `harma data prepare` and point it there")
    for uri, write in ((cfg.data.prepared_uri, False), (cfg.run.output_dir, True)):
        try:
            storage.preflight(uri, write=write)
        except storage.StorageError as err:
            raise PreflightError(str(err)) from None
    weights = cfg.model.backbone.weights_uri
    if weights and not storage.exists(weights):
        raise PreflightError(f"model.backbone.weights_uri {weights}: no such file")
    report = read_report(cfg.data.prepared_uri).get("splits", {}).get(cfg.data.train_split, {})
    images = report.get("images")
    unusable = len(report.get("missing", [])) + len(report.get("undecodable", []))
    if images is not None and unusable / max(1, images + unusable) > cfg.data.max_bad_fraction:
        listed = (report.get("missing", []) + report.get("undecodable", []))[:5]
        raise PreflightError(f"{unusable} of {images + unusable} train images are unusable "
                             f"(data.max_bad_fraction={cfg.data.max_bad_fraction}); e.g. {listed}")
    pairs = report.get("captions") or count_captions(cfg.data.prepared_uri, cfg.data.train_split)
    return images or pairs // 5, pairs


def plan_steps(cfg: PlatformConfig, pairs: int) -> tuple[int, int]:
    """(total optimizer steps, epochs) for `pairs` training pairs and the global batch."""
    per_epoch = pairs // cfg.train.batch_size
    if per_epoch < 1:
        raise PreflightError(f"{pairs} training pairs are fewer than train.batch_size {cfg.train.batch_size}")
    if cfg.train.epochs:
        return per_epoch * cfg.train.epochs, cfg.train.epochs
    return cfg.train.steps, math.ceil(cfg.train.steps / per_epoch)


def fit(cfg: PlatformConfig, callbacks: list | None = None, evaluate_test: bool = True) -> FitResult:
    """Train with Ray Train + DeepSpeed; resume the run of the same name if it exists.

    Args:
        cfg: the job's config (needs model, data with prepared_uri, train).
        callbacks: Ray Train user callbacks (a Tune trial passes `TuneReportCallback`).
        evaluate_test: score the best-on-val checkpoint on the test split at the end.
    """
    t0 = time.perf_counter()
    cfg = with_absolute_paths(cfg)
    images, pairs = preflight(cfg)
    total_steps, epochs = plan_steps(cfg, pairs)
    ensure_ray()
    # Our own progress lines say steps/s and ETA; Data's bars only flood the logs (also in Tune trials).
    ray.data.DataContext.get_current().enable_progress_bars = False
    if cfg.data.deterministic:  # Train copies the driver's execution options into its ingest
        ray.data.DataContext.get_current().execution_options.preserve_order = True
    arch = arch_info(cfg.model.backbone.arch)
    run_dir = storage.join(cfg.run.output_dir, cfg.run.name)
    workers = cfg.train.workers
    num_workers: int | tuple[int, int] = workers.max if workers.min == workers.max else (workers.min, workers.max)
    storage_path, storage_fs = storage.ray_storage(cfg.run.output_dir)
    log.info("training %s: %d pairs, %d epochs, %d steps, global batch %d, workers %s, ZeRO %d",
             cfg.run.name, pairs, epochs, total_steps, cfg.train.batch_size, num_workers,
             cfg.train.deepspeed.zero_stage)
    # What uniform sampling of pairs (the paper code's) would put in a batch: the runs' history
    # shows each epoch's measured share beside it (harma.data.composition).
    captions = captions_per_image(cfg.data.prepared_uri, cfg.data.train_split)
    uniform_share = uniform_same_image_share(captions, cfg.train.batch_size)
    visits = resolve_image_visits(cfg.data, captions)
    if visits > 1:
        log.info("the split's %d pairs outgrow a worker's shuffle buffer (%d): each image's captions go to %d "
                 "stream tasks, one decode each (data.image_visits)", sum(captions), cfg.data.shuffle_buffer_pairs, visits)
    with WorkerLogRelay() as relay:  # the workers' harma lines, printed here as they come
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"config": cfg.to_dict(), "total_steps": total_steps, "epochs": epochs,
                               "images": images, "run_dir": run_dir, "uniform_same_image_share": uniform_share,
                               "console": relay.handle},
            scaling_config=ray.train.ScalingConfig(
                num_workers=num_workers, use_gpu=workers.use_gpu,
                resources_per_worker={"CPU": workers.cpus_per_worker},
                elastic_resize_monitor_interval_s=workers.resize_interval_s),
            run_config=ray.train.RunConfig(
                name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
                worker_runtime_env={"env_vars": worker_env()}, callbacks=callbacks,
                failure_config=ray.train.FailureConfig(max_failures=workers.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=None, checkpoint_score_attribute="val_mr", checkpoint_score_order="max")),
            datasets={"train": build_train_dataset(cfg.data, arch.image_size, arch.context_length, cfg.run.seed,
                                                   captions=captions)},
            dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        )
        result = trainer.fit()
    summary = result.return_value or {}
    # From storage, not Ray's records: a checkpoint whose worker died before Ray registered it
    # still counts (harma.train.stored).
    checkpoints = stored_checkpoints(run_dir)
    best = best_on_val(checkpoints)
    best_metrics = best.metrics()
    # Published at a stable URI that eval, index and serve job files can name.
    best_uri = storage.join(run_dir, BEST)
    copy_checkpoint(best.uri, best_uri)
    log.info("best checkpoint on val (step %d, val mR %.2f): %s", best.step, best_metrics.get("val_mr", float("nan")),
             best_uri)
    test_report = evaluate_where_trained(cfg, best_uri) if evaluate_test else {}
    test = test_report.get("metrics", {})
    final_meta = checkpoints[-1].metrics()
    fit_result = FitResult(
        run_dir=run_dir, best_checkpoint=best_uri, best_step=best.step,
        best_val={k[4:]: v for k, v in best_metrics.items() if k.startswith("val_")},
        test=test, steps=summary.get("steps", final_meta.get("step", 0)),
        world_size=summary.get("world_size", final_meta.get("world_size", 0)),
        nodes=summary.get("nodes", []),
        # the last group's own record first: a group that restarted after the last checkpoint (a resize
        # or a failure with nothing left to train) wrote no checkpoint that lists its restart
        restarts=summary.get("restarts", final_meta.get("restarts", [])), bad_images=sorted(set(final_meta.get("bad_images", []))),
        seconds=time.perf_counter() - t0, report_dir=storage.join(run_dir, "report"),
        loop_seconds=summary.get("loop_seconds", 0.0), pairs_per_worker=summary.get("pairs_per_worker", 0),
        input_wait_seconds=summary.get("input_wait_seconds", 0.0), device=summary.get("device", ""),
        startup_wait_seconds=summary.get("startup_wait_seconds", 0.0), best_source=best.uri,
        test_official=test_report.get("metrics_official", {}), test_per_class=test_report.get("per_class"))
    files = write_run_report(fit_result, final_meta["history"], cfg)
    _track(cfg, run_dir, fit_result, final_meta["history"], files)
    return fit_result


def _track(cfg: PlatformConfig, run_dir: str, result: FitResult, history: list[dict], files: dict[str, bytes]) -> None:
    """The run in MLflow (harma.tracking; never fails the run): config, history, report, best URI."""
    from harma import tracking

    with tracking.start_run(cfg.to_dict(), run_dir, cfg.run.name, enabled=cfg.run.track) as run:
        run.log_history(history)
        run.log_report(files)
        final = {**{f"best_val_{k}": v for k, v in result.best_val.items()},
                 **{f"test_{k}": v for k, v in result.test.items()}}
        run.finish(result.best_checkpoint, {k: v for k, v in final.items() if isinstance(v, int | float)},
                   step=result.steps)


def evaluate_checkpoint(checkpoint_uri: str, prepared_uri: str, split: str) -> dict[str, float]:
    """A checkpoint's scores on a prepared split, exactly as `harma eval` computes them (the
    pessimistic-ties metrics of `harma.train.evaluate.evaluate_prepared`)."""
    return evaluate_prepared(checkpoint_uri, prepared_uri, split)["metrics"]


def evaluate_where_trained(cfg: PlatformConfig, checkpoint_uri: str) -> dict:
    """The best checkpoint's test report, computed in a Ray task with one training worker's
    resources (its GPU on a GPU cluster; the driver's head node may have no CPUs for work)."""
    workers = cfg.train.workers
    task = ray.remote(num_cpus=workers.cpus_per_worker, num_gpus=1 if workers.use_gpu else 0,
                      runtime_env={"env_vars": worker_env()})(evaluate_prepared)
    device = "cuda" if workers.use_gpu else "cpu"
    return ray.get(task.remote(checkpoint_uri, cfg.data.prepared_uri, cfg.data.test_split, device))


def write_run_report(result: FitResult, history: list[dict], cfg: PlatformConfig) -> dict[str, bytes]:
    """report/metrics.json, history.jsonl, training.png (loss and val mR over steps) and table.txt;
    returns them by name."""
    body = {k: v for k, v in result.__dict__.items()}
    body["config"] = cfg.to_dict()
    files = {
        "metrics.json": json.dumps(body, indent=1).encode(),
        "history.jsonl": "".join(json.dumps(r) + "\n" for r in history).encode(),
        "training.png": plot_history(history, cfg.run.name),
        "table.txt": (format_table({"best val": result.best_val, **({"test": result.test} if result.test else {})})
                      + "\n").encode(),
    }
    for name, data in files.items():
        storage.write_bytes(storage.join(result.report_dir, name), data)
    return files


def plot_history(history: list[dict], title: str) -> bytes:
    from harma.plots import new_figure, png_bytes

    fig, axes = new_figure(1, 2, (11, 4))
    rows = [r for r in history if "loss" in r]
    axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows])
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss")
    rows = [r for r in history if "val_mr" in r]
    axes[1].plot([r["step"] for r in rows], [r["val_mr"] for r in rows], marker="o")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("val mR (%)")
    fig.suptitle(title)
    return png_bytes(fig)
