"""Sharded (3 shards) against unsharded serving of the same index, over HTTP.

    .ci/venv python benchmarks/shard_fanout.py [--images 30000] [--shards 3] [--seconds 20] \\
        [--out benchmarks/results/shard_fanout.json] [--smoke]

One local Ray and Serve, two applications side by side on the same HTTP port: `whole` (one
Retriever holding the index) and `sharded` (a Retriever ingress and one IndexShard deployment a
shard, as `harma.serve.app:build_app` deploys an index written with `index.max_shard_bytes`), one
replica each, the same checkpoint (harma-tiny, random weights) and the same vectors (random unit
vectors: search cost does not depend on their values). Measured:
* identical answers: the same queries to both, hits and scores compared (k 10 and 100, a filter);
* low load, one query at a time, in alternating half-second blocks to each application (drift of
  the machine weighs on both alike): p50/p99 of each; the fan-out's cost is the difference of the
  p50s (target <= 3 ms).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
QUERIES = ("three storage tanks next to a river", "a red building on farmland", "planes in the top left",
           "two ships on the sea near a road", "a large pond in a forest", "green fields with a road")


def write_sharded(ckpt: str, index_uri: str, out: str, shards: int) -> dict:
    """The index at `index_uri` written again as `shards` shards (as the build does past max_shard_bytes)."""
    from harma.config import IndexConfig
    from harma.serve.build import EmbeddedCorpus, _approximate, _shard_plan, _write_shards
    from harma.serve.index import load_index

    index = load_index(index_uri)
    n, dim = index.image_emb.shape
    cfg = IndexConfig(checkpoint_uri=ckpt, corpus_uri=index_uri, output_uri=out, ann="exact", corpus_format="images",
                      max_shard_bytes=int(np.ceil(n / shards)) * 4 * dim)
    manifest = dict(index.manifest)
    corpus = EmbeddedCorpus(index.image_emb, index.images, None, None, [], [])
    slices, capacity = _shard_plan(cfg, corpus)
    manifest["shard_images_max"] = capacity
    parts = _approximate(cfg, corpus, slices, manifest, lambda _: None)
    _write_shards(cfg, manifest, corpus, slices, parts, lambda _: None)
    return manifest


def alternating_p50(urls: dict[str, str], seconds: float, block_s: float = 0.5) -> dict[str, dict]:
    import requests

    session = requests.Session()
    latencies: dict[str, list[float]] = {name: [] for name in urls}
    deadline, i = time.perf_counter() + seconds, 0
    while time.perf_counter() < deadline:
        for name, url in urls.items():
            block_end = time.perf_counter() + block_s
            while time.perf_counter() < block_end:
                t = time.perf_counter()
                r = session.post(url + "v1/text-to-images", json={"text": QUERIES[i % len(QUERIES)], "k": 10}, timeout=30)
                latencies[name].append((time.perf_counter() - t) * 1e3)
                if r.status_code != 200:
                    raise SystemExit(f"{name}: {r.status_code} {r.text[:200]}")
                i += 1
    return {name: {"p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99)), "queries": len(v)}
            for name, v in latencies.items()}


def identical(urls: dict[str, str]) -> dict:
    import requests

    checked, worst = 0, 0.0
    for text in QUERIES:
        for body in ({"text": text, "k": 10}, {"text": text, "k": 100}, {"text": text, "k": 20, "filters": {"split": "test"}}):
            a, b = (requests.post(url + "v1/text-to-images", json=body, timeout=30).json()["results"] for url in urls.values())
            if [h["id"] for h in a] != [h["id"] for h in b]:
                raise SystemExit(f"sharded answers differ for {body}")
            worst = max(worst, float(np.max(np.abs(np.array([h["score"] for h in a]) - [h["score"] for h in b]))))
            checked += 1
    return {"queries": checked, "identical_ids": True, "max_score_difference": worst}


def main() -> None:
    sys.path.insert(0, str(REPO / "platform"))
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=30_000)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--out", default="benchmarks/results/shard_fanout.json")
    parser.add_argument("--smoke", action="store_true", help="seconds, tiny sizes (CI runs it)")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.seconds = 300, 2.0
    from serve_latency import make_checkpoint_and_index

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="hr-"))
    root = tempfile.mkdtemp(prefix="harma-shard-bench-")
    ckpt, index = make_checkpoint_and_index(root, "harma-tiny", args.images)
    sharded_uri = os.path.join(root, "sharded")
    manifest = write_sharded(ckpt, index, sharded_uri, args.shards)

    import ray.serve

    import ray
    from harma.serve.app import Retriever
    from harma.serve.ingress import ensure_fast_ingress
    from harma.serve.shard import IndexShard

    ensure_fast_ingress()
    cores = os.cpu_count() or 2
    ray.init(num_cpus=cores + 4, include_dashboard=False, log_to_driver=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.serve.start(http_options={"host": "127.0.0.1", "port": port})
    one = {"num_replicas": 1, "autoscaling_config": None, "logging_config": {"enable_access_log": False}}
    args_of = {"checkpoint_uri": ckpt, "max_top_k": 100, "device": "cpu"}
    ray.serve.run(Retriever.options(**one, ray_actor_options={"num_cpus": 1}).bind({**args_of, "index_uri": index}),
                  name="whole", route_prefix="/whole")
    shards = [IndexShard.options(name=f"IndexShard{i}", **one, ray_actor_options={"num_cpus": 0.25}).bind(
        {"checkpoint_uri": ckpt, "index_uri": sharded_uri, "position": i}) for i in range(len(manifest["shards"]))]
    ray.serve.run(Retriever.options(**one, ray_actor_options={"num_cpus": 1}).bind(
        {**args_of, "index_uri": sharded_uri}, *shards), name="sharded", route_prefix="/sharded")
    base = f"http://127.0.0.1:{port}/"
    urls = {"whole": base + "whole/", "sharded": base + "sharded/"}
    same = identical(urls)
    alternating_p50(urls, min(2.0, args.seconds))  # warm both
    low = alternating_p50(urls, args.seconds)
    ray.serve.shutdown()
    ray.shutdown()
    overhead = low["sharded"]["p50_ms"] - low["whole"]["p50_ms"]
    result = {"images": args.images, "shards": args.shards, "shard_images": [s["images"] for s in manifest["shards"]],
              "identical": same, "low_load": low, "fanout_overhead_p50_ms": overhead, "target_ms": 3.0,
              "meets_target": overhead <= 3.0, "cpu_count": cores, "smoke": args.smoke}
    print(f"\n{args.images} images, {args.shards} shards {result['shard_images']}; {same['queries']} queries "
          f"answered identically (largest score difference {same['max_score_difference']:.2e})")
    print(f"{'application':12} {'p50 ms':>8} {'p99 ms':>8} {'queries':>8}")
    for name, row in low.items():
        print(f"{name:12} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} {row['queries']:8d}")
    print(f"fan-out overhead at p50: {overhead:.2f} ms (target <= 3 ms: {'met' if result['meets_target'] else 'NOT met'})")
    from harma import storage

    storage.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
