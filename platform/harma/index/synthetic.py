"""Clustered unit vectors shaped like CLIP embeddings, for ANN tests and `benchmarks/ann.py`.

    vectors, queries = clip_like_vectors(1_000_000, 512, queries=1000, seed=0)

CLIP image embeddings share a common direction (they fill a narrow cone: mean cosine ~0.5) and
gather in semantic clusters of unequal size and spread; text queries sit off the images'
cone (the modality gap). The generator draws cluster centres on the sphere, members as centre +
common direction + Gaussian noise of a per-cluster spread, and queries as members of the same
clusters moved by a fixed gap vector and extra noise; everything L2-normalised, float32.
"""

from __future__ import annotations

import numpy as np

CHUNK = 100_000


def clip_like_vectors(n: int, dim: int = 512, queries: int = 0, clusters: int | None = None,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) gallery vectors and (queries, dim) query vectors."""
    rng = np.random.default_rng(seed)
    clusters = clusters or max(8, n // 500)
    common = _unit(rng.standard_normal(dim))
    gap = _unit(rng.standard_normal(dim)) * 0.3
    centres = _unit(rng.standard_normal((clusters, dim)))
    spread = rng.uniform(0.5, 0.9, clusters).astype(np.float32)
    weights = rng.dirichlet(np.full(clusters, 2.0))  # clusters of unequal size

    def draw(m: int, shift: np.ndarray, extra: float) -> np.ndarray:
        c = rng.choice(clusters, size=m, p=weights)
        noise = rng.standard_normal((m, dim), dtype=np.float32) * ((spread[c] + extra) / np.sqrt(dim))[:, None]
        return _unit(centres[c] + common + shift + noise)

    gallery = np.empty((n, dim), np.float32)
    for start in range(0, n, CHUNK):
        gallery[start:start + CHUNK] = draw(min(CHUNK, n - start), np.zeros(dim, np.float32), 0.0)
    return gallery, draw(queries, gap, 0.3) if queries else np.zeros((0, dim), np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
