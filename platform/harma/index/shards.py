"""Sharded indexes: the plan, the layout, and the merge of the shards' answers (pure).

An index whose replica would hold more than `index.max_shard_bytes` is written as S shards: each a
whole harma index (harma.serve.index) of a contiguous slice of the images, with those images'
captions, under `<index>/shards/NNNNN/`, and a root manifest listing them (`shards`: uri relative
to the root, images, captions, first_row) beside the scene overviews of a scene index. Serving
deploys one `IndexShard` deployment per shard behind the ingress, which encodes each query once,
sends its embedding to every shard through Serve deployment handles and merges their top-k
(`merge_hits`): the k best of the shards' k best are the k best of the whole index, so a sharded
index answers as the unsharded one does (same hits, same scores; ties in any order).
"""

from __future__ import annotations

import math
from typing import Any

SHARDS = "shards"


def plan_shards(images: int, bytes_per_vector: float, max_shard_bytes: int | None) -> list[tuple[int, int]]:
    """[(first_row, end_row)] of S near-equal contiguous slices, S the fewest that keep each within
    `max_shard_bytes` (one slice, no sharding, when it is None or the index fits)."""
    if images < 1:
        raise ValueError("an index needs at least one image")
    if max_shard_bytes is None or images * bytes_per_vector <= max_shard_bytes:
        return [(0, images)]
    per_shard = max(1, int(max_shard_bytes // bytes_per_vector))
    count = math.ceil(images / per_shard)
    bounds = [round(i * images / count) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def shard_name(position: int) -> str:
    return f"{SHARDS}/{position:05d}"


def is_sharded(manifest: dict[str, Any]) -> bool:
    return bool(manifest.get("shards"))


def merge_hits(per_shard: list[list[dict[str, Any]]], k: int) -> list[dict[str, Any]]:
    """The `k` best of the shards' hits (each list best first, each hit with its `score`), best
    first; equal scores keep shard order, then each shard's own order."""
    merged = [(hit["score"], shard, rank, hit) for shard, hits in enumerate(per_shard)
              for rank, hit in enumerate(hits)]
    merged.sort(key=lambda item: (-item[0], item[1], item[2]))
    return [hit for *_, hit in merged[:k]]
