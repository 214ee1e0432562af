"""Retrieval metrics (R@1/5/10 both ways, mR) from a similarity matrix; pure numpy.

    from harma.eval import retrieval_metrics
    metrics = retrieval_metrics(sim, caption_image)   # sim: (images, captions)

Protocol (harma-method.md section 4): image -> text ranks an image by the best position of any of
its captions among all captions; text -> image ranks a caption by the position of its one image.
R@K is the percentage of queries ranked within the top K; mR is the mean of the six recalls.

Ties are resolved deterministically, which the paper code does not do (it reverses numpy's
unstable argsort, so tied scores rank arbitrarily). With `ties="pessimistic"` (the default) a
relevant item tied with irrelevant ones is ranked after all of them, so a model gains nothing from
ties (a constant similarity scores 0 at K < gallery size); `"optimistic"` ranks it before them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mr")
KS = (1, 5, 10)


def _ranks_i2t(sim: np.ndarray, caption_image: np.ndarray, ties: str) -> np.ndarray:
    n_images = sim.shape[0]
    relevant = caption_image[None, :] == np.arange(n_images)[:, None]  # (I, C)
    best = np.where(relevant, sim, -np.inf).max(axis=1)  # best relevant score per image
    irrelevant = ~relevant
    if ties == "pessimistic":
        ahead = (sim >= best[:, None]) & irrelevant
    else:
        ahead = (sim > best[:, None]) & irrelevant
    return ahead.sum(axis=1)


def _ranks_t2i(sim: np.ndarray, caption_image: np.ndarray, ties: str) -> np.ndarray:
    n_captions = sim.shape[1]
    target = sim[caption_image, np.arange(n_captions)]  # (C,)
    others = np.ones_like(sim, dtype=bool)
    others[caption_image, np.arange(n_captions)] = False
    if ties == "pessimistic":
        ahead = (sim >= target[None, :]) & others
    else:
        ahead = (sim > target[None, :]) & others
    return ahead.sum(axis=0)


def retrieval_metrics(
    sim: np.ndarray | Sequence[Sequence[float]],
    caption_image: np.ndarray | Sequence[int],
    ties: str = "pessimistic",
) -> dict[str, float]:
    """Recall@{1,5,10} image->text and text->image, and their mean, in percent.

    Args:
        sim: (n_images, n_captions) similarities, higher is closer.
        caption_image: (n_captions,) index of each caption's image; any number of captions per
            image, but every image needs at least one.
        ties: "pessimistic" (default) or "optimistic", see the module docstring.
    Returns:
        {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mr"}: floats in [0, 100].
    Raises:
        ValueError: wrong shapes, non-finite scores, ids out of range, or an image with no caption.
    """
    sim = np.asarray(sim, dtype=np.float64)
    caption_image = np.asarray(caption_image)
    if sim.ndim != 2 or sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"sim must be a non-empty (images, captions) matrix, got shape {sim.shape}")
    if caption_image.shape != (sim.shape[1],):
        raise ValueError(
            f"caption_image must have one entry per caption ({sim.shape[1]}), "
            f"got shape {caption_image.shape}"
        )
    if not np.issubdtype(caption_image.dtype, np.integer):
        raise ValueError(f"caption_image must hold integer image indices, got {caption_image.dtype}")
    if caption_image.min() < 0 or caption_image.max() >= sim.shape[0]:
        raise ValueError(f"caption_image values must lie in [0, {sim.shape[0]})")
    if not np.isfinite(sim).all():
        raise ValueError("sim holds NaN or infinite values")
    without = np.setdiff1d(np.arange(sim.shape[0]), caption_image)
    if without.size:
        raise ValueError(f"{without.size} image(s) have no caption, e.g. index {int(without[0])}")
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")

    i2t = _ranks_i2t(sim, caption_image, ties)
    t2i = _ranks_t2i(sim, caption_image, ties)
    out = {f"i2t_r{k}": 100.0 * float(np.mean(i2t < k)) for k in KS}
    out.update({f"t2i_r{k}": 100.0 * float(np.mean(t2i < k)) for k in KS})
    out["mr"] = float(np.mean([out[key] for key in METRIC_KEYS[:-1]]))
    return out


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A fixed-width table: one row per named metrics dict, columns R@K both ways and mR."""
    header = f"{'':<18}" + "".join(f"{h:>9}" for h in ("I2T R@1", "R@5", "R@10", "T2I R@1", "R@5", "R@10", "mR"))
    lines = [header]
    for name, m in rows.items():
        lines.append(f"{name:<18}" + "".join(f"{m[key]:>9.2f}" for key in METRIC_KEYS))
    return "\n".join(lines)
