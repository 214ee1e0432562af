"""Sharded indexes: the plan, the layout, and the merge of the shards' answers (pure).

An index whose replica would hold more than `index.max_shard_bytes` is written as S shards: each a
whole harma index (harma.serve.index) of a contiguous slice of the images, with those images'
captions, under `<index>/shards/NNNNN/`, and a root manifest listing them (`shards`: uri relative
to the root of the index's versions, images, captions, first_row) beside the scene overviews of a
scene index, and `shard_images_max` (the most images a shard holds within the bound). Serving
deploys one `IndexShard` deployment per shard behind the ingress, which encodes each query once,
sends its embedding to every shard through Serve deployment handles and merges their top-k
(`merge_hits`): the k best of the shards' k best are the k best of the whole index, so a sharded
index answers as the unsharded one does (same hits, same scores; ties in any order).

Updates (harma.index.update) write a new version's changed shards under its own folder
(`versions/NNNNN/shards/MMMMM`) and list the unchanged ones where they are: a version shares them
with its parent, so an add or delete rewrites only the shards it touches. New images go to the
shards with the most room first (`place_new_rows`), new shards only when none has room left, so a
served index keeps its shard count (and its Serve deployments) across most updates.
"""

from __future__ import annotations

import math
from typing import Any

from harma import storage

SHARDS = "shards"


def plan_shards(images: int, bytes_per_vector: float, max_shard_bytes: int | None) -> list[tuple[int, int]]:
    """[(first_row, end_row)] of S near-equal contiguous slices, S the fewest that keep each within
    `max_shard_bytes` (one slice, no sharding, when it is None or the index fits)."""
    if images < 1:
        raise ValueError("an index needs at least one image")
    if max_shard_bytes is None or images * bytes_per_vector <= max_shard_bytes:
        return [(0, images)]
    per_shard = shard_capacity(bytes_per_vector, max_shard_bytes)
    count = math.ceil(images / per_shard)
    bounds = [round(i * images / count) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def shard_capacity(bytes_per_vector: float, max_shard_bytes: int) -> int:
    """The most images a shard holds within `max_shard_bytes` (at least one)."""
    return max(1, int(max_shard_bytes // bytes_per_vector))


def shard_name(position: int) -> str:
    return f"{SHARDS}/{position:05d}"


def shard_location(index_uri: str, manifest: dict[str, Any], position: int) -> str:
    """Where shard `position` of the index version at `index_uri` (its root `manifest`) lives: a
    shard's `uri` is relative to the root of the index's versions."""
    shards = manifest.get(SHARDS) or []
    if not 0 <= position < len(shards):
        raise ValueError(f"{index_uri} has {len(shards)} shard(s), no shard {position}")
    return storage.join(manifest.get("root_uri") or index_uri, shards[position]["uri"])


def place_new_rows(sizes: list[int], capacity: int | None, new: int) -> tuple[list[int], int]:
    """(how many of `new` images each shard of `sizes` takes, how many are left for new shards):
    the shards with the most room first (ties: the earlier shard), each up to `capacity` images;
    all of them into the last shard when there is no capacity (an index built before it was
    recorded)."""
    if new < 0 or not sizes:
        raise ValueError(f"cannot place {new} images into {len(sizes)} shards")
    taken = [0] * len(sizes)
    if capacity is None:
        taken[-1] = new
        return taken, 0
    left = new
    for position in sorted(range(len(sizes)), key=lambda p: (sizes[p] - capacity, p)):
        taken[position] = min(max(capacity - sizes[position], 0), left)
        left -= taken[position]
    return taken, left


def is_sharded(manifest: dict[str, Any]) -> bool:
    return bool(manifest.get("shards"))


def merge_hits(per_shard: list[list[dict[str, Any]]], k: int) -> list[dict[str, Any]]:
    """The `k` best of the shards' hits (each list best first, each hit with its `score`), best
    first; equal scores keep shard order, then each shard's own order."""
    merged = [(hit["score"], shard, rank, hit) for shard, hits in enumerate(per_shard)
              for rank, hit in enumerate(hits)]
    merged.sort(key=lambda item: (-item[0], item[1], item[2]))
    return [hit for *_, hit in merged[:k]]
