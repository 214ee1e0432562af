"""Encode a split with a model and score retrieval (R@K both ways, mR)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from harma.eval import evaluation_report, retrieval_metrics
from harma.model.harma import HarmaModel

if TYPE_CHECKING:
    from harma.data.local import Split


@torch.no_grad()
def embed_split(
    model: HarmaModel, images: np.ndarray, tokens: np.ndarray, batch_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """(N,3,H,W) images and (C,ctx) tokens -> (N,D) and (C,D) normalised embeddings.

    Batches go to the model's device (a GPU worker validates on its GPU); results come back as numpy.
    """
    model.eval()
    first = next(model.parameters())
    img_parts = [model.encode_image(torch.from_numpy(images[i : i + batch_size]).to(first.device, first.dtype))
                 .float().cpu() for i in range(0, len(images), batch_size)]
    txt_parts = [model.encode_text(torch.from_numpy(tokens[i : i + batch_size]).to(first.device)).float().cpu()
                 for i in range(0, len(tokens), batch_size)]
    return torch.cat(img_parts).numpy(), torch.cat(txt_parts).numpy()


def evaluate_arrays(
    model: HarmaModel, images: np.ndarray, tokens: np.ndarray, caption_image: np.ndarray,
    batch_size: int = 128,
) -> dict[str, float | str]:
    image_emb, text_emb = embed_split(model, images, tokens, batch_size)
    return retrieval_metrics(image_emb @ text_emb.T, caption_image)


def evaluate_split(model: HarmaModel, split: Split, max_words: int, batch_size: int = 128) -> dict:
    """Encode a whole split and score it as `harma eval` does: `harma.eval.evaluation_report`.

    Both tie protocols ("metrics": pessimistic, the default; "metrics_official": the paper code's
    np.argsort reversed) and the per-scene-class breakdown ("per_class", None without labels).
    """
    from harma.data.local import eval_arrays
    from harma.model.backbone import build_tokenizer

    images, tokens = eval_arrays(split, model.arch.image_size, build_tokenizer(model.arch.name), max_words)
    image_emb, text_emb = embed_split(model, images, tokens, batch_size)
    return evaluation_report(image_emb @ text_emb.T, split.caption_image, split.labels, split.image_keys)


def evaluate_prepared(checkpoint_uri: str, prepared_uri: str, split: str, device: str = "cpu") -> dict:
    """`harma eval`'s report of a checkpoint on a prepared split, in the numerics that validated it
    (`load_checkpoint`'s default), on `device`: `evaluate_split`'s report plus the split's "images"
    and "captions" counts. The one function behind `harma eval --config` and a run's final test,
    so the two agree exactly."""
    from harma.data.prepared import load_prepared_split
    from harma.model.checkpoint import load_checkpoint

    model, cfg = load_checkpoint(checkpoint_uri)
    data = load_prepared_split(prepared_uri, split)
    report = evaluate_split(model.to(device), data, cfg.data.max_words, cfg.train.eval_batch_size)
    return {"images": len(data.images), "captions": len(data), **report}
