"""`IndexShard`: the Serve deployment holding one shard of a sharded index (harma.index.shards).

The application (`harma.serve.app:build_app`) deploys one per shard, named IndexShard0,
IndexShard1, ..., each with its own replicas and autoscaling (a serve config tunes them by those
names under `deployments:`), behind the `Retriever` ingress. The ingress encodes a batch of queries
once and calls `search` on every shard through Serve deployment handles; a shard answers with its
own top-k hits (result dicts with scores), which the ingress merges. No model here: a shard holds
its vectors, metadata, thumbnails and captions only.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray.serve
import torch

from harma.serve.api import ApiError
from harma.serve.search import Job, Loaded, hits_of, load_served, search_jobs

log = logging.getLogger("harma.serve")


@ray.serve.deployment(
    name="IndexShard",
    max_ongoing_requests=64,
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8,
                        "upscale_delay_s": 10, "downscale_delay_s": 120},
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=10,
    graceful_shutdown_timeout_s=20,
)
class IndexShard:
    """One shard's galleries and metadata; `search` answers a batch of encoded queries."""

    def __init__(self, args: dict[str, Any]):
        from harma.serve.index import checkpoint_fingerprint

        self.args = args
        self.device = torch.device(args.get("device") or "cpu")
        fingerprint = checkpoint_fingerprint(args["checkpoint_uri"])
        self.state: Loaded = load_served(args["index_uri"], args["checkpoint_uri"], fingerprint, self.device)
        log.info("IndexShard ready: %s (%d images, %d captions)", args["index_uri"], self.state.index.size,
                 self.state.index.caption_count)

    async def search(self, target: str, emb: np.ndarray, jobs: list[Job]) -> list[list[dict[str, Any]] | tuple[int, str]]:
        """Per job its hits (best first; a scene index's NMS candidates unsuppressed), or (status,
        message) of the error it meets. On the replica's event loop: a shard's search of a batch is
        a matrix product of well under a millisecond at a shard's size on a CPU, cheaper than a
        hop to a thread."""
        loaded = self.state
        queries = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)).to(self.device)
        found = search_jobs(loaded, target, queries, jobs, suppress=False)
        return [(f.status, f.message) if isinstance(f, ApiError) else hits_of(loaded.index, job, *f)
                for job, f in zip(jobs, found, strict=True)]

    async def thumbnail(self, item_id: str) -> bytes | None:
        return self.state.index.thumbnail(item_id)

    def check_health(self) -> None:
        if not self.state.index.size:
            raise RuntimeError("no index loaded")
