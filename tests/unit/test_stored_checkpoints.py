"""Checkpoints read from the run's storage: what resume and the best-on-val choice rest on."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save

from harma import storage
from harma.model.checkpoint import ADAPTER_FILE, CONFIG_FILE
from harma.train.loop import _choose_resume_checkpoint, _read_resume_state
from harma.train.stored import STATE_FILE, best_on_val, check_safetensors_whole, stored_checkpoints


def _write(run_dir: str, name: str, step: int | None, val_mr: float | None = None, state: bytes | None = None,
           metrics_text: str | None = None, adapter: bytes | None = None) -> str:
    """A checkpoint folder as the training loop writes it (Ray uploads these four files)."""
    uri = storage.join(run_dir, name)
    storage.write_bytes(storage.join(uri, ADAPTER_FILE), adapter if adapter is not None else ADAPTER)
    storage.write_bytes(storage.join(uri, CONFIG_FILE), b"run: {name: r1}\n")
    metrics = {"epoch": 1, "step": step, **({"val_mr": val_mr} if val_mr is not None else {})}
    storage.write_bytes(storage.join(uri, "metrics.json"),
                        (metrics_text if metrics_text is not None else json.dumps(metrics)).encode())
    storage.write_bytes(storage.join(uri, STATE_FILE),
                        state if state is not None else save({"__step__": torch.tensor([step or 0])}))
    return uri


ADAPTER = save({"text.adapter.down": torch.arange(12.0).reshape(3, 4)}, metadata={"format": "harma-adapter-v1"})


def _run_dir(tmp_path) -> str:
    run = str(tmp_path / "runs" / "r1")
    _write(run, "checkpoint_2026-11-24_10-00-02", 16, 40.0)
    _write(run, "checkpoint_2026-11-24_10-00-01", 8, 55.0)
    _write(run, "checkpoint_2026-11-24_10-00-03", 24, 55.0)
    _write(run, "report", 24, 99.0)  # the run report's metrics.json: not a checkpoint
    _write(run, "checkpoint_2026-11-24_10-00-03/nested", 99, 99.0)  # deeper than a checkpoint
    _write(str(tmp_path / "runs" / "other"), "checkpoint_x", 48, 99.0)  # another run's
    _write(run, "checkpoint_2026-11-24_10-00-04", None, metrics_text="{not json")  # write cut short
    return run


def test_stored_checkpoints_sorted_by_step_and_only_this_runs(tmp_path):
    run = _run_dir(tmp_path)
    found = stored_checkpoints(run)
    assert [(c.step, c.val_mr) for c in found] == [(8, 55.0), (16, 40.0), (24, 55.0)]
    assert found[-1].uri == storage.join(run, "checkpoint_2026-11-24_10-00-03")
    assert found[-1].metrics()["step"] == 24
    assert stored_checkpoints(str(tmp_path / "no-such-run")) == []


def test_best_on_val_takes_the_latest_of_equal_scores(tmp_path):
    found = stored_checkpoints(_run_dir(tmp_path))
    assert best_on_val(found).step == 24
    assert best_on_val(found[:2]).step == 8
    with pytest.raises(ValueError, match="no checkpoint of the run has a val mR"):
        best_on_val([])


def test_resume_takes_the_newest_stored_checkpoint_over_ray_s_older_record(tmp_path):
    run = _run_dir(tmp_path)
    registered = SimpleNamespace(path=storage.join(run, "checkpoint_2026-11-24_10-00-01"))  # step 8
    chosen, (state, saved) = _choose_resume_checkpoint(run, registered)
    assert chosen == storage.join(run, "checkpoint_2026-11-24_10-00-03")
    assert int(state["__step__"][0]) == 24 and saved["step"] == 24  # what it loaded while choosing
    reread, _ = _read_resume_state(chosen)
    assert torch.equal(reread["__step__"], state["__step__"])


def test_checkpoints_cut_short_mid_upload_are_skipped(tmp_path):
    run = _run_dir(tmp_path)
    whole_state = save({"__step__": torch.tensor([32]), "m": torch.ones(100)})
    _write(run, "checkpoint_2026-11-24_10-00-05", 32, 99.0, state=whole_state[:-40])
    _write(run, "checkpoint_2026-11-24_10-00-06", 32, 99.0, adapter=ADAPTER[:20])  # inside the header
    no_config = _write(run, "checkpoint_2026-11-24_10-00-07", 32, 99.0)
    (tmp_path / "runs" / "r1" / "checkpoint_2026-11-24_10-00-07" / CONFIG_FILE).unlink()
    found = stored_checkpoints(run)
    assert [c.step for c in found] == [8, 16, 24]  # none of the three step-32 ones
    assert no_config not in {c.uri for c in found}
    assert best_on_val(found).step == 24  # the cut-short ones' val 99 is never chosen
    assert _choose_resume_checkpoint(run, None)[0] == storage.join(run, "checkpoint_2026-11-24_10-00-03")


def test_check_safetensors_whole(tmp_path):
    path = str(tmp_path / "a.safetensors")
    storage.write_bytes(path, ADAPTER)
    check_safetensors_whole(path)
    for data, message in [(ADAPTER[:-1], "bytes where its header describes"),
                          (ADAPTER + b"x", "bytes where its header describes"),
                          (ADAPTER[:30], "cut short inside its header"), (b"abc", "too short")]:
        storage.write_bytes(path, data)
        with pytest.raises(ValueError, match=message):
            check_safetensors_whole(path)


def test_resume_skips_a_registered_checkpoint_whose_state_does_not_load(tmp_path):
    broken = _write(str(tmp_path / "restored"), "checkpoint_a", 8, 1.0, state=b"not safetensors")
    assert _choose_resume_checkpoint(str(tmp_path / "runs" / "fresh"), SimpleNamespace(path=broken)) == (None, None)


def test_resume_with_nothing_stored_uses_ray_s_record_or_starts_fresh(tmp_path):
    empty = str(tmp_path / "runs" / "fresh")
    assert _choose_resume_checkpoint(empty, None) == (None, None)
    elsewhere = _write(str(tmp_path / "restored"), "checkpoint_a", 8, 1.0)
    assert _choose_resume_checkpoint(empty, SimpleNamespace(path=elsewhere))[0] == elsewhere


def test_stored_checkpoints_on_s3(s3_server):
    s3_server.create_bucket("stored-ckpts")
    run = "s3://stored-ckpts/runs/r1"
    _write(run, "checkpoint_b", 16, 30.0)
    _write(run, "checkpoint_a", 8, 31.0)
    _write(run, "report", 16, 99.0)
    found = stored_checkpoints(run)
    assert [(c.uri, c.step) for c in found] == [(f"{run}/checkpoint_a", 8), (f"{run}/checkpoint_b", 16)]
    assert best_on_val(found).uri == f"{run}/checkpoint_a"
    assert _choose_resume_checkpoint(run, None)[0] == f"{run}/checkpoint_b"
