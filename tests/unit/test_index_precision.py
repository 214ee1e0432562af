"""An index of bf16 weights is an explicit choice whose cost is measured against the numerics that
validated the checkpoint (harma.serve.build.precision_record), checked here against an independent
evaluation of the same split in each precision."""

import numpy as np
import pytest
import torch

from harma.config import IndexConfig, PlatformConfig
from harma.data.prepare import prepare_dataset
from harma.data.prepared import load_prepared_split
from harma.model.checkpoint import save_checkpoint
from harma.model.harma import build_model
from harma.serve.build import precision_record
from harma.serve.encoder import QueryEncoder
from harma.train.evaluate import evaluate_split


@pytest.fixture()
def setup(tmp_path, synth_root, tiny_model_config):
    cfg = PlatformConfig(model=tiny_model_config)
    model = build_model(cfg.model, seed=3)
    with torch.no_grad():  # non-trivial adapters: their rounding matters too
        for _, p in model.trainable_named_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    ckpt = str(tmp_path / "ckpt")
    save_checkpoint(ckpt, model, cfg, {})
    store = str(tmp_path / "store")
    prepare_dataset(synth_root, store, ["test"])
    return ckpt, store


def _index_arrays(encoder: QueryEncoder, store: str):
    """What the index build stores: every test image's and caption's embedding, in shard order."""
    from harma.data.transforms import eval_uint8

    split = load_prepared_split(store, "test")
    pixels = np.stack([eval_uint8(img, encoder.image_size) for img in split.images])
    images = encoder.encode_pixels(pixels).cpu().numpy()
    texts = encoder.encode_texts(split.captions).cpu().numpy()
    meta = {"id": list(split.image_keys)}
    captions = {"caption": split.captions, "image_row": split.caption_image.tolist()}
    return images, texts, captions, meta, split


def test_a_bf16_index_records_its_measured_cost_against_fp32(setup):
    ckpt, store = setup
    cfg = IndexConfig(checkpoint_uri=ckpt, corpus_uri=store, output_uri="unused", precision="bf16")
    images, texts, captions, meta, split = _index_arrays(QueryEncoder(ckpt, "cpu", trace=False, precision="bf16"), store)
    record = precision_record(cfg, images, texts, captions, meta, progress=lambda _: None)
    assert record["weights"] == "bf16" and record["validated_in"] == "fp32"
    cost = record["cost"]
    fp32_model = QueryEncoder(ckpt, "cpu", trace=False).model
    bf16_model = QueryEncoder(ckpt, "cpu", trace=False, precision="bf16").model
    # The same figures by another path: harma eval's evaluation of the split in each precision.
    assert cost["mr_fp32"] == pytest.approx(evaluate_split(fp32_model, split, 30)["metrics"]["mr"], abs=1e-9)
    assert cost["mr_bf16"] == pytest.approx(evaluate_split(bf16_model, split, 30)["metrics"]["mr"], abs=1e-9)
    assert cost["mr_difference"] == pytest.approx(cost["mr_bf16"] - cost["mr_fp32"])
    assert cost["images"] == len(split.images) and cost["captions"] == len(split)
    # top-k overlap by hand: each caption's k best images under both (k = 10, or the index size)
    k = cost["top_k"]
    assert k == min(10, len(split.images))
    ref = QueryEncoder(ckpt, "cpu", trace=False)
    ref_images, ref_texts, *_ = _index_arrays(ref, store)
    low, high = np.argsort(-(texts @ images.T), axis=1)[:, :k], np.argsort(-(ref_texts @ ref_images.T), axis=1)[:, :k]
    assert cost["top_k_overlap"] == pytest.approx(np.mean([len(set(a) & set(b)) / k for a, b in zip(low, high, strict=True)]))


def test_an_index_in_the_validated_numerics_has_no_cost_to_report(setup):
    ckpt, store = setup
    cfg = IndexConfig(checkpoint_uri=ckpt, corpus_uri=store, output_uri="unused")
    images, texts, captions, meta, _ = _index_arrays(QueryEncoder(ckpt, "cpu", trace=False), store)
    assert precision_record(cfg, images, texts, captions, meta) == {"weights": "fp32", "validated_in": "fp32",
                                                                     "cost": None}
