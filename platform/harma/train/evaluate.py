"""Encode a split with a model and score retrieval (R@K both ways, mR)."""

from __future__ import annotations

import numpy as np
import torch

from harma.eval import retrieval_metrics
from harma.model.harma import HarmaModel


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
) -> dict[str, float]:
    image_emb, text_emb = embed_split(model, images, tokens, batch_size)
    return retrieval_metrics(image_emb @ text_emb.T, caption_image)
