"""`harma tune`: a Ray Tune sweep whose every trial is `harma.train.driver.fit` (Ray Train inside).

    harma tune --config jobs/sweep_synth.yaml [overrides]

Each trial applies its sampled values to the config and runs the same training function as
`harma train` (Ray 2.60's Tune-over-Train pattern: the trial is a small driver that fits a
TorchTrainer and forwards its reports with `TuneReportCallback`), reading the prepared shards from
object storage and checkpointing under the sweep's folder. ASHA stops weak trials early on the
reported val mR (one report per epoch). Trial names come from the sampled values, never from
timestamps. Re-running a sweep whose driver died resumes it: finished trials are not run again, and
ASHA's rungs are rebuilt from the trials' earlier results (`harma.tune.resumable_asha`), so the
resumed sweep stops the same trials early as an uninterrupted one.

Output in `<run.output_dir>/<run.name>/summary/`: `table.txt` / `table.json` (trial, rank, trainable
parameters, val mR, test mR of the best-on-val checkpoint, epochs run, time, stopped early),
`val_mr_vs_params.png`, and `best.yaml`, the best trial as a ready-to-run job file.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from functools import partial

import ray.tune

import ray
from harma import storage
from harma.config import PlatformConfig
from harma.model.harma import build_model, parameter_summary
from harma.train.driver import (
    ensure_ray,
    evaluate_checkpoint,
    fit,
    plan_steps,
    preflight,
    with_absolute_paths,
)
from harma.tune.resumable_asha import ResumableASHA
from harma.tune.space import check_space_values, to_param_space, trial_name

log = logging.getLogger(__name__)


@dataclass
class TrialRow:
    trial: str
    overrides: dict
    rank: int
    trainable_params: int
    val_mr: float
    test_mr: float
    epochs: int
    seconds: float
    stopped_early: bool
    checkpoint: str


@dataclass
class SweepResult:
    sweep_dir: str
    rows: list[TrialRow]
    best: TrialRow
    best_config_path: str
    seconds: float


def _trial_config(base: PlatformConfig, overrides: dict, trials_dir: str) -> PlatformConfig:
    return base.with_overrides({**overrides, "run.name": trial_name(base.run.name, overrides),
                                "run.output_dir": trials_dir, "tune": None})


def run_trial(config: dict, base: dict, trials_dir: str) -> None:
    """The Tune trainable: one training run with this trial's values.

    Not tracked here: Tune ends a trial's process once its last epoch is reported (or ASHA stops
    it), before `fit` gets past training; the sweep logs every trial as a child run at its end.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = _trial_config(PlatformConfig.model_validate(base), config["overrides"], trials_dir)
    fit(cfg.with_overrides({"run.track": False}), callbacks=[TuneReportCallback()], evaluate_test=False)


def track_trials(tracker, cfg: PlatformConfig, rows: list[TrialRow], trials_dir: str) -> None:
    """Each trial as a child MLflow run of the sweep's: its config, its epochs' history (from its
    best checkpoint), its figures and its best checkpoint's URI."""
    from harma import tracking
    from harma.model.checkpoint import read_metrics

    for row in rows:
        trial_cfg = _trial_config(cfg, row.overrides, trials_dir)
        child = tracking.start_run(trial_cfg.to_dict(), storage.join(trials_dir, row.trial), row.trial,
                                   parent=tracker, enabled=cfg.run.track)
        child.log_history(read_metrics(row.checkpoint).get("history", []))
        child.finish(row.checkpoint, {"best_val_mr": row.val_mr, "best_test_mr": row.test_mr,
                                      "epochs": row.epochs, "stopped_early": float(row.stopped_early),
                                      "trainable_params": row.trainable_params})


def _name_of(trial) -> str:
    return trial_name(trial.config.get("__sweep__", "trial"), trial.config["overrides"])


def sweep(cfg: PlatformConfig) -> SweepResult:
    """Run (or resume) the sweep described by `cfg.tune`; returns the summary rows."""
    if cfg.tune is None:
        raise ValueError("the config has no tune section (tune.search_space)")
    t0 = time.perf_counter()
    check_space_values(cfg)
    cfg = with_absolute_paths(cfg)
    _, pairs = preflight(cfg)
    _, epochs = plan_steps(cfg, pairs)
    ensure_ray()
    sweep_dir = storage.join(cfg.run.output_dir, cfg.run.name)
    trials_dir = storage.join(sweep_dir, "trials")
    path, fs_arg = storage.ray_storage(cfg.run.output_dir)
    tune_cfg = cfg.tune
    from harma import tracking

    tracker = tracking.start_run(cfg.to_dict(), sweep_dir, cfg.run.name, kind="sweep", enabled=cfg.run.track)
    trainable = ray.tune.with_resources(
        partial(run_trial, base=cfg.to_dict(), trials_dir=trials_dir), {"cpu": tune_cfg.trial_cpus})
    exp_path = storage.resolve(sweep_dir)[1]
    if ray.tune.Tuner.can_restore(exp_path, storage_filesystem=fs_arg):
        log.info("resuming sweep %s: finished trials are kept", exp_path)
        tuner = ray.tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True, storage_filesystem=fs_arg)
    else:
        scheduler = None
        if tune_cfg.scheduler.kind == "asha":
            scheduler = ResumableASHA(
                time_attr="training_iteration", max_t=epochs,
                grace_period=tune_cfg.scheduler.grace_period,
                reduction_factor=tune_cfg.scheduler.reduction_factor)
        param_space = {**to_param_space(cfg), "__sweep__": cfg.run.name}
        tuner = ray.tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=ray.tune.TuneConfig(
                metric=tune_cfg.metric, mode=tune_cfg.mode, num_samples=tune_cfg.num_samples,
                scheduler=scheduler,
                # Seeded sampling; the concurrency limit must live here: Tune ignores
                # max_concurrent_trials when given a search-generator instance.
                search_alg=ray.tune.search.BasicVariantGenerator(
                    random_state=cfg.run.seed, max_concurrent=tune_cfg.max_concurrent_trials),
                trial_name_creator=_name_of, trial_dirname_creator=_name_of),
            run_config=ray.tune.RunConfig(name=cfg.run.name, storage_path=path,
                                          storage_filesystem=fs_arg, verbose=1),
        )
    grid = tuner.fit()
    rows = [summarize_trial(cfg, r.config["overrides"], r.metrics or {}, trials_dir, epochs)
            for r in grid if r.config]
    rows = [r for r in rows if r is not None]
    if not rows:
        raise RuntimeError(f"no trial of sweep {cfg.run.name} produced a checkpoint")
    best = max(rows, key=lambda r: r.val_mr if tune_cfg.mode == "max" else -r.val_mr)
    best_path = write_summary(cfg, rows, best, sweep_dir)
    track_trials(tracker, cfg, rows, trials_dir)
    summary = storage.join(sweep_dir, "summary")
    tracker.log_report({name: storage.join(summary, name) for name in
                        ("table.txt", "table.json", "val_mr_vs_params.png", "best.yaml")}, "summary")
    tracker.finish(best.checkpoint, {"best_val_mr": best.val_mr, "best_test_mr": best.test_mr})
    return SweepResult(sweep_dir, rows, best, best_path, time.perf_counter() - t0)


def summarize_trial(cfg: PlatformConfig, overrides: dict, metrics: dict, trials_dir: str,
                    epochs: int) -> TrialRow | None:
    """One table row from a trial's own checkpoints (works for finished and stopped trials)."""
    trial_cfg = _trial_config(cfg, overrides, trials_dir)
    run_dir = storage.join(trials_dir, trial_cfg.run.name)
    best_dir, best_val, epochs_run = None, float("-inf"), 0
    for uri in storage.list_files(run_dir, "metrics.json"):
        if "/checkpoint_" not in uri:
            continue
        meta = json.loads(storage.read_bytes(uri))
        epochs_run = max(epochs_run, int(meta.get("epoch", 0)))
        if meta.get("val_mr", float("-inf")) > best_val:
            best_val, best_dir = meta["val_mr"], uri.rsplit("/", 1)[0]
    if best_dir is None:
        return None
    model_cfg = trial_cfg.model.model_copy(update={"backbone": trial_cfg.model.backbone.model_copy(
        update={"weights_uri": None})})
    params = parameter_summary(build_model(model_cfg))["trainable_params"]
    test = evaluate_checkpoint(best_dir, trial_cfg.data.prepared_uri, trial_cfg.data.test_split)
    return TrialRow(trial=trial_cfg.run.name, overrides=overrides, rank=trial_cfg.model.adapter.rank,
                    trainable_params=params, val_mr=best_val, test_mr=test["mr"], epochs=epochs_run,
                    seconds=float(metrics.get("time_total_s", 0.0)), stopped_early=epochs_run < epochs,
                    checkpoint=best_dir)


def format_rows(rows: list[TrialRow]) -> str:
    head = f"{'trial':<44}{'rank':>6}{'trainable':>11}{'val mR':>8}{'test mR':>9}{'epochs':>8}{'time s':>8}  stopped"
    lines = [head]
    for r in sorted(rows, key=lambda r: r.trainable_params):
        lines.append(f"{r.trial[:43]:<44}{r.rank:>6}{r.trainable_params:>11,}{r.val_mr:>8.2f}"
                     f"{r.test_mr:>9.2f}{r.epochs:>8}{r.seconds:>8.0f}  {'early' if r.stopped_early else '-'}")
    return "\n".join(lines)


def write_summary(cfg: PlatformConfig, rows: list[TrialRow], best: TrialRow, sweep_dir: str) -> str:
    out = storage.join(sweep_dir, "summary")
    table = format_rows(rows)
    storage.write_bytes(storage.join(out, "table.txt"), (table + "\n").encode())
    storage.write_bytes(storage.join(out, "table.json"),
                        json.dumps([asdict(r) for r in rows], indent=1).encode())
    storage.write_bytes(storage.join(out, "val_mr_vs_params.png"), _plot(rows, cfg.run.name))
    best_cfg = cfg.with_overrides({**best.overrides, "run.name": f"{cfg.run.name}-best", "tune": None})
    best_path = storage.join(out, "best.yaml")
    header = (f"# harma train --config {best_path}\n"
              f"# Best trial of sweep {cfg.run.name}: {best.trial} (val mR {best.val_mr:.2f}, "
              f"test mR {best.test_mr:.2f}, {best.trainable_params:,} trainable parameters)\n")
    storage.write_bytes(best_path, (header + best_cfg.to_yaml()).encode())
    return best_path


def _plot(rows: list[TrialRow], title: str) -> bytes:
    from harma.plots import new_figure, png_bytes

    fig, ax = new_figure(1, 1, (6, 4))
    for r in rows:
        ax.scatter(r.trainable_params, r.val_mr, marker="x" if r.stopped_early else "o",
                   color="grey" if r.stopped_early else "tab:blue")
        ax.annotate(f"r{r.rank}", (r.trainable_params, r.val_mr), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("best val mR (%)")
    ax.set_title(f"{title}: o finished, x stopped early")
    return png_bytes(fig)
