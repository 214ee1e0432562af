"""The CLI end to end on small inputs: model summary, data synth, eval, demo."""

import json
from pathlib import Path

import pytest

from harma.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_model_summary_json_vit_b32_official(capsys):
    assert main(["model", "summary", "--config", str(REPO / "jobs" / "demo.yaml"), "--json",
                 "model.backbone.arch=ViT-B-32", "model.adapter.rank=128", "model.adapter.heads=8",
                 "model.adapter.mini_rank=64", "model.adapter.mini_heads=8"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == "ViT-B-32" and info["adapter_layout"] == "official"
    assert info["trainable_params"] == 5_934_397
    assert info["total_params"] == 151_277_313 + 5_934_397


def test_model_summary_ignores_weights_and_reports_bad_arch(capsys):
    assert main(["model", "summary", "--config", str(REPO / "jobs" / "demo.yaml"),
                 "model.backbone.arch=NoSuchNet"]) == 2
    assert "unknown architecture 'NoSuchNet'" in capsys.readouterr().err


def test_data_synth_then_eval_a_checkpoint(tmp_path, capsys, tiny_model_config):
    from harma.config import PlatformConfig
    from harma.model import build_model
    from harma.model.checkpoint import save_checkpoint

    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--images", "20", "--seed", "1"]) == 0
    assert json.loads((data / "dataset.json").read_text())["splits"]["test"] == 3
    cfg = PlatformConfig(model=tiny_model_config).with_overrides({"data.root": str(data)})
    save_checkpoint(str(tmp_path / "ckpt"), build_model(cfg.model), cfg, {})
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "I2T R@1" in out and "mR" in out
    result = json.loads((tmp_path / "ckpt" / "eval_test.json").read_text())
    assert result["images"] == 3 and result["captions"] == 15
    assert set(result["metrics"]) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mr",
                                      "protocol"}
    assert result["metrics"].pop("protocol") == "pessimistic ties"
    assert result["metrics"] == pytest.approx(_ranked_by_hand(tmp_path / "ckpt", data, "test"), abs=1e-9)


def _ranked_by_hand(checkpoint, data_root, split_name) -> dict[str, float]:
    """R@1/5/10 both ways and mR of a checkpoint on a split, ranked here with argsort."""
    import numpy as np
    import torch

    from harma.data.local import eval_arrays, load_split
    from harma.model.backbone import build_tokenizer
    from harma.model.checkpoint import load_checkpoint

    model, cfg = load_checkpoint(str(checkpoint))
    split = load_split(str(data_root), split_name)
    images, tokens = eval_arrays(split, model.arch.image_size, build_tokenizer(model.arch.name),
                                 cfg.data.max_words)
    with torch.no_grad():
        model.eval()
        sim = (model.encode_image(torch.from_numpy(images)) @ model.encode_text(torch.from_numpy(tokens)).T).numpy()
    owner = split.caption_image
    order_i2t = np.argsort(-sim, axis=1)  # per image: captions, best first
    i2t = [min(np.flatnonzero(owner[order_i2t[i]] == i)) for i in range(sim.shape[0])]
    order_t2i = np.argsort(-sim, axis=0)  # per caption: images, best first
    t2i = [int(np.flatnonzero(order_t2i[:, c] == owner[c])[0]) for c in range(sim.shape[1])]
    out = {f"{d}_r{k}": 100.0 * np.mean(np.array(r) < k) for d, r in (("i2t", i2t), ("t2i", t2i)) for k in (1, 5, 10)}
    assert len(np.unique(sim)) == sim.size  # no ties: the ranks above are the only ones
    return {**out, "mr": sum(out.values()) / 6}


def test_eval_of_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'}: no checkpoint here (missing config.yaml, adapter.safetensors)" in capsys.readouterr().err


def test_eval_job_file_scores_prepared_shards_like_the_local_split(tmp_path, capsys, tiny_model_config):
    from harma.config import PlatformConfig
    from harma.data.prepare import prepare_dataset
    from harma.model import build_model
    from harma.model.checkpoint import save_checkpoint

    data, store, ckpt = tmp_path / "data", tmp_path / "store", tmp_path / "ckpt"
    assert main(["data", "synth", "--out", str(data), "--images", "20", "--seed", "1"]) == 0
    prepare_dataset(str(data), str(store), ["test"])
    cfg = PlatformConfig(model=tiny_model_config).with_overrides({"data.root": str(data)})
    save_checkpoint(str(ckpt), build_model(cfg.model), cfg, {})
    assert main(["eval", "--checkpoint", str(ckpt), "--split", "test", "--out", str(tmp_path / "local.json")]) == 0
    job = tmp_path / "eval.yaml"
    job.write_text(f"run: {{name: e}}\neval: {{checkpoint_uri: {ckpt}, prepared_uri: {store}}}\n")
    assert main(["eval", "--config", str(job)]) == 0
    from_job = json.loads((ckpt / "eval_test.json").read_text())
    assert from_job["data"] == str(store) and from_job["split"] == "test"
    assert from_job["metrics"] == json.loads((tmp_path / "local.json").read_text())["metrics"]
    capsys.readouterr()
    assert main(["eval", "--config", str(REPO / "jobs" / "train_synth.yaml")]) == 2
    assert "no eval: section" in capsys.readouterr().err
    assert main(["eval"]) == 2
    assert "give --checkpoint URI or --config FILE" in capsys.readouterr().err
