"""The shipped synth chain (train -> eval -> index -> serve) names one set of URIs, and a missing
checkpoint or index is refused before any Ray cluster starts, with the URI in the message."""

from pathlib import Path

import pytest
import yaml

from harma.cli import main
from harma.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_the_shipped_synth_files_chain_through_the_published_best_checkpoint():
    train = load_config(REPO / "jobs" / "train_synth.yaml")
    best = f"{train.run.output_dir}/{train.run.name}/best"  # what harma train publishes
    ev = load_config(REPO / "jobs" / "eval_synth.yaml").eval
    index = load_config(REPO / "jobs" / "index_synth.yaml").index
    serve = yaml.safe_load((REPO / "serve_configs" / "local.yaml").read_text())["applications"][0]["args"]
    assert ev.checkpoint_uri == index.checkpoint_uri == serve["checkpoint_uri"] == best
    assert ev.prepared_uri == index.corpus_uri == train.data.prepared_uri
    assert serve["index_uri"] == index.output_uri


@pytest.fixture()
def no_cluster(monkeypatch):
    """Fail the test if anything starts Ray or `serve run`."""
    import subprocess

    import harma.train.driver

    def refuse(*args, **kwargs):
        raise AssertionError("a cluster was started before the inputs were checked")

    monkeypatch.setattr(harma.train.driver, "ensure_ray", refuse)
    monkeypatch.setattr(subprocess, "call", refuse)


@pytest.mark.parametrize("argv", [
    ["eval", "--checkpoint", "{missing}"],
    ["eval", "--config", str(REPO / "jobs" / "eval_synth.yaml"), "eval.checkpoint_uri={missing}"],
    ["index", "build", "--config", str(REPO / "jobs" / "index_synth.yaml"), "index.checkpoint_uri={missing}"],
    ["serve", str(REPO / "serve_configs" / "local.yaml"), "args.checkpoint_uri={missing}"],
])
def test_a_missing_checkpoint_is_refused_before_any_cluster_naming_it(tmp_path, capsys, no_cluster, argv):
    missing = str(tmp_path / "runs" / "no-such-run" / "best")
    assert main([a.replace("{missing}", missing) for a in argv]) == 2
    err = capsys.readouterr().err
    assert f"{missing}: no checkpoint here (missing config.yaml, adapter.safetensors)" in err


def test_serve_refuses_a_missing_index_before_any_cluster(tmp_path, capsys, no_cluster, tiny_model_config):
    from harma.config import PlatformConfig
    from harma.model.checkpoint import save_checkpoint
    from harma.model.harma import build_model

    cfg = PlatformConfig(model=tiny_model_config)
    save_checkpoint(str(tmp_path / "ckpt"), build_model(cfg.model), cfg, {})
    index = tmp_path / "no-index"
    assert main(["serve", str(REPO / "serve_configs" / "local.yaml"), f"args.checkpoint_uri={tmp_path / 'ckpt'}",
                 f"args.index_uri={index}"]) == 2
    assert f"{index}: no index here" in capsys.readouterr().err


def test_serve_checks_a_user_config_index_against_the_checkpoint_before_any_cluster(
        tmp_path, capsys, no_cluster, tiny_model_config):
    """An index a deployment's user_config swaps in is checked like args.index_uri: one built by
    another checkpoint is refused, naming it, before `serve run` starts anything."""
    import json

    from harma.config import PlatformConfig
    from harma.model.checkpoint import save_checkpoint
    from harma.model.harma import build_model
    from harma.serve.index import FORMAT, MANIFEST, checkpoint_fingerprint

    cfg = PlatformConfig(model=tiny_model_config)
    ckpt = str(tmp_path / "ckpt")
    save_checkpoint(ckpt, build_model(cfg.model), cfg, {})
    fp = checkpoint_fingerprint(ckpt)
    for name, fingerprint in (("good", fp["fingerprint"]), ("other", "0" * 64)):
        (tmp_path / name).mkdir()
        (tmp_path / name / MANIFEST).write_text(json.dumps({
            "format": FORMAT, "checkpoint_uri": "runs/elsewhere/best", "checkpoint_fingerprint": fingerprint,
            "config_sha256": fp["config_sha256"]}))
    raw = yaml.safe_load((REPO / "serve_configs" / "local.yaml").read_text())
    raw["applications"][0]["deployments"][0]["user_config"] = {"index_uri": str(tmp_path / "other")}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(raw))
    argv = ["serve", str(tmp_path / "serve.yaml"), f"args.checkpoint_uri={ckpt}", f"args.index_uri={tmp_path / 'good'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (f"the index was built with checkpoint 'runs/elsewhere/best', not with '{ckpt}' (its adapter weights "
            f"differ)") in err
