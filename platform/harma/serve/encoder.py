"""QueryEncoder: a trained checkpoint as text and image encoders on one device.

    enc = QueryEncoder("runs/demo/best")               # architecture from the checkpoint's config
    text_emb = enc.encode_texts(["two bridges over a river"])   # (1, D) on enc.device
    image_emb = enc.encode_pixels(enc.preprocess(png_bytes)[None])

Used by the index build (Ray Data actors), the Serve replicas and the serving benchmark, so the
index and the queries are embedded by exactly the same code. Images get the eval transform
(bicubic resize to the model's size, CLIP normalisation on the device).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from harma.data.transforms import eval_uint8, normalize_pixels, tokenize
from harma.serve.traced import Tower, trace_tower

log = logging.getLogger(__name__)

# Reject images whose header claims more pixels than this before decoding them (decompression bombs).
MAX_IMAGE_PIXELS = 64_000_000


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for but CUDA is not available")
    return torch.device(device)


_R = TypeVar("_R")


class ModelThread:
    """One dedicated thread for every torch call on a model, loading included.

    With torch's OpenMP backend each OS thread that runs a parallel op gets its own OpenMP team,
    and a second team, even idle, slowed ViT-B-32 text encoding on 2 CPU cores by ~40% (58 -> 80
    ms a query). Ray Data actors run `__init__` and `__call__` on different threads, and a Serve
    replica hands its model work to a worker thread, so both route their torch work through one
    of these.
    """

    def __init__(self, name: str = "harma-model"):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def call(self, fn: Callable[..., _R], *args: Any) -> _R:
        """`fn(*args)` on the model thread; blocks the caller, re-raises its exception."""
        return self.executor.submit(fn, *args).result()


class UnreadableImageError(ValueError):
    """Bytes that are not a decodable image of an allowed size."""


def open_query_image(data: bytes) -> Image.Image:
    """Image bytes -> RGB PIL image, opened once; the header's pixel count is checked before decoding."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise UnreadableImageError(f"image is too large; at most {MAX_IMAGE_PIXELS:,} pixels") from None
    except (OSError, ValueError) as err:
        raise UnreadableImageError("the bytes are not a decodable image (PNG, JPEG, TIFF, WebP ...)") from err
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise UnreadableImageError(f"image is {width}x{height}; at most {MAX_IMAGE_PIXELS:,} pixels")
    try:
        img.load()
        return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImageError("the image could not be decoded (truncated or corrupt)") from err


def decode_query_image(data: bytes, size: int) -> np.ndarray:
    """Image bytes -> (3, size, size) uint8 at the model's size (raises UnreadableImageError)."""
    return eval_uint8(open_query_image(data), size)


class QueryEncoder:
    """Text and image embeddings (L2-normalised, float32) from a checkpoint.

    With `trace=True` (the default) the towers named in `traced` (both unless told) run as
    TorchScript graphs checked against the eager model (see harma.serve.traced); `towers` says which
    form each tower runs in. An index build's embedding actor uses one tower and traces only that one
    (a traced graph costs its memory and start-up whether it is used or not).
    """

    def __init__(self, checkpoint_uri: str, device: str = "auto", trace: bool = True,
                 precision: str = "validated", traced: tuple[str, ...] = ("text", "image")):
        from harma.model.backbone import build_tokenizer
        from harma.model.checkpoint import load_checkpoint

        # The numerics that validated the checkpoint unless bf16 weights are asked for explicitly.
        model, cfg = load_checkpoint(checkpoint_uri, precision)
        self.precision = cfg.model.backbone.precision
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.config = cfg
        self.checkpoint_uri = checkpoint_uri
        self.image_size = model.arch.image_size
        self.embed_dim = model.arch.embed_dim
        self.arch = model.arch.name
        self.max_words = cfg.data.max_words
        self._tokenizer = build_tokenizer(model.arch.name)
        self._dtype = next(model.parameters()).dtype
        self._text: Tower = self.model.encode_text
        self._image: Tower = self.model.encode_image
        unknown = set(traced) - {"text", "image"}
        if unknown:
            raise ValueError(f"traced names towers 'text' and 'image', not {sorted(unknown)}")
        if trace:
            self._trace_towers(traced)

    def _trace_towers(self, traced: tuple[str, ...]) -> None:
        # bf16 rounding, or CUDA kernels chosen differently for the graph, move scores a little more.
        atol = 2e-2 if self._dtype != torch.float32 else 1e-3 if self.device.type == "cuda" else 1e-4
        texts = ["a", "two bridges over a river next to farmland", "many planes parked near a large terminal"]
        tokens = self._tokens(texts)
        size = self.image_size
        pixels = torch.rand((3, 3, size, size), generator=torch.Generator().manual_seed(0)).to(self.device, self._dtype)
        for kind, method, example, probes in (
            ("text", "encode_text", tokens[1:], [tokens[:1], tokens]),
            ("image", "encode_image", pixels[1:], [pixels[:1], pixels]),
        ):
            if kind not in traced:
                continue
            graph, why = trace_tower(self.model, method, example, probes, atol)
            if graph is None:
                log.warning("%s tower stays eager: %s", kind, why)
                continue
            setattr(self, f"_{kind}", graph)

    @property
    def towers(self) -> dict[str, str]:
        """How each tower runs: "traced" (a TorchScript graph) or "eager"."""
        return {kind: "traced" if isinstance(tower, torch.jit.ScriptModule) else "eager"
                for kind, tower in (("text", self._text), ("image", self._image))}

    def _tokens(self, texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(tokenize(texts, self._tokenizer, self.max_words)).to(self.device)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """(Q,) captions -> (Q, D) float32 embeddings on the device."""
        return self._text(self._tokens(texts)).float()

    def preprocess(self, data: bytes) -> np.ndarray:
        """Image bytes -> (3, S, S) uint8 at the model's size (raises UnreadableImageError)."""
        return decode_query_image(data, self.image_size)

    @torch.inference_mode()
    def encode_pixels(self, pixels: np.ndarray) -> torch.Tensor:
        """(B, 3, S, S) uint8 -> (B, D) float32 embeddings on the device. `pixels` may be read-only
        (a Ray Data block's, zero-copy): it is only read, into normalize_pixels' float copy."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            view = torch.from_numpy(np.ascontiguousarray(pixels))
        batch = normalize_pixels(view.to(self.device))
        return self._image(batch.to(self._dtype)).float()
