"""Approximate search benchmark: for the exact scan and each ANN kind of harma.index.ann over the
same vectors, recall@10 against exact, single-query p50/p99, batched queries/s, build time and
bytes a vector; and the memory 100 M vectors need, from the measured bytes a vector.

    .ci/venv python benchmarks/ann.py [--vectors 1000000] [--dim 512] [--queries 200] \\
        [--kinds ivf_flat ivf_pq hnsw] [--out benchmarks/results/ann.json] [--smoke]
    .ci/venv python benchmarks/ann.py --source model [--vectors 200000] [--arch harma-tiny] \\
        [--out benchmarks/results/ann_model.json]

Vectors (`--source synthetic`): harma.index.synthetic.clip_like_vectors (clustered unit vectors in
a narrow cone, queries off the cone by a modality gap). `--source model`: the project's own
embeddings, by QueryEncoder (the replica's encoder; random weights, seed 0) of generated aerial
tiles (harma.data.synth scenes: land covers, rivers, roads, objects) and, as queries, of a
caption of each of `--queries` other generated tiles: text -> image search as a user runs it, at
the model's own embedding size. The ceiling in the same run is the replica's exact scan
(harma.serve.index.search_batch: one matrix product + top-k in torch, on every core), single query
and in batches of 64. An ANN kind is timed through AnnSearcher (FAISS on every core + the exact
re-rank of its candidates from fp16 vectors), as planned and (`KIND+tune`) with its search knob
tuned as `harma index build` tunes it (index.ann_params.target_recall 0.95) on `--queries` other
queries than the ones measured. Target on 2 cores: recall@10 >= 0.95 at >= 50 x the exact scan's
single-query speed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BATCH = 64
REPLICA_RAM = 16 << 30  # the paper sizing: a replica's memory for vectors


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def exact_row(vectors: np.ndarray, queries: np.ndarray) -> tuple[dict, np.ndarray]:
    import torch

    from harma.serve.index import search_batch

    gallery, q = torch.from_numpy(vectors), torch.from_numpy(queries)
    single = []
    truth = []
    for i in range(len(queries)):
        t = time.perf_counter()
        (_, rows), = search_batch(q[i:i + 1], gallery, [10], [None])
        single.append(time.perf_counter() - t)
        truth.append(rows)
    t = time.perf_counter()
    for s in range(0, len(queries), BATCH):
        search_batch(q[s:s + BATCH], gallery, [10] * len(q[s:s + BATCH]), [None] * len(q[s:s + BATCH]))
    qps = len(queries) / (time.perf_counter() - t)
    p50, p99 = _percentiles(single)
    return {"kind": "exact", "recall_at_10": 1.0, "p50_ms": p50, "p99_ms": p99, "batched_qps": qps,
            "build_s": 0.0, "ram_bytes_per_vector": 4.0 * vectors.shape[1], "disk_bytes_per_vector": 4.0 * vectors.shape[1]}, \
        np.asarray(truth)


def _timed(kind: str, searcher, queries: np.ndarray, truth: np.ndarray) -> dict:
    single, found = [], []
    for q in queries:
        t = time.perf_counter()
        (_, rows), = searcher.search(q[None], [10], [None])
        single.append(time.perf_counter() - t)
        found.append(rows)
    t = time.perf_counter()
    for s in range(0, len(queries), BATCH):
        part = queries[s:s + BATCH]
        searcher.search(part, [10] * len(part), [None] * len(part))
    qps = len(queries) / (time.perf_counter() - t)
    recall = float(np.mean([len(set(f) & set(g)) / 10 for f, g in zip(found, truth, strict=True)]))
    p50, p99 = _percentiles(single)
    return {"kind": kind, "recall_at_10": recall, "p50_ms": p50, "p99_ms": p99, "batched_qps": qps,
            "params": searcher.params.to_manifest()}


def ann_rows(kind: str, vectors: np.ndarray, vectors16: np.ndarray, queries: np.ndarray, truth: np.ndarray,
             tune_queries: np.ndarray, target_recall: float = 0.95) -> list[dict]:
    """The kind as planned, and with its search knob tuned as the build tunes it
    (harma.index.ann.tune_search) on `tune_queries`, a query set apart from the measured one."""
    from harma.index.ann import AnnSearcher, ann_to_bytes, build_ann, plan_ann, tune_search

    params = plan_ann(kind, len(vectors), vectors.shape[1], 1 << 50)
    t = time.perf_counter()
    index = build_ann(vectors, params)
    build_s = time.perf_counter() - t
    ram = len(ann_to_bytes(index)) / len(vectors)
    sizes = {"build_s": build_s, "ram_bytes_per_vector": ram, "disk_bytes_per_vector": ram + 2.0 * vectors.shape[1]}
    planned = {**_timed(kind, AnnSearcher(index, vectors16, params), queries, truth), **sizes}
    t = time.perf_counter()
    tuned_params, record = tune_search(index, vectors, params, tune_queries, target_recall)
    tuned = {**_timed(f"{kind}+tune", AnnSearcher(index, vectors16, tuned_params), queries, truth), **sizes,
             "tune_s": time.perf_counter() - t, "tuned": record}
    return [planned, tuned]


TILE_CHUNK = 512  # tiles a render task draws


def _render_tiles(seed: int, chunk: int, count: int, size: int, image_size: int) -> np.ndarray:
    """`count` generated tiles (chunk `chunk` of the seed's stream) as model-sized uint8 CHW."""
    sys.path.insert(0, str(REPO / "platform"))
    from harma.data.synth import render_scene, sample_scene
    from harma.data.transforms import eval_uint8

    rng = np.random.default_rng([seed, chunk])
    return np.stack([eval_uint8(render_scene(sample_scene(rng), rng, size), image_size) for _ in range(count)])


def model_vectors(n: int, queries: int, arch: str, seed: int = 0, query_source: str = "captions"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) embeddings of generated tiles and (queries, D) embeddings of captions of other tiles
    (`query_source` "images": of other tiles themselves), by the replica's encoder of a
    random-weight checkpoint of `arch`; tiles drawn by a process per core while this one encodes."""
    import os
    import tempfile
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from serve_latency import make_checkpoint_and_index

    from harma.data.synth import detailed_captions, sample_scene
    from harma.serve.encoder import QueryEncoder

    with tempfile.TemporaryDirectory() as tmp:
        ckpt, _ = make_checkpoint_and_index(tmp, arch, 1)
        encoder = QueryEncoder(ckpt, "cpu", trace=True)
        size = max(encoder.image_size, 48)
        out = np.empty((n, encoder.embed_dim), np.float32)
        chunks = [(i, min(TILE_CHUNK, n - start)) for i, start in enumerate(range(0, n, TILE_CHUNK))]
        t = time.perf_counter()
        with ProcessPoolExecutor(os.cpu_count(), mp_context=get_context("spawn")) as pool:
            pending = [pool.submit(_render_tiles, seed, i, count, size, encoder.image_size) for i, count in chunks[:8]]
            for i, _ in chunks:
                pixels = pending.pop(0).result()
                if i + 8 < len(chunks):
                    pending.append(pool.submit(_render_tiles, seed, *chunks[i + 8], size, encoder.image_size))
                out[i * TILE_CHUNK:i * TILE_CHUNK + len(pixels)] = encoder.encode_pixels(pixels).cpu().numpy()
                done = i * TILE_CHUNK + len(pixels)
                if i % 100 == 0 or done == n:
                    print(f"  tiles embedded {done}/{n} ({done / (time.perf_counter() - t):.0f}/s)", flush=True)
        if query_source == "images":
            pixels = _render_tiles(seed, len(chunks), queries, size, encoder.image_size)
            return out, np.ascontiguousarray(encoder.encode_pixels(pixels).cpu().numpy(), dtype=np.float32)
        rng = np.random.default_rng([seed, len(chunks)])
        captions = [detailed_captions(sample_scene(rng), rng)[0] for _ in range(queries)]
        text = np.concatenate([encoder.encode_texts(captions[i:i + 256]).cpu().numpy()
                               for i in range(0, len(captions), 256)]) if captions else np.zeros((0, out.shape[1]))
    return out, np.ascontiguousarray(text, dtype=np.float32)


def sizing(rows: list[dict], dim: int, n: int = 100_000_000) -> list[dict]:
    """RAM and disk of n vectors per kind from the measured bytes a vector, and the shards of
    REPLICA_RAM each they need (the fp16 re-rank vectors are a mapped file, counted on disk)."""
    out = []
    for r in rows:
        ram = r["ram_bytes_per_vector"] * n
        disk = r["disk_bytes_per_vector"] * n if r["kind"] != "exact" else 4.0 * dim * n
        out.append({"kind": r["kind"], "vectors": n, "ram_gib": ram / 2**30, "disk_gib": disk / 2**30,
                    "shards_of_16_gib": int(np.ceil(ram / REPLICA_RAM))})
    return out


def main() -> None:
    sys.path.insert(0, str(REPO / "platform"))
    from harma import storage
    from harma.index.synthetic import clip_like_vectors

    parser = argparse.ArgumentParser()
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--kinds", nargs="+", default=["ivf_flat", "ivf_pq", "hnsw"])
    parser.add_argument("--source", choices=["synthetic", "model"], default="synthetic",
                        help="clustered CLIP-like vectors, or the project's own embeddings of generated tiles")
    parser.add_argument("--arch", default="harma-tiny", help="--source model: the encoder's architecture")
    parser.add_argument("--query-source", choices=["captions", "images"], default="captions",
                        help="--source model: queries are captions of other tiles (text -> image) or other tiles")
    parser.add_argument("--out", default="benchmarks/results/ann.json")
    parser.add_argument("--smoke", action="store_true", help="seconds, tiny sizes (CI runs it)")
    args = parser.parse_args()
    if args.smoke:
        args.vectors, args.dim, args.queries = (20_000 if args.source == "synthetic" else 4_000), 64, 20
    t = time.perf_counter()
    if args.source == "model":
        sys.path.insert(0, str(REPO / "benchmarks"))
        vectors, both = model_vectors(args.vectors, 2 * args.queries, args.arch, query_source=args.query_source)
        args.dim = vectors.shape[1]
        print(f"{args.vectors} {args.arch} embeddings of generated tiles ({args.dim}-d), {args.queries} "
              f"{args.query_source[:-1]} queries ({time.perf_counter() - t:.0f} s to embed)", flush=True)
    else:
        vectors, both = clip_like_vectors(args.vectors, args.dim, queries=2 * args.queries, seed=0)
        print(f"{args.vectors} clustered vectors of {args.dim}-d, {args.queries} queries "
              f"({time.perf_counter() - t:.0f} s to draw)", flush=True)
    queries, tune_queries = both[:args.queries], both[args.queries:]  # measured on, tuned on
    exact, truth = exact_row(vectors, queries)
    rows = [exact]
    vectors16 = vectors.astype(np.float16)
    for kind in args.kinds:
        rows.extend(ann_rows(kind, vectors, vectors16, queries, truth, tune_queries))
        print(f"  {kind}: done ({rows[-1]['build_s']:.0f} s to build, {rows[-1]['tune_s']:.0f} s to tune: "
              f"{rows[-1]['tuned']['knob']} {rows[-1]['tuned']['planned']} -> {rows[-1]['tuned']['chosen']})", flush=True)
    for r in rows:
        r["speedup_single"] = exact["p50_ms"] / r["p50_ms"]
        r["meets_target"] = r["kind"] == "exact" or (r["recall_at_10"] >= 0.95 and r["speedup_single"] >= 50)
    print(f"\n{'kind':14} {'recall@10':>9} {'p50 ms':>8} {'p99 ms':>8} {'x exact':>8} {'batched q/s':>12} "
          f"{'build s':>8} {'RAM B/vec':>10} {'target':>7}")
    for r in rows:
        print(f"{r['kind']:14} {r['recall_at_10']:9.3f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['speedup_single']:8.1f} "
              f"{r['batched_qps']:12.0f} {r['build_s']:8.1f} {r['ram_bytes_per_vector']:10.0f} "
              f"{'met' if r['meets_target'] else 'NOT met':>7}")
    paper = sizing([r for r in rows if "tuned" not in r], args.dim)
    print(f"\n100 M vectors of {args.dim}-d (from the measured bytes a vector; fp16 re-rank vectors on disk, mapped):")
    for p in paper:
        print(f"  {p['kind']:9} RAM {p['ram_gib']:8.1f} GiB  disk {p['disk_gib']:8.1f} GiB  "
              f"shards of 16 GiB: {p['shards_of_16_gib']}")
    storage.write_json(args.out, {"source": args.source, "arch": args.arch if args.source == "model" else None,
                                  "query_source": args.query_source if args.source == "model" else None,
                                  "vectors": args.vectors, "dim": args.dim, "queries": args.queries, "rows": rows,
                                  "sizing_100m": paper, "smoke": args.smoke})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
