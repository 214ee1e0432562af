"""`IndexShard`: the Serve deployment holding one shard of a sharded index (harma.index.shards).

The application (`harma.serve.app:build_app`) deploys one per shard position, named IndexShard0,
IndexShard1, ..., each with its own replicas and autoscaling (a serve config tunes them by those
names under `deployments:`), behind the `Retriever` ingress. The ingress encodes a batch of queries
once and calls `search` on every shard through Serve deployment handles; a shard answers with its
own top-k hits (result dicts with scores), which the ingress merges. No model here: a shard holds
its vectors, metadata, thumbnails and captions only.

Versions: every call names the index version (its root URI) the ingress serves, and a shard
replica answers from that version's shard at its position. It starts with the application's
version, loads another on first use (or when the ingress `prepare`s a swap) and keeps the
`KEPT_SHARDS` it used last, so while the ingress replicas move from one version to the next
through `user_config`, each request is answered from the version it was sent for. Versions that
share a shard (an update rewrites only the shards it touches) share its one loaded copy.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

import numpy as np
import ray.serve
import torch

from harma.serve.api import ApiError
from harma.serve.search import Job, Loaded, hits_of, load_served, search_jobs

log = logging.getLogger("harma.serve")

KEPT_SHARDS = 3  # loaded shards a replica keeps: the served version's, the one before, one spare


@ray.serve.deployment(
    name="IndexShard",
    max_ongoing_requests=64,
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8,
                        "upscale_delay_s": 10, "downscale_delay_s": 120},
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=10,
    graceful_shutdown_timeout_s=20,
    # No access log line per call: each query is one call per shard (S lines a query beside the
    # ingress's own; writing them cost a replica ~12% of its event loop in benchmarks/serve_latency.py).
    # A serve config turns it on under `deployments: - name: IndexShard0 ...` to debug.
    logging_config={"enable_access_log": False},
)
class IndexShard:
    """Shard `args.position` of the index versions it is asked for; `search` answers a batch of
    encoded queries."""

    def __init__(self, args: dict[str, Any]):
        from harma.serve.index import checkpoint_fingerprint

        self.args = args
        self.position = int(args["position"])
        self.device = torch.device(args.get("device") or "cpu")
        self.fingerprint = checkpoint_fingerprint(args["checkpoint_uri"])
        self._locations: dict[str, str] = {}  # index version URI -> its shard's URI
        self._loaded: OrderedDict[str, Loaded] = OrderedDict()  # shard URI -> loaded, least recent first
        self._loading: dict[str, asyncio.Future] = {}
        loaded = self._hold(args["index_uri"], *self._fetch(args["index_uri"]))
        log.info("IndexShard ready: shard %d of %s (%d images, %d captions)", self.position, args["index_uri"],
                 loaded.index.size, loaded.index.caption_count)

    def _fetch(self, version: str) -> tuple[str, Loaded]:
        """(URI, loaded) of the shard of index version `version`, read now (in a thread when the
        replica is serving: it changes nothing the event loop reads)."""
        from harma.index.shards import shard_location
        from harma.serve.index import read_manifest

        location = self._locations.get(version) or shard_location(version, read_manifest(version), self.position)
        loaded = self._loaded.get(location)
        if loaded is None:
            loaded = load_served(location, self.args["checkpoint_uri"], self.fingerprint, self.device)
        return location, loaded

    def _hold(self, version: str, location: str, loaded: Loaded) -> Loaded:
        self._locations[version] = location
        self._keep(location, loaded)
        return loaded

    def _keep(self, location: str, loaded: Loaded) -> None:
        self._loaded[location] = loaded
        self._loaded.move_to_end(location)
        while len(self._loaded) > KEPT_SHARDS:
            gone, _ = self._loaded.popitem(last=False)
            self._locations = {v: at for v, at in self._locations.items() if at != gone}

    async def _version(self, version: str) -> Loaded:
        """The loaded shard of `version`: at once when held; else loaded in a thread, once however
        many requests ask for it meanwhile."""
        location = self._locations.get(version)
        if location is not None and location in self._loaded:
            self._loaded.move_to_end(location)
            return self._loaded[location]
        pending = self._loading.get(version)
        if pending is None:
            pending = asyncio.ensure_future(self._load_in_thread(version))
            self._loading[version] = pending
            pending.add_done_callback(lambda _: self._loading.pop(version, None))
        return await asyncio.shield(pending)

    async def _load_in_thread(self, version: str) -> Loaded:
        return self._hold(version, *await asyncio.to_thread(self._fetch, version))

    async def prepare(self, version: str) -> dict[str, int]:
        """Load `version`'s shard ahead of the ingress's swap to it (an error raises to the caller)."""
        loaded = await self._version(version)
        return {"images": loaded.index.size, "captions": loaded.index.caption_count}

    async def search(self, target: str, emb: np.ndarray, jobs: list[Job],
                     version: str) -> list[list[dict[str, Any]] | tuple[int, str]]:
        """Per job its hits (best first; a scene index's NMS candidates unsuppressed), or (status,
        message) of the error it meets. On the replica's event loop: a shard's search of a batch is
        a matrix product of well under a millisecond at a shard's size on a CPU, cheaper than a
        hop to a thread."""
        try:
            loaded = await self._version(version)
        except Exception as err:  # a version the ingress serves but this replica cannot read
            log.error("shard %d of %s not loaded: %s", self.position, version, err)
            return [(503, f"shard {self.position} of the index could not be loaded: {type(err).__name__}")] * len(jobs)
        queries = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)).to(self.device)
        found = search_jobs(loaded, target, queries, jobs, suppress=False)
        return [(f.status, f.message) if isinstance(f, ApiError) else hits_of(loaded.index, job, *f)
                for job, f in zip(jobs, found, strict=True)]

    async def thumbnail(self, item_id: str, version: str) -> bytes | None:
        return (await self._version(version)).index.thumbnail(item_id)

    def check_health(self) -> None:
        if not self._loaded:
            raise RuntimeError("no index loaded")
