"""Serving benchmark: HTTP through Ray Serve vs a direct call of the same encoder + search.

    .ci/venv python benchmarks/serve_latency.py [--arch harma-tiny] [--images 10000] \\
        [--seconds 15] [--concurrency 32] [--device cpu] [--out benchmarks/results/serve_latency.json]

Same process, same run, same checkpoint and index (random weights, random unit embeddings: cost
does not depend on their values), both measured while Ray and Serve run:
* low load, one query at a time: direct `encode_texts` + `search_batch` p50/p99 vs
  sequential HTTP POST /v1/text-to-images p50/p99 -> Serve overhead at p50 (target <= 3 ms);
* saturation: direct batched throughput (batches of `max_batch_size` queries, encode + one matrix
  product) vs HTTP queries/s from `concurrency` closed-loop clients in a separate process
  (`harma.serve.loadtest`) against one replica with dynamic batching (target >= 0.7); the
  replica's forward passes and queries per pass during the load come from /v1/info.
On the H100: `--arch ViT-B-32 --images 100000 --device cuda`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch


def make_checkpoint_and_index(root: str, arch: str, images: int) -> tuple[str, str]:
    from harma.config import PlatformConfig
    from harma.model.checkpoint import save_checkpoint
    from harma.model.harma import build_model
    from harma.serve.index import FORMAT, EmbeddingIndex, checkpoint_fingerprint, save_index

    overrides = {"model.backbone.arch": arch}
    if arch == "harma-tiny":
        overrides.update({"model.adapter.rank": 32, "model.adapter.heads": 4,
                          "model.adapter.mini_rank": 16, "model.adapter.mini_heads": 4})
    cfg = PlatformConfig().with_overrides(overrides)
    model = build_model(cfg.model, seed=0)
    ckpt = os.path.join(root, "ckpt")
    save_checkpoint(ckpt, model, cfg, {})
    dim = model.arch.embed_dim
    emb = np.random.default_rng(0).normal(size=(images, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    meta = {"id": [f"tile_{i:06d}.png" for i in range(images)], "source": [f"tile_{i:06d}.png" for i in range(images)],
            "image_id": list(range(images)), "split": ["test"] * images, "label": [None] * images,
            "thumbnail": [b""] * images}
    fp = checkpoint_fingerprint(ckpt)
    manifest = {"format": FORMAT, "checkpoint_uri": ckpt, "checkpoint_fingerprint": fp["fingerprint"],
                "config_sha256": fp["config_sha256"], "adapter_sha256": fp["adapter_sha256"],
                "embed_dim": dim, "images": images, "captions": 0}
    index = os.path.join(root, "index")
    save_index(index, EmbeddingIndex(manifest, emb, meta))
    return ckpt, index


def direct_figures(ckpt: str, index_uri: str, device: str, batch: int, seconds: float) -> dict:
    from harma.serve.encoder import QueryEncoder
    from harma.serve.index import load_index, search_batch
    from harma.serve.loadtest import QUERIES, percentiles

    enc = QueryEncoder(ckpt, device)
    gallery = torch.from_numpy(load_index(index_uri).image_emb).to(enc.device)

    def sync():
        if enc.device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(5):
        search_batch(enc.encode_texts([QUERIES[0]]), gallery, [10], [None])
    single = []
    end = time.perf_counter() + seconds / 2
    i = 0
    while time.perf_counter() < end:
        t = time.perf_counter()
        search_batch(enc.encode_texts([QUERIES[i % len(QUERIES)]]), gallery, [10], [None])
        sync()
        single.append((time.perf_counter() - t) * 1000)
        i += 1
    texts = [QUERIES[j % len(QUERIES)] for j in range(batch)]
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 2:
        search_batch(enc.encode_texts(texts), gallery, [10] * batch, [None] * batch)
        sync()
        done += batch
    return {"single_ms": percentiles(single), "batched_qps": done / (time.perf_counter() - t0)}


def http_figures(url: str, seconds: float, concurrency: int) -> dict:
    import requests

    from harma.serve.loadtest import QUERIES, percentiles

    session = requests.Session()
    for _ in range(5):
        session.post(url + "v1/text-to-images", json={"text": QUERIES[0], "k": 10}).raise_for_status()
    single = []
    end = time.perf_counter() + seconds / 2
    i = 0
    while time.perf_counter() < end:
        t = time.perf_counter()
        response = session.post(url + "v1/text-to-images", json={"text": QUERIES[i % len(QUERIES)], "k": 10})
        single.append((time.perf_counter() - t) * 1000)
        assert response.status_code == 200, response.text
        i += 1
    before = session.get(url + "v1/info").json()["batching"]
    out = os.path.join(tempfile.mkdtemp(), "load.json")
    subprocess.run([sys.executable, "-m", "harma.serve.loadtest", "--url", url, "--seconds", str(seconds),
                    "--concurrency", str(concurrency), "--out", out], check=True)
    with open(out) as handle:
        load = json.load(handle)
    after = session.get(url + "v1/info").json()["batching"]
    passes = after["text_forward_passes"] - before["text_forward_passes"]
    queries = after["text_queries"] - before["text_queries"]
    batching = {"forward_passes": passes, "mean_batch": queries / max(1, passes)}  # during the load only
    return {"single_ms": percentiles(single), "saturated_qps": load["qps"], "saturated_latency_ms": load["latency_ms"],
            "failed": load["failed"], "batching": batching}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="harma-tiny")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32, help="max_batch_size of the replica")
    parser.add_argument("--batch-wait", type=float, default=0.0, help="batch_wait_timeout_s of the replica")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/serve_latency.json")
    args = parser.parse_args()

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="hr-"))
    root = tempfile.mkdtemp(prefix="harma-serve-bench-")
    ckpt, index = make_checkpoint_and_index(root, args.arch, args.images)

    import ray.serve

    import ray
    from harma.serve.app import Retriever

    cores = os.cpu_count() or 2
    ray.init(num_cpus=cores + 2, include_dashboard=False, log_to_driver=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.serve.start(http_options={"host": "127.0.0.1", "port": port})
    gpus = 1 if args.device == "cuda" else 0
    app = Retriever.options(num_replicas=1, autoscaling_config=None, max_ongoing_requests=2 * args.batch,
                            # as many torch threads as the direct path (Ray sets OMP threads = num_cpus)
                            ray_actor_options={"num_cpus": cores, "num_gpus": gpus})
    ray.serve.run(app.bind({"checkpoint_uri": ckpt, "index_uri": index, "device": args.device,
                            "max_batch_size": args.batch, "batch_wait_timeout_s": args.batch_wait}),
                  name="bench", route_prefix="/")
    # Both sides measured while Ray and Serve run (the replica idle during the direct part), so
    # the background of Ray's own processes weighs on both.
    direct = direct_figures(ckpt, index, args.device, args.batch, args.seconds)
    http = http_figures(f"http://127.0.0.1:{port}/", args.seconds, args.concurrency)
    ray.serve.shutdown()
    ray.shutdown()

    overhead = http["single_ms"]["p50"] - direct["single_ms"]["p50"]
    ratio = http["saturated_qps"] / direct["batched_qps"]
    result = {"arch": args.arch, "images": args.images, "device": args.device, "batch": args.batch,
              "concurrency": args.concurrency, "batch_wait_timeout_s": args.batch_wait, "cpu_count": os.cpu_count(), "direct": direct, "http": http,
              "overhead_p50_ms": overhead, "throughput_ratio": ratio,
              "targets": {"overhead_p50_ms": 3.0, "throughput_ratio": 0.7}}
    rows = [("low load p50 (ms)", direct["single_ms"]["p50"], http["single_ms"]["p50"]),
            ("low load p99 (ms)", direct["single_ms"]["p99"], http["single_ms"]["p99"]),
            ("saturated queries/s", direct["batched_qps"], http["saturated_qps"])]
    print(f"\n{args.arch}, {args.images:,}-image index, {args.device}, batch {args.batch}, "
          f"{args.concurrency} HTTP clients")
    print(f"{'':>22} {'direct':>10} {'HTTP/Serve':>11}")
    for name, d, h in rows:
        print(f"{name:>22} {d:>10.2f} {h:>11.2f}")
    print(f"at saturation the replica ran {http['batching']['forward_passes']} forward passes, "
          f"{http['batching']['mean_batch']:.1f} queries each")
    print(f"Serve overhead at p50: {overhead:.2f} ms (target <= 3); throughput ratio {ratio:.2f} (target >= 0.7); "
          f"failed requests {http['failed']}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
