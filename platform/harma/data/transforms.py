"""Image and caption transforms: pure functions on PIL images, strings and numpy batches.

Train (harma-method.md section 3): random resized crop (scale 0.5-1, bicubic) -> horizontal flip
-> RandomAugment(N, M) over {identity, autocontrast, equalize, brightness, sharpness, shear x/y,
translate x/y, rotate}, each sampled op applied with probability 0.5 -> CLIP normalisation.
Eval: bicubic resize to the model's size (no centre crop) -> CLIP normalisation.
Captions: the paper code's cleaning, then open_clip's BPE tokenizer.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from harma.config import AugmentConfig
from harma.data.annotations import clean_caption

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
FILL = (128, 128, 128)


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> RGB PIL image (raises PIL.UnidentifiedImageError/OSError when undecodable)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def to_array(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> (3, H, W) float32, CLIP-normalised."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return ((arr - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1).copy()


def eval_transform(img: Image.Image, size: int) -> np.ndarray:
    return to_array(img.resize((size, size), Image.BICUBIC))


def to_uint8(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> (3, H, W) uint8: 4x smaller than float32 to ship between processes."""
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def eval_uint8(img: Image.Image, size: int) -> np.ndarray:
    return to_uint8(img.resize((size, size), Image.BICUBIC))


def normalize_pixels(pixels):
    """(B, 3, H, W) uint8 torch tensor -> float32 CLIP-normalised, on the tensor's device.

    In place on the one float copy: `(x / 255 - mean) / std` bit for bit, without the two float
    temporaries the out-of-place form holds at once (77 MiB for 64 tiles of 224 px)."""
    import torch

    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return pixels.to(torch.float32, copy=True).div_(255.0).sub_(mean).div_(std)  # never the caller's tensor


def random_resized_crop(img: Image.Image, size: int, scale_min: float, rng: random.Random) -> Image.Image:
    """torchvision's RandomResizedCrop rule (ratio 3/4..4/3, 10 tries, then centre crop)."""
    width, height = img.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(scale_min, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return img.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))


def _enhance_factor(magnitude: int) -> float:
    return magnitude / 10 * 1.8 + 0.1


def _signed(value: float, rng: random.Random) -> float:
    return value if rng.random() < 0.5 else -value


def random_augment(img: Image.Image, n: int, magnitude: int, rng: random.Random) -> Image.Image:
    """RandomAugment(N, M): N ops drawn with replacement, each applied with probability 0.5."""
    size = img.size[0]
    ops = ("identity", "autocontrast", "equalize", "brightness", "sharpness",
           "shear_x", "shear_y", "translate_x", "translate_y", "rotate")
    for _ in range(n):
        op = ops[rng.randrange(len(ops))]
        if rng.random() >= 0.5 or op == "identity":
            continue
        if op == "autocontrast":
            img = ImageOps.autocontrast(img)
        elif op == "equalize":
            img = ImageOps.equalize(img)
        elif op == "brightness":
            img = ImageEnhance.Brightness(img).enhance(_enhance_factor(magnitude))
        elif op == "sharpness":
            img = ImageEnhance.Sharpness(img).enhance(_enhance_factor(magnitude))
        elif op in ("shear_x", "shear_y"):
            s = _signed(magnitude / 10 * 0.3, rng)
            coeffs = (1, s, 0, 0, 1, 0) if op == "shear_x" else (1, 0, 0, s, 1, 0)
            img = img.transform(img.size, Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=FILL)
        elif op in ("translate_x", "translate_y"):
            # 7 px at M=7 on a 224 px image in the paper code; scaled to this image's size.
            t = _signed(magnitude / 10 * 10 * size / 224, rng)
            coeffs = (1, 0, t, 0, 1, 0) if op == "translate_x" else (1, 0, 0, 0, 1, t)
            img = img.transform(img.size, Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=FILL)
        elif op == "rotate":
            img = img.rotate(_signed(magnitude / 10 * 30, rng), Image.BILINEAR, fillcolor=FILL)
    return img


def augment_image(img: Image.Image, size: int, cfg: AugmentConfig, rng: random.Random) -> Image.Image:
    """The training augmentation of one image, at the model's size (PIL in, PIL out)."""
    if not cfg.enabled:
        return img.resize((size, size), Image.BICUBIC)
    img = random_resized_crop(img, size, cfg.crop_scale_min, rng)
    if cfg.hflip and rng.random() < 0.5:
        img = ImageOps.mirror(img)
    if cfg.randaug_ops:
        img = random_augment(img, cfg.randaug_ops, cfg.randaug_magnitude, rng)
    return img


def train_transform(img: Image.Image, size: int, cfg: AugmentConfig, rng: random.Random) -> np.ndarray:
    """Augmented, normalised (3, size, size) float32 array."""
    return to_array(augment_image(img, size, cfg, rng))


def tokenize(captions: list[str], tokenizer, max_words: int) -> np.ndarray:
    """Captions -> (N, context) int64 token ids after the paper code's cleaning (`tokenizer`: a
    `harma.data.tokenizer.ClipTokenizer`)."""
    return tokenizer([clean_caption(c, max_words) for c in captions])
