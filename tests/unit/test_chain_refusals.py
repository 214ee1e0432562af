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
