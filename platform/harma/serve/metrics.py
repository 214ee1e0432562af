"""Prometheus metrics of a `Retriever` replica, through Ray's metrics (`ray.util.metrics`).

Ray's metrics agent on each node serves them with Ray's own on the node's metrics export port
(`ray.nodes()[i]["MetricsExportPort"]`, `/metrics`), prefixed `ray_`; Ray's Prometheus service
discovery file and `docs/grafana/harma-serve.json` (the dashboard) take it from there. What a
replica records:

    harma_request_latency_ms        histogram  endpoint (route template), status
    harma_request_errors            counter    endpoint, status (every 4xx and 5xx answer)
    harma_queries_per_forward_pass  histogram  kind (text | image)
    harma_queue_depth               gauge      kind: queries waiting for the next forward pass
    harma_index_images              gauge      version (the index's build time + fingerprint), kind (exact | ann kind)
    harma_ann_candidates_reranked   counter    candidates an approximate index re-scored exactly
    harma_index_load_failures       counter    index versions a replica failed to load (it kept the old one)

Created in the replica (`install`), read by the HTTP middleware through `current()`; nothing is
recorded outside a replica.
"""

from __future__ import annotations

LATENCY_BOUNDS_MS = [1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]
PASS_BOUNDS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class ReplicaMetrics:
    """The replica's metric objects and the one call each event records."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self._latency = Histogram("harma_request_latency_ms", description="HTTP request latency in the replica (ms)",
                                  boundaries=LATENCY_BOUNDS_MS, tag_keys=("endpoint", "status"))
        self._errors = Counter("harma_request_errors", description="Answers with a 4xx or 5xx status",
                               tag_keys=("endpoint", "status"))
        self._pass = Histogram("harma_queries_per_forward_pass", description="Queries merged into one forward pass",
                               boundaries=PASS_BOUNDS, tag_keys=("kind",))
        self._queue = Gauge("harma_queue_depth", description="Queries waiting for the next forward pass",
                            tag_keys=("kind",))
        self._images = Gauge("harma_index_images", description="Images in the index the replica serves",
                             tag_keys=("version", "kind"))
        self._reranked = Counter("harma_ann_candidates_reranked",
                                 description="Candidates an approximate index re-scored exactly")
        self._load_failures = Counter("harma_index_load_failures",
                                      description="Index versions the replica failed to load (it kept serving the old)")
        self._gauges: dict[tuple, float] = {}  # index gauge tags -> value, oldest first; set again by `refresh`

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        tags = {"endpoint": endpoint, "status": str(status)}
        self._latency.observe(seconds * 1e3, tags=tags)
        if status >= 400:
            self._errors.inc(tags=tags)

    def forward_pass(self, kind: str, queries: int, queued: int) -> None:
        self._pass.observe(queries, tags={"kind": kind})
        self._queue.set(queued, tags={"kind": kind})

    def index(self, manifest: dict, images: int) -> None:
        """The index now served (the one before it reads 0 from here on)."""
        tags = {"version": f"v{manifest.get('version', 1)}/{manifest.get('built_at', '')}/"
                           f"{str(manifest.get('checkpoint_fingerprint', ''))[:12]}",
                "kind": (manifest.get("ann") or {}).get("kind", "exact")}
        key = tuple(sorted(tags.items()))
        previous = next(reversed(self._gauges), None)  # the newest key is the version served
        if previous is not None and previous != key:
            self._gauges[previous] = 0
        self._gauges.pop(key, None)
        self._gauges[key] = images  # last: the newest
        while len(self._gauges) > 8:  # the oldest versions' zeros go
            self._gauges.pop(next(iter(self._gauges)))
        self.refresh()

    def refresh(self) -> None:
        """Set the index gauges again (the replica's health check calls it): Ray's metrics agent
        drops a gauge series that has not been set for two export intervals."""
        for tags, value in self._gauges.items():
            self._images.set(value, tags=dict(tags))

    def index_load_failed(self) -> None:
        self._load_failures.inc()

    def reranked(self, candidates: int) -> None:
        if candidates:
            self._reranked.inc(candidates)


_current: ReplicaMetrics | None = None


def install() -> ReplicaMetrics:
    """The replica's metrics (created once per process)."""
    global _current
    if _current is None:
        _current = ReplicaMetrics()
    return _current


def current() -> ReplicaMetrics | None:
    return _current
