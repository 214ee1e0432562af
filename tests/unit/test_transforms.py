"""Image and caption transforms on in-memory inputs."""

import random

import numpy as np
import pytest
from PIL import Image

from harma.config import AugmentConfig
from harma.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    decode_image,
    eval_transform,
    random_augment,
    tokenize,
    train_transform,
)
from harma.model.backbone import build_tokenizer


def _image(value=(255, 0, 128), size=96):
    return Image.new("RGB", (size, size), value)


def test_eval_transform_resizes_and_normalises():
    arr = eval_transform(_image(), 48)
    assert arr.shape == (3, 48, 48) and arr.dtype == np.float32
    expected = (np.array([1.0, 0.0, 128 / 255], dtype=np.float32) - CLIP_MEAN) / CLIP_STD
    np.testing.assert_allclose(arr[:, 10, 10], expected, rtol=1e-5)


def test_train_transform_is_deterministic_for_a_seed_and_varies_otherwise():
    rng_img = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    img = Image.fromarray(rng_img)
    cfg = AugmentConfig()
    a = train_transform(img, 48, cfg, random.Random(1))
    b = train_transform(img, 48, cfg, random.Random(1))
    c = train_transform(img, 48, cfg, random.Random(2))
    assert a.shape == (3, 48, 48)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    off = train_transform(img, 48, AugmentConfig(enabled=False), random.Random(1))
    assert np.array_equal(off, eval_transform(img, 48))


def test_random_augment_keeps_size_and_mode():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    for seed in range(20):
        out = random_augment(img, 2, 7, random.Random(seed))
        assert out.size == (48, 48) and out.mode == "RGB"


def test_decode_rejects_garbage():
    with pytest.raises(OSError):
        decode_image(b"definitely not an image")


def test_tokenize_cleans_then_pads_to_context():
    tok = build_tokenizer("harma-tiny")
    ids = tokenize(["Two Storage-Tanks!", "two storage tanks"], tok, max_words=30)
    assert ids.shape == (2, 32)
    assert np.array_equal(ids[0], ids[1])  # cleaning makes them identical
    assert ids[0, 0] == tok.start_id and (ids[0] == tok.end_id).sum() == 1


def test_uint8_pixels_normalised_on_the_device_equal_the_float_path():
    import torch

    from harma.data.transforms import eval_uint8, normalize_pixels

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    via_uint8 = normalize_pixels(torch.from_numpy(eval_uint8(img, 48)[None]))[0].numpy()
    np.testing.assert_allclose(via_uint8, eval_transform(img, 48), rtol=1e-5, atol=1e-5)


def test_in_place_normalisation_is_the_formula_bit_for_bit_and_leaves_its_input_alone():
    import torch

    from harma.data.transforms import CLIP_MEAN, CLIP_STD, normalize_pixels

    pixels = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (4, 3, 16, 16), dtype=np.uint8))
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.equal(normalize_pixels(pixels), (pixels.float() / 255.0 - mean) / std)
    floats = pixels.float()
    kept = floats.clone()
    normalize_pixels(floats)  # a float input is copied, not normalised in place under the caller
    assert torch.equal(floats, kept)
