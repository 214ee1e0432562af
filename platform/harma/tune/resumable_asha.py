"""ASHA that keeps its early-stopping decisions across a resumed sweep.

Ray Tune 2.60 saves the search algorithm's state with the experiment but not the scheduler's:
`Tuner.restore` brings ASHA back as it was pickled when the sweep started, with empty rungs. The
trials left to run after a killed driver are then compared with nothing, and none is stopped early,
so an interrupted sweep spends more and ranks differently from an uninterrupted one.

`ResumableASHA` fixes that at the one place every restored trial passes through, `on_trial_add`:
it replays the trial's own earlier results, read back from the `result.json` Tune wrote in the
trial's folder (local or object storage), into the trial's rungs. Replaying is the same bookkeeping
the live sweep did (a rung records a trial's first result at or past its milestone, once), so the
rungs after a resume hold what they held before the kill. A new trial has no results and is
untouched; a trial restarted from scratch has a new id and its old rows are not replayed.

Used by `harma.tune.sweep` for `tune.scheduler.kind: asha`.
"""

from __future__ import annotations

import json
import logging

from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"


def rung_history(result_lines: bytes, trial_id: str, time_attr: str, metric: str) -> list[tuple[float, float]]:
    """`(time, metric)` of every result of `trial_id` in a Tune `result.json` (JSON lines), in order.

    Rows of other trial ids (a trial restarted under a new id in the same folder), rows without the
    time or the metric, and a torn last line (the driver killed mid-write) are skipped.
    """
    history = []
    for line in result_lines.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("trial_id") != trial_id or row.get(time_attr) is None or row.get(metric) is None:
            continue
        history.append((float(row[time_attr]), float(row[metric])))
    return history


def read_trial_results(trial) -> bytes:
    """The bytes of the trial's `result.json` on its storage, or b"" when it has none yet."""
    storage = getattr(trial, "storage", None)
    if storage is None:
        return b""
    try:
        path = f"{storage.trial_fs_path}/{RESULT_FILE}"
        with storage.storage_filesystem.open_input_stream(path) as stream:
            return stream.readall()
    except (OSError, RuntimeError):  # no file yet (a new trial), or no trial folder assigned
        return b""


class ResumableASHA(AsyncHyperBandScheduler):
    """`ray.tune.schedulers.ASHAScheduler` whose rungs are rebuilt from the trials' own results
    when a sweep is restored (same arguments as ASHAScheduler)."""

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        history = rung_history(read_trial_results(trial), trial.trial_id, self._time_attr, self._metric)
        if history:
            self.replay(trial, history)

    def replay(self, trial, history: list[tuple[float, float]]) -> None:
        """Record `history` (a trial's earlier `(time, metric)` results) in its bracket's rungs."""
        bracket = self._trial_info[trial.trial_id]
        for time_value, metric_value in history:
            bracket.on_result(trial, time_value, self._metric_op * metric_value)
        log.info("ASHA: %d earlier result(s) of trial %s restored into its rungs", len(history), trial)
        if trial.status in (Trial.TERMINATED, Trial.ERROR):
            del self._trial_info[trial.trial_id]  # as `on_trial_complete` did before the kill
