"""ResumableASHA: a restored sweep's rungs hold what the uninterrupted sweep's held (no Ray cluster)."""

import json
from types import SimpleNamespace

import pyarrow.fs
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from harma.tune.resumable_asha import ResumableASHA, read_trial_results, rung_history

ARGS = dict(time_attr="training_iteration", metric="val_mr", mode="max", max_t=3, grace_period=1,
            reduction_factor=2)
FIRST = [(1, 60.0), (2, 62.0), (3, 63.0)]  # the finished trial's val mR per epoch


def _trial(trial_id, status=Trial.PENDING, folder=None):
    storage = None
    if folder is not None:
        storage = SimpleNamespace(trial_fs_path=str(folder), storage_filesystem=pyarrow.fs.LocalFileSystem())
    return SimpleNamespace(trial_id=trial_id, status=status, storage=storage)


def _result(trial_id, iteration, val_mr):
    return {"trial_id": trial_id, "training_iteration": iteration, "val_mr": val_mr}


def _write_results(folder, rows, torn_tail=False):
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (folder / "result.json").write_text(text + ('{"trial_id": "a", "train' if torn_tail else ""))


def test_uninterrupted_sweep_stops_a_weak_second_trial():
    # the behaviour a resume must reproduce: B's epoch-1 val mR 50 is under A's 60 at rung 1
    asha = ResumableASHA(**ARGS)
    a, b = _trial("a"), _trial("b")
    asha.on_trial_add(None, a)
    decisions = [asha.on_trial_result(None, a, _result("a", it, v)) for it, v in FIRST]
    assert decisions == [TrialScheduler.CONTINUE, TrialScheduler.CONTINUE, TrialScheduler.STOP]  # max_t
    asha.on_trial_complete(None, a, _result("a", 3, 63.0))
    asha.on_trial_add(None, b)
    assert asha.on_trial_result(None, b, _result("b", 1, 50.0)) == TrialScheduler.STOP


def test_restored_finished_trial_is_replayed_so_the_next_trial_is_still_stopped(tmp_path):
    folder = tmp_path / "sweep" / "trial-a"
    # rows of a trial restarted under another id in the same folder must not count
    _write_results(folder, [_result("a", it, v) for it, v in FIRST] + [_result("old", 1, 99.0)],
                   torn_tail=True)
    resumed = ResumableASHA(**ARGS)
    resumed.on_trial_add(None, _trial("a", Trial.TERMINATED, folder))
    b = _trial("b", folder=tmp_path / "sweep" / "trial-b")  # no results yet: a new trial
    resumed.on_trial_add(None, b)
    assert resumed.on_trial_result(None, b, _result("b", 1, 50.0)) == TrialScheduler.STOP
    # ... and a trial above A's rung-1 value carries on, as it would have without the kill
    c = _trial("c", folder=tmp_path / "sweep" / "trial-c")
    resumed.on_trial_add(None, c)
    assert resumed.on_trial_result(None, c, _result("c", 1, 70.0)) == TrialScheduler.CONTINUE
    # the stock scheduler, restored the same way, has empty rungs and lets B run (the defect)
    stock = ASHAScheduler(**ARGS)
    stock.on_trial_add(None, _trial("a", Trial.TERMINATED, folder))
    stock.on_trial_add(None, b)
    assert stock.on_trial_result(None, b, _result("b", 1, 50.0)) == TrialScheduler.CONTINUE


def test_restored_unfinished_trial_keeps_its_rung_and_is_not_judged_twice(tmp_path):
    folder = tmp_path / "trial-a"
    _write_results(folder, [_result("a", 1, 60.0)])
    resumed = ResumableASHA(**ARGS)
    a = _trial("a", Trial.PENDING, folder)  # killed mid-run, resumed from its checkpoint
    resumed.on_trial_add(None, a)
    rungs = {milestone: dict(recorded) for milestone, recorded in resumed._trial_info["a"]._rungs}
    assert rungs == {2: {}, 1: {"a": 60.0}}
    # it re-reports epoch 1 (from its epoch-1 checkpoint): the rung already holds it, no new cutoff
    assert resumed.on_trial_result(None, a, _result("a", 1, 10.0)) == TrialScheduler.CONTINUE
    assert dict(resumed._trial_info["a"]._rungs[1][1]) == {"a": 60.0}


def test_rung_history_reads_only_complete_rows_of_the_trial():
    lines = b"\n".join([json.dumps(_result("a", 1, 60.0)).encode(), b'{"trial_id": "a"}',
                        json.dumps({"trial_id": "a", "training_iteration": 2}).encode(),
                        json.dumps(_result("z", 2, 1.0)).encode(), json.dumps(_result("a", 2, 61.5)).encode(),
                        b'{"trial_id": "a", "tr'])
    assert rung_history(lines, "a", "training_iteration", "val_mr") == [(1.0, 60.0), (2.0, 61.5)]


def test_a_trial_without_storage_or_results_reads_as_empty(tmp_path):
    assert read_trial_results(_trial("a")) == b""
    assert read_trial_results(_trial("a", folder=tmp_path / "missing")) == b""
