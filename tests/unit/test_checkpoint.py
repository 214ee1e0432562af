"""Adapter checkpoints: exact round trip of embeddings, refusal of mismatched files, S3."""

import json

import pytest
import torch
from safetensors.torch import load_file

from harma.config import PlatformConfig
from harma.model import build_model
from harma.model.backbone import CheckpointMismatchError, build_tokenizer
from harma.model.checkpoint import load_checkpoint, save_backbone_weights, save_checkpoint


@pytest.fixture()
def trained(tmp_path, tiny_model_config):
    """A model with a saved base backbone and non-trivial adapter weights."""
    base = build_model(tiny_model_config.model_copy(update={"adapter": tiny_model_config.adapter.model_copy(update={"kind": "none"})}), seed=11)
    base_uri = str(tmp_path / "base.safetensors")
    save_backbone_weights(base_uri, base)
    cfg = PlatformConfig(model=tiny_model_config).with_overrides({"model.backbone.weights_uri": base_uri})
    model = build_model(cfg.model, seed=cfg.run.seed)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model, cfg


def _embed(model):
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    tokens = torch.from_numpy(build_tokenizer("harma-tiny")(["three ships on the sea", "a red building"]))
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def test_round_trip_reproduces_embeddings_exactly(tmp_path, trained):
    model, cfg = trained
    uri = str(tmp_path / "ckpt")
    save_checkpoint(uri, model, cfg, {"val": {"mr": 12.5}})
    state = load_file(str(tmp_path / "ckpt" / "adapter.safetensors"))
    assert set(state) == {n for n, _ in model.trainable_named_parameters()}
    assert not any(k.startswith("clip.") for k in state)  # adapter-only
    assert json.loads((tmp_path / "ckpt" / "metrics.json").read_text())["val"]["mr"] == 12.5
    loaded, loaded_cfg = load_checkpoint(uri)
    assert loaded_cfg == cfg
    for a, b in zip(_embed(model), _embed(loaded), strict=True):
        assert torch.equal(a, b)


def test_shared_minis_are_saved_once(tmp_path, trained):
    model, cfg = trained
    paper_cfg = cfg.with_overrides({"model.adapter.layout": "paper"})
    paper = build_model(paper_cfg.model)
    save_checkpoint(str(tmp_path / "p"), paper, paper_cfg, {})
    keys = load_file(str(tmp_path / "p" / "adapter.safetensors")).keys()
    assert sum(k.startswith("adapters.mini.0.") for k in keys) == len(list(paper.adapters.mini[0].state_dict()))
    assert not any(".mini." in k for k in keys if k.startswith(("adapters.image", "adapters.text")))


def test_mismatched_checkpoint_is_refused(tmp_path, trained):
    model, cfg = trained
    uri = str(tmp_path / "ckpt")
    save_checkpoint(uri, model, cfg, {})
    bigger = cfg.with_overrides({"model.adapter.rank": 32})
    (tmp_path / "ckpt" / "config.yaml").write_text(bigger.to_yaml())
    with pytest.raises(CheckpointMismatchError, match="shape keys"):
        load_checkpoint(uri)


def test_checkpoint_on_s3(s3_server, trained):
    model, cfg = trained
    s3_server.create_bucket("runs")
    save_checkpoint("s3://runs/demo/best", model, cfg, {"step": 3})
    loaded, _ = load_checkpoint("s3://runs/demo/best")
    for a, b in zip(_embed(model), _embed(loaded), strict=True):
        assert torch.equal(a, b)
