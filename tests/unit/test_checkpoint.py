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


def test_a_bf16_autocast_run_reloads_in_the_fp32_numerics_that_validated_it(tmp_path, trained):
    """A GPU run with model.backbone.precision bf16: fp32 master weights, bf16 autocast in training,
    validation in fp32. Its checkpoint's config says bf16; it must reload as the fp32 model."""
    model, cfg = trained
    bf16_cfg = cfg.with_overrides({"model.backbone.precision": "bf16"})
    uri = str(tmp_path / "ckpt")
    save_checkpoint(uri, model, bf16_cfg, {}, {"master_weights": "fp32", "autocast": "bf16", "validated_in": "fp32"})
    validated, loaded_cfg = load_checkpoint(uri)
    assert next(validated.parameters()).dtype == torch.float32
    assert loaded_cfg.model.backbone.precision == "fp32"
    for got, want in zip(_embed(validated), _embed(model), strict=True):
        assert torch.equal(got, want)  # the very model that was validated
    explicit, explicit_cfg = load_checkpoint(uri, "bf16")  # bf16 weights: only when asked for
    assert next(explicit.parameters()).dtype == torch.bfloat16 and explicit_cfg.model.backbone.precision == "bf16"
    tokens = torch.from_numpy(build_tokenizer("harma-tiny")(["three ships on the sea"]))
    with torch.no_grad():
        assert not torch.equal(explicit.encode_text(tokens).float(), model.encode_text(tokens))
    with pytest.raises(ValueError, match="give 'validated', 'fp32' or 'bf16'"):
        load_checkpoint(uri, "fp16")


def test_a_checkpoint_records_its_numerics_and_an_old_one_falls_back_to_its_config(tmp_path, trained):
    from harma import storage
    from harma.model.checkpoint import NUMERICS_FILE, copy_checkpoint, read_numerics

    model, cfg = trained
    uri = str(tmp_path / "ckpt")
    save_checkpoint(uri, model, cfg, {})  # a plain fp32 model, no autocast
    assert read_numerics(uri) == {"master_weights": "fp32", "autocast": None, "validated_in": "fp32"}
    copy_checkpoint(uri, str(tmp_path / "copy"))
    assert read_numerics(str(tmp_path / "copy")) == read_numerics(uri)
    old = tmp_path / "old"
    save_checkpoint(str(old), model.to(torch.bfloat16), cfg.with_overrides({"model.backbone.precision": "bf16"}), {})
    (old / NUMERICS_FILE).unlink()  # written before numerics.json existed
    assert read_numerics(str(old))["validated_in"] == "bf16"
    assert next(load_checkpoint(str(old))[0].parameters()).dtype == torch.bfloat16
    copy_checkpoint(str(old), str(tmp_path / "old-copy"))
    assert not storage.exists(str(tmp_path / "old-copy" / NUMERICS_FILE))
