"""One batch of encoded queries searched against a loaded index: what a `Retriever` replica does
with its own index and an `IndexShard` replica with its shard (no Ray, no HTTP here).

    loaded = load_served(index_uri, checkpoint_uri, fingerprint, device)
    found = search_jobs(loaded, "images", embeddings, jobs)      # per job: (scores, rows) | ApiError
    hits = hits_of(loaded.index, job, scores, rows)              # result dicts, best first

Filters (metadata, place, time) become masks over the gallery; an approximate index searches
FAISS and re-scores exactly (harma.index.ann); a scene index's image hits go through non-maximum
suppression of overlapping footprints over `NMS_POOL` x k candidates (`suppress`; a sharded
index suppresses once over the shards' merged candidates instead: `suppress_hits`).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from harma.geo.query import NMS_POOL, suppress_overlaps
from harma.serve.api import ApiError, place_of
from harma.serve.index import EmbeddingIndex, check_index_matches, search_batch

NO_CAPTIONS = "this index has no captions (built from an image folder or with index.captions=false)"


@dataclass
class Job:
    """One query waiting in a batch."""

    target: str  # images | captions
    k: int
    filters: dict
    thumbnails: bool
    text: str | None = None
    pixels: np.ndarray | None = None
    place: Any = None  # harma.geo.query.PlaceQuery
    nms: bool = True

    @classmethod
    def of(cls, target: str, query, **kwargs) -> Job:
        return cls(target, query.k, query.filters, query.include_thumbnails, place=place_of(query), nms=query.nms,
                   **kwargs)

    def for_search(self) -> Job:
        """The job without its text or pixels (what a shard needs of it)."""
        return Job(self.target, self.k, self.filters, self.thumbnails, place=self.place, nms=self.nms)


@dataclass
class Loaded:
    """An index and its galleries on the device; swapped as one reference."""

    uri: str
    index: EmbeddingIndex
    galleries: dict[str, torch.Tensor]


class ShardedIndex:
    """What the ingress of a sharded index knows of it: the root manifest (harma.index.shards)."""

    ann = None
    images: dict = {}

    def __init__(self, manifest: dict[str, Any]):
        self.manifest = manifest

    @property
    def size(self) -> int:
        return int(self.manifest["images"])

    @property
    def caption_count(self) -> int:
        return int(self.manifest.get("captions", 0))

    @property
    def has_footprints(self) -> bool:
        return self.manifest.get("corpus_format") == "geotiff"

    def thumbnail(self, item_id: str) -> None:
        return None  # the shards hold them


def load_served(uri: str, checkpoint_uri: str, fingerprint: dict[str, str], device) -> Loaded:
    """The index at `uri`, refused unless built by the served checkpoint, its galleries on `device`
    (an approximate index searches its FAISS structure, not a tensor)."""
    from harma.serve.index import load_index, read_manifest

    check_index_matches(read_manifest(uri), checkpoint_uri, fingerprint)
    index = load_index(uri)
    galleries = {} if index.ann is not None else {"images": torch.from_numpy(index.image_emb).to(device)}
    if index.caption_emb is not None:
        galleries["captions"] = torch.from_numpy(index.caption_emb).to(device)
    return Loaded(uri, index, galleries)


def wants_suppression(index_has_footprints: bool, job: Job) -> bool:
    return job.target == "images" and job.nms and index_has_footprints


def search_jobs(loaded: Loaded, target: str, emb: torch.Tensor, jobs: list[Job], suppress: bool = True,
                on_reranked: Callable[[int], None] | None = None) -> list[tuple[list[float], list[int]] | ApiError]:
    """Each job's (scores, rows) in the `target` gallery, best first (`emb`: the jobs' embeddings,
    one row each), or the ApiError that job meets. `suppress=False` hands back a scene index's
    NMS_POOL x k candidates unsuppressed."""
    index = loaded.index
    if target == "captions" and "captions" not in loaded.galleries:
        return [ApiError(422, NO_CAPTIONS) for _ in jobs]
    answers: list[Any] = [None] * len(jobs)
    masks, ks = [], []
    for i, job in enumerate(jobs):
        try:
            masks.append(index.search_mask(target, job.filters, job.place))
        except ValueError as err:
            masks.append(None)
            answers[i] = ApiError(422, str(err))
        pooled = wants_suppression(index.has_footprints, job)
        ks.append(min(job.k * NMS_POOL, index.size) if pooled else job.k)
    if target == "images" and index.ann is not None:
        found = index.ann.search(emb.float().cpu().numpy(), ks, masks)
        if on_reranked is not None:
            on_reranked(index.ann.take_reranked())
    else:
        found = search_batch(emb, loaded.galleries[target], ks, masks)
    for i, (scores, rows) in enumerate(found):
        if answers[i] is None:
            if suppress and wants_suppression(index.has_footprints, jobs[i]):
                kept = set(suppress_overlaps(rows, index.tiles.geometries)[:jobs[i].k])
                pairs = [(s, r) for s, r in zip(scores, rows, strict=True) if r in kept]
                scores, rows = [s for s, _ in pairs], [r for _, r in pairs]
            answers[i] = (scores, rows)
    return answers


def hits_of(index: EmbeddingIndex, job: Job, scores: list[float], rows: list[int]) -> list[dict[str, Any]]:
    """The result dicts of a job's rows, best first (no rank: a sharded answer is ranked once merged)."""
    hits = []
    for score, row in zip(scores, rows, strict=True):
        if job.target == "captions":
            hit = index.caption_result(row, score)
        else:
            hit = index.image_result(row, score)
            if job.thumbnails:
                thumb = index.thumbnail(hit["id"])
                hit["thumbnail"] = ("data:image/jpeg;base64," + base64.b64encode(thumb).decode()) if thumb else None
        hits.append(hit)
    return hits


def suppress_hits(hits: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The best `k` of merged scene-index hits (best first, each with its GeoJSON `geometry`) after
    non-maximum suppression of overlapping footprints, as `search_jobs` does within one index."""
    from shapely.geometry import shape

    geometries = np.array([shape(h["geometry"]) for h in hits], dtype=object)
    kept = suppress_overlaps(list(range(len(hits))), geometries)[:k]
    return [hits[i] for i in kept]
