"""Experiment tracking: a training run or a sweep logged to MLflow.

    with start_run(cfg.to_dict(), run_dir, cfg.run.name, enabled=cfg.run.track) as tracker:
        tracker.log_history(history)                      # or log_epoch(metrics, step) per epoch
        tracker.log_report({"training.png": png_bytes})   # bytes, local paths or s3:// URIs
        tracker.finish(best_checkpoint_uri, {"test_mr": 61.2})

What a run holds: the resolved config as parameters under flattened dotted paths
(`model.adapter.rank` = "128"; see `flatten_config`), per-epoch metrics with their step, the
report files as artifacts under `report/`, and the best checkpoint's URI as the tag
`harma.best_checkpoint`. A sweep is one parent run (`kind="sweep"`) with a nested child run per
trial: a child passes `parent=` the parent tracker or its `ref()` (a plain dict, so it travels to a
Ray Tune trial), and gets MLflow's `mlflow.parentRunId` tag, the parent's store and experiment.

Where it goes (`tracking_uri`):

* `MLFLOW_TRACKING_URI` set (a cluster's tracking server): that wins, always.
* otherwise, a local run folder: an embedded file store `<run_dir>/mlruns` (browse it with
  `mlflow ui --backend-store-uri <run_dir>/mlruns`).
* otherwise, an `s3://` run folder: MLflow's file store cannot live on S3, so params, metrics and
  tags go to `./mlruns` under the working directory (absolute, one warning says where), in an
  experiment named after the run folder whose artifact location is `<run_dir>/mlflow-artifacts`:
  the artifacts go beside the run on S3 through MLflow's own S3 support (boto3, a dependency
  already; the endpoint is `MLFLOW_S3_ENDPOINT_URL`, else `AWS_ENDPOINT_URL`, and
  `HARMA_S3_ENDPOINT` is passed on as `MLFLOW_S3_ENDPOINT_URL` when that is unset). For a
  multi-node cluster set `MLFLOW_TRACKING_URI` instead: `./mlruns` is one machine's disk.

Tracking never fails training: the first failure of the backend (unwritable folder, unreachable
server, S3 refusing an artifact) logs one warning and the tracker turns itself off (a failed
artifact upload only skips that upload); every call on an off tracker is a no-op. `enabled=False`
(the job's `run.track`) never imports MLflow. A resumed run (same run folder, not finished) goes on
in the same MLflow run: params already there are kept, steps already logged are not logged again,
so `log_history` of the whole history is idempotent. Calls are synchronous; an `http(s)` tracking
URI is probed first (5 s), so a server that is down costs seconds, not MLflow's minutes of retries.
This module imports neither Ray nor (until a tracker starts) MLflow.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from harma import storage

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "harma"
TAG_RUN_DIR = "harma.run_dir"
TAG_KIND = "harma.kind"
TAG_BEST_CHECKPOINT = "harma.best_checkpoint"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag (the UI nests children by it)
LOCAL_STORE = "mlruns"
S3_ARTIFACTS = "mlflow-artifacts"
_MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_MAX_KEY = 250  # MAX_ENTITY_KEY_LENGTH
_PROBE_TIMEOUT_S = 5.0
_warned_s3_default: set[str] = set()


# --------------------------------------------------------------------------------------------
# where
# --------------------------------------------------------------------------------------------
def tracking_uri(run_dir: str) -> str:
    """The MLflow tracking URI for a run folder: `MLFLOW_TRACKING_URI` if set, else the embedded
    file store `<run_dir>/mlruns` (local run folders) or `./mlruns` (s3:// run folders)."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return Path(_local_store(str(run_dir))).as_uri()


def _local_store(run_dir: str) -> str:
    if storage.is_s3(run_dir):
        store = str(Path(LOCAL_STORE).absolute())
        if run_dir not in _warned_s3_default:
            _warned_s3_default.add(run_dir)
            log.warning("experiment tracking: %s is on S3, where MLflow's file store cannot live; "
                        "params and metrics go to the local store %s, artifacts to %s (set "
                        "MLFLOW_TRACKING_URI to use a tracking server instead)", run_dir, store,
                        storage.join(run_dir, S3_ARTIFACTS))
        return store
    return str(Path(run_dir, LOCAL_STORE).expanduser().absolute())


def _uses_local_default() -> bool:
    return not os.environ.get("MLFLOW_TRACKING_URI", "").strip()


def _allow_file_store() -> None:
    # MLflow 3.x refuses to open a file store ("maintenance mode") unless this is set. We set it
    # only when we chose the embedded local store ourselves; a user's own MLFLOW_TRACKING_URI
    # gets MLflow's rules unchanged. setdefault: an explicit MLFLOW_ALLOW_FILE_STORE=false wins
    # (tracking then warns and turns off).
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _pass_s3_endpoint() -> None:
    # MLflow's S3 artifact client reads MLFLOW_S3_ENDPOINT_URL (boto3 itself AWS_ENDPOINT_URL);
    # harma.storage also honours HARMA_S3_ENDPOINT, so hand that one on.
    endpoint = os.environ.get("HARMA_S3_ENDPOINT")
    if endpoint and not os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = endpoint if "://" in endpoint else f"http://{endpoint}"


# --------------------------------------------------------------------------------------------
# what
# --------------------------------------------------------------------------------------------
def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict -> {dotted.path: value as MLflow stores it}.

    Scalars as `str(value)` (MLflow's own conversion: "128", "0.0003", "True", "None"); lists and
    empty dicts as JSON ("[0.9, 0.98]", "{}"). Keys keep MLflow's allowed characters (others
    become "_"); values are cut to MLflow's 6000-character limit.
    """
    out: dict[str, str] = {}
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, f"{path}."))
            continue
        if isinstance(value, (Mapping, list, tuple)):
            text = json.dumps(value, default=str)
        else:
            text = str(value)
        if len(text) > _MAX_PARAM_VALUE:
            text = text[: _MAX_PARAM_VALUE - 3] + "..."
        out[_clean_key(path)] = text
    return out


def _clean_key(key: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "_-. /:" else "_" for c in key)
    return cleaned[:_MAX_KEY]


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The plain numbers of a metrics dict (bools, strings, lists and None are not metrics)."""
    return {_clean_key(k): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --------------------------------------------------------------------------------------------
# the tracker
# --------------------------------------------------------------------------------------------
class RunTracker:
    """One MLflow run. Create it with `start_run`; use it as a context manager so a crash marks
    the run FAILED. Every method is a no-op once the tracker is off (disabled or failed)."""

    def __init__(self, run_name: str, run_dir: str, enabled: bool = True) -> None:
        self.run_name = run_name
        self.run_dir = str(run_dir)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.tracking_uri: str | None = None
        self._active = bool(enabled)
        self._warned = False
        self._finished = False
        self._local_default = False
        self._client: Any = None
        self._logged: set[tuple[str, int]] = set()  # (metric, step) already in the run
        self._last_step = 0

    # -- state -------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """True while the run is being tracked (started, not off, not finished)."""
        return self._active and self.run_id is not None and not self._finished

    def ref(self) -> dict[str, Any] | None:
        """A plain, JSON-able handle for `start_run(..., parent=...)` in another process (a Tune
        trial); None when this tracker is off."""
        if not self.active:
            return None
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id,
                "run_id": self.run_id, "local_default": self._local_default}

    def _fail(self, what: str, err: BaseException, turn_off: bool = True) -> None:
        if not self._warned:
            self._warned = True
            log.warning("experiment tracking of %s: %s failed (%s: %s); %s", self.run_name, what,
                        type(err).__name__, str(err).splitlines()[0][:300] if str(err) else "",
                        "tracking is off for this run, training carries on" if turn_off
                        else "skipped, training carries on")
        else:
            log.debug("experiment tracking of %s: %s failed (%s)", self.run_name, what, err)
        if turn_off:
            self._active = False

    # -- start -------------------------------------------------------------------------------
    def _start(self, cfg: Mapping[str, Any] | None, parent: Mapping[str, Any] | None,
               experiment: str | None, kind: str, tags: Mapping[str, str] | None,
               resume: bool) -> None:
        if parent:
            self.tracking_uri = str(parent["tracking_uri"])
            self._local_default = bool(parent.get("local_default"))
        else:
            self.tracking_uri = tracking_uri(self.run_dir)
            self._local_default = _uses_local_default()
        if self._local_default:
            _allow_file_store()
            if storage.is_s3(self.run_dir):
                _pass_s3_endpoint()
        _probe(self.tracking_uri)

        from mlflow.tracking import MlflowClient

        self._client = client = MlflowClient(tracking_uri=self.tracking_uri)
        if parent:
            self.experiment_id = str(parent["experiment_id"])
        else:
            name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or (
                self.run_dir if self._local_default and storage.is_s3(self.run_dir) else DEFAULT_EXPERIMENT)
            location = (storage.join(self.run_dir, S3_ARTIFACTS)
                        if self._local_default and storage.is_s3(self.run_dir) else None)
            self.experiment_id = _experiment_id(client, name, location)

        run = _resumable(client, self.experiment_id, self.run_dir, parent) if resume else None
        existing: dict[str, str] = {}
        if run is not None:
            self.run_id = run.info.run_id
            existing = dict(run.data.params)
            for key in run.data.metrics:
                for m in client.get_metric_history(self.run_id, key):
                    self._logged.add((key, int(m.step)))
                    self._last_step = max(self._last_step, int(m.step))
            client.update_run(self.run_id, status="RUNNING")
            log.info("experiment tracking: resuming MLflow run %s of %s", self.run_id, self.run_name)
        else:
            run_tags = {TAG_RUN_DIR: self.run_dir, TAG_KIND: kind, **(tags or {})}
            if parent:
                run_tags[PARENT_TAG] = str(parent["run_id"])
            run = client.create_run(self.experiment_id, run_name=self.run_name, tags=run_tags)
            self.run_id = run.info.run_id
            log.info("experiment tracking: MLflow run %s of %s at %s", self.run_id, self.run_name,
                     self.tracking_uri)
        if cfg:
            self._log_params(flatten_config(cfg), existing)

    def _log_params(self, params: dict[str, str], existing: dict[str, str]) -> None:
        from mlflow.entities import Param

        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:
            log.warning("experiment tracking of %s: the resumed run keeps its logged values of %s "
                        "(MLflow params cannot change)", self.run_name,
                        ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""))
        todo = [Param(k, v) for k, v in params.items() if k not in existing]
        if todo:
            self._client.log_batch(self.run_id, params=todo)

    # -- during ------------------------------------------------------------------------------
    def log_epoch(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log the numbers in `metrics` at `step` (the global optimizer step); non-numbers are
        skipped, and so are (metric, step) pairs the run already has."""
        self._log_points([(k, v, int(step)) for k, v in _numeric(metrics).items()])

    def log_history(self, rows: Iterable[Mapping[str, Any]], step_key: str = "step") -> None:
        """Every row of a history (`{"step": ..., "loss": ..., "val_mr": ...}`) at its step, in
        few requests; rows without `step_key` are skipped. Idempotent: safe after live
        `log_epoch` calls and again on a resumed run."""
        if not self.active:
            return
        points = []
        for row in rows:
            if row.get(step_key) is None:
                continue
            step = int(row[step_key])
            points.extend((k, v, step) for k, v in _numeric(row).items() if k != step_key)
        self._log_points(points)

    def _log_points(self, points: list[tuple[str, float, int]]) -> None:
        if not self.active or not points:
            return
        try:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch, seen = [], set()
            for key, value, step in points:
                if (key, step) in self._logged or (key, step) in seen:
                    continue
                seen.add((key, step))
                batch.append(Metric(key, value, now, step))
            if batch:
                self._client.log_batch(self.run_id, metrics=batch)  # MLflow splits it in 1000s
                self._logged.update(seen)
            self._last_step = max(self._last_step, max(step for _, _, step in points))
        except Exception as err:  # tracking must never fail training
            steps = sorted({step for _, _, step in points})
            self._fail(f"logging metrics at step {steps[0]}" if len(steps) == 1
                       else f"logging metrics of steps {steps[0]}..{steps[-1]}", err)

    def log_report(self, files: Mapping[str, bytes | str | os.PathLike], artifact_path: str = "report") -> None:
        """Artifacts under `artifact_path`: name -> bytes, a local file path, or an s3:// URI
        (read through harma.storage). A failed upload is skipped with a warning; metrics go on."""
        if not self.active or not files:
            return
        try:
            with tempfile.TemporaryDirectory(prefix="harma-track-") as tmp:
                for name, content in files.items():
                    if isinstance(content, (bytes, bytearray, memoryview)):
                        data = bytes(content)
                    elif storage.is_s3(str(content)):
                        data = storage.read_bytes(str(content))
                    else:
                        data = Path(content).read_bytes()
                    target = Path(tmp, name)
                    if Path(tmp).resolve() not in target.resolve().parents:
                        raise ValueError(f"artifact name {name!r} leaves its folder")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                self._client.log_artifacts(self.run_id, tmp, artifact_path or None)
        except Exception as err:
            self._fail(f"uploading artifacts {sorted(files)}", err, turn_off=False)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active or not tags:
            return
        try:
            from mlflow.entities import RunTag

            self._client.log_batch(self.run_id, tags=[RunTag(_clean_key(k), str(v)[:8000])
                                                      for k, v in tags.items()])
        except Exception as err:
            self._fail("setting tags", err)

    # -- end ---------------------------------------------------------------------------------
    def finish(self, best_checkpoint_uri: str | None = None,
               final_metrics: Mapping[str, Any] | None = None, *, status: str = "FINISHED",
               step: int | None = None) -> None:
        """End the run: tag `harma.best_checkpoint`, log `final_metrics` (at `step`, default the
        last step logged) and set the status (FINISHED, FAILED or KILLED). Idempotent."""
        if not self.active:
            self._finished = True
            return
        try:
            if best_checkpoint_uri:
                self.set_tags({TAG_BEST_CHECKPOINT: best_checkpoint_uri})
            if final_metrics:
                self.log_epoch(final_metrics, self._last_step if step is None else step)
            if self.active:
                self._client.set_terminated(self.run_id, status=status)
        except Exception as err:
            self._fail("ending the run", err)
        self._finished = True

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._finished:
            if exc_type is None:
                self.finish()
            else:
                self.finish(status="KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


def start_run(cfg: Mapping[str, Any] | None, run_dir: str, run_name: str, *,
              parent: RunTracker | Mapping[str, Any] | None = None, enabled: bool = True,
              kind: str | None = None, experiment: str | None = None,
              tags: Mapping[str, str] | None = None, resume: bool = True) -> RunTracker:
    """Start (or resume) tracking one run; never raises because of the tracking backend.

    Args:
        cfg: the resolved config as a nested dict (`cfg.to_dict()`), logged as dotted params.
        run_dir: the run's folder (`<output_dir>/<name>`), local or s3://; picks the store.
        run_name: the MLflow run name.
        parent: the sweep's tracker or its `ref()`: this run becomes its nested child, in the
            parent's store and experiment. None (or an off parent's None ref): a top-level run.
        enabled: False = track nothing and never import MLflow (the job's `run.track`).
        kind: tag `harma.kind`: "run" (default), "trial" (default with a parent), "sweep".
        experiment: MLflow experiment name; default `MLFLOW_EXPERIMENT_NAME`, else "harma" (else
            the run folder's URI for an s3:// run folder on the local default store).
        tags: extra tags for a new run.
        resume: continue the newest unfinished MLflow run logged for this same run folder.
    """
    parent_ref = parent.ref() if isinstance(parent, RunTracker) else parent
    tracker = RunTracker(run_name, run_dir, enabled)
    if not enabled:
        return tracker
    try:
        tracker._start(cfg, parent_ref, experiment, kind or ("trial" if parent_ref else "run"),
                       tags, resume)
    except Exception as err:
        tracker._fail(f"starting at {tracker.tracking_uri or run_dir}", err)
    return tracker


# --------------------------------------------------------------------------------------------
# backend helpers
# --------------------------------------------------------------------------------------------
def _probe(uri: str) -> None:
    """Fail fast (OSError) when an http(s) tracking server does not answer at all; any HTTP
    answer, even 401/404, means it is there."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise OSError(f"no tracking server answers at {uri} ({reason})") from None


def _experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:
        found = client.get_experiment_by_name(name)  # another process created it just now
        if found is None:
            raise
        return found.experiment_id


def _resumable(client: Any, experiment_id: str, run_dir: str, parent: Mapping[str, Any] | None):
    """The newest unfinished run of this run folder (same parent for a child), or None."""
    if "'" in run_dir:
        return None  # MLflow's filter language cannot quote it; start a new run
    query = f"tags.`{TAG_RUN_DIR}` = '{run_dir}' and attributes.status != 'FINISHED'"
    if parent:
        query += f" and tags.`{PARENT_TAG}` = '{parent['run_id']}'"
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0] if runs else None


__all__ = ["RunTracker", "flatten_config", "start_run", "tracking_uri"]
