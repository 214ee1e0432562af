"""Approximate nearest-neighbour search of an index's image gallery with FAISS, re-ranked exactly.

    from harma.index.ann import plan_ann, build_ann, AnnSearcher
    params = plan_ann("auto", n=len(vectors), dim=vectors.shape[1], budget_bytes=8 << 30)
    index = build_ann(vectors, params)                      # train on a sample, then add
    searcher = AnnSearcher(index, vectors.astype(np.float16), params)
    [(scores, rows)] = searcher.search(queries, ks=[10], masks=[None])

Kinds (`index.ann`):
  exact     no FAISS index: the replica scans the float32 gallery (one matrix product)
  hnsw      IndexHNSWFlat, `hnsw_m` links a vector: fastest queries, slowest build, most memory
  ivf_flat  IndexIVFFlat: `nlist` k-means cells (~2 sqrt(N)), `nprobe` of them scanned, full vectors in RAM
  ivf_pq    IndexIVFPQ: the same cells, each vector as `pq_m` bytes; full vectors stay on disk
  auto      `choose_kind`: exact under EXACT_BELOW vectors (when they fit the memory budget),
            else ivf_pq; ivf_flat and hnsw only when asked for. Measured on 1 M clustered 512-d
            vectors, 2 cores (benchmarks/ann.py): ivf_pq recall@10 0.992 at 61x the exact scan's
            single-query speed in 77 bytes a vector; ivf_flat 0.998 at 20x in 2,060; hnsw 0.858
            at 52x in 2,320 and a 128 s build

Every kind's candidates (`rerank` x k of them) are re-scored from the index's fp16 vectors (a
memory-mapped file), so the scores a query reports are cosine similarities of the stored vectors,
never a quantiser's estimate. Filters run inside FAISS (an `IDSelectorBitmap` of the allowed rows),
so a filtered query gets k hits when k rows pass; a filter that passes at most EXACT_SUBSET_ROWS
rows is scanned exactly over those rows instead, and an ANN answer with fewer than k hits where k
rows pass is completed by the exact scan of the allowed rows. Pure numpy + FAISS: no Ray, no torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import faiss
import numpy as np

KINDS = ("exact", "hnsw", "ivf_flat", "ivf_pq")
EXACT_BELOW = 50_000  # auto: an exact scan of fewer vectors takes ~10 ms on 2 cores at 512-d
EXACT_SUBSET_ROWS = 20_000  # a filter passing at most this many rows: exact scan of those rows
TRAIN_PER_LIST = 64  # k-means training vectors per IVF cell (FAISS warns under 39)
MAX_TRAIN_ROWS = 262_144
ADD_CHUNK = 65_536  # vectors added to the FAISS index at a time (progress between chunks)
ID_BYTES = 8  # an IVF list stores an int64 id beside each code
HNSW_EF_CONSTRUCTION = 40
# FAISS spreads a query over its threads by probed cells (parallel_mode 1) for a few queries, and
# by query (0) for batches: single-query latency 2.4 -> 1.5 ms (ivf_pq, 1 M vectors, 2 cores).
FEW_QUERIES = 4


@dataclass(frozen=True)
class AnnParams:
    """A resolved ANN configuration, as recorded in the index manifest (`ann`)."""

    kind: str
    nlist: int = 0  # IVF cells
    nprobe: int = 0  # IVF cells scanned a query
    pq_m: int = 0  # ivf_pq: bytes (sub-quantisers of 8 bits) a vector
    hnsw_m: int = 0  # hnsw: links a vector
    ef_search: int = 0  # hnsw: candidate list of a query
    rerank: int = 50  # candidates re-scored exactly: rerank x k
    train_rows: int = 0

    def to_manifest(self) -> dict:
        return asdict(self)

    @classmethod
    def from_manifest(cls, record: dict | None) -> AnnParams:
        if not record:
            return cls("exact")
        return cls(**{k: v for k, v in record.items() if k in cls.__dataclass_fields__})


def ram_bytes_per_vector(kind: str, dim: int, pq_m: int = 0, hnsw_m: int = 32) -> float:
    """RAM a vector costs a replica in the FAISS structure of `kind` (the fp16 re-rank vectors,
    2 x dim bytes, are a mapped file: in the page cache, shared by a node's replicas)."""
    if kind == "exact":
        return 4.0 * dim
    if kind == "ivf_flat":
        return 4.0 * dim + ID_BYTES
    if kind == "ivf_pq":
        return float((pq_m or default_pq_m(dim)) + ID_BYTES)
    if kind == "hnsw":
        return 4.0 * dim + 2 * hnsw_m * 4 * 1.05  # level 0 holds 2M links; upper levels ~5 % more
    raise ValueError(f"unknown ANN kind {kind!r}; one of {', '.join(KINDS)}")


def choose_kind(n: int, dim: int, budget_bytes: int) -> str:
    """The `auto` rule: exact under EXACT_BELOW vectors while their float32 copy fits
    `budget_bytes`; ivf_pq otherwise, refused when even its codes do not fit."""
    if n < EXACT_BELOW and n * ram_bytes_per_vector("exact", dim) <= budget_bytes:
        return "exact"
    need = n * ram_bytes_per_vector("ivf_pq", dim)
    if need > budget_bytes:
        raise ValueError(f"{n:,} vectors need {need / 2**30:.1f} GiB as ivf_pq codes, over "
                         f"index.ann_params.memory_budget_bytes ({budget_bytes / 2**30:.1f} GiB): raise it")
    return "ivf_pq"


def default_nlist(n: int) -> int:
    """IVF cells: the power of two nearest 2 sqrt(n) (2,048 for 1 M), at least 16, at most n / 39.
    (Measured on 1 M clustered vectors, 2 cores: 1,024 cells, 8 probed: 1.9 ms at recall 0.974;
    2,048: 1.3 ms at 0.986, the cells also less uneven.)"""
    target = 2 ** round(math.log2(max(1.0, 2 * math.sqrt(n))))
    return int(max(1, min(max(16, target), n // 39 or 1, 65_536)))


def default_pq_m(dim: int) -> int:
    """Sub-quantisers of ivf_pq: one per 8 dimensions (64 bytes a vector at 512-d), a divisor of dim."""
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return m


def plan_ann(kind: str, n: int, dim: int, budget_bytes: int, nlist: int = 0, nprobe: int = 0, pq_m: int = 0,
             hnsw_m: int = 32, ef_search: int = 0, rerank: int = 50, train_rows: int = 0) -> AnnParams:
    """`kind` ('auto' or one of KINDS) resolved for n vectors of `dim`, unset numbers (0) by rule."""
    if kind == "auto":
        kind = choose_kind(n, dim, budget_bytes)
    if kind not in KINDS:
        raise ValueError(f"index.ann: unknown kind {kind!r}; one of auto, {', '.join(KINDS)}")
    if kind == "exact":
        return AnnParams("exact", rerank=rerank)
    if kind == "hnsw":
        return AnnParams("hnsw", hnsw_m=hnsw_m, ef_search=ef_search or 256, rerank=rerank)
    nlist = nlist or default_nlist(n)
    if n < nlist:
        raise ValueError(f"index.ann {kind}: {n} vectors cannot train {nlist} cells; lower ann_params.nlist "
                         f"or use exact")
    if kind == "ivf_pq":
        pq_m = pq_m or default_pq_m(dim)
        if dim % pq_m:
            raise ValueError(f"index.ann ivf_pq: pq_m {pq_m} does not divide the embedding size {dim}")
    return AnnParams(kind, nlist=nlist, nprobe=min(nlist, nprobe or max(8, nlist // 256)),
                     pq_m=pq_m if kind == "ivf_pq" else 0, rerank=rerank,
                     train_rows=min(n, train_rows or min(MAX_TRAIN_ROWS, TRAIN_PER_LIST * nlist)))


def encoded_by_codes(kind: str) -> bool:
    """Whether vectors of `kind` can be encoded apart from the index (the embedding actors do it) and
    appended as codes: the IVF kinds, once trained. An HNSW graph is built by adding to it."""
    return kind in ("ivf_flat", "ivf_pq")


def trained_codec(sample: np.ndarray, params: AnnParams, seed: int = 0,
                  progress: Callable[[str], None] = lambda _: None) -> faiss.Index:
    """An empty IVF index of `params` (inner product) with its cells (and PQ codebooks) trained on
    L2-normalised float32 `sample` (at most `params.train_rows` of its rows, drawn at random). It
    encodes vectors anywhere (`encode`, after `ann_to_bytes`), and `filled` appends their codes."""
    if not encoded_by_codes(params.kind):
        raise ValueError(f"a {params.kind} index has no trained codec")
    n, dim = sample.shape
    if n < params.nlist:
        raise ValueError(f"index.ann {params.kind}: {n} sample vectors cannot train {params.nlist} cells; lower "
                         f"ann_params.nlist or use exact")
    quantizer = faiss.IndexFlatIP(dim)
    if params.kind == "ivf_flat":
        index = faiss.IndexIVFFlat(quantizer, dim, params.nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, params.nlist, params.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    take = min(n, params.train_rows or n)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=take, replace=False))
    started = time.perf_counter()
    index.cp.seed = seed
    index.train(np.ascontiguousarray(sample[rows], dtype=np.float32))
    index.own_fields = True  # the coarse quantiser lives as long as the index (a codec outlives this call)
    quantizer.this.disown()
    progress(f"  ANN {params.kind}: trained {params.nlist} cells on {len(rows)} vectors "
             f"in {time.perf_counter() - started:.1f} s")
    return index


def encode(codec: faiss.Index, vectors: np.ndarray) -> np.ndarray:
    """(N, codec.sa_code_size()) uint8: each vector's cell and code under the trained `codec`,
    exactly what adding it to the index would store (FAISS's standalone codec)."""
    if not len(vectors):
        return np.zeros((0, codec.sa_code_size()), np.uint8)
    return codec.sa_encode(np.ascontiguousarray(vectors, dtype=np.float32))


def append_codes(index: faiss.Index, codes: np.ndarray,
                 progress: Callable[[str], None] = lambda _: None) -> faiss.Index:
    """`index` (an IVF index, trained) with `codes` (from `encode` under its codec) appended in
    chunks, rows following on. Equals adding the vectors themselves, byte for byte."""
    n = len(codes)
    for start in range(0, n, ADD_CHUNK):
        index.add_sa_codes(np.ascontiguousarray(codes[start:start + ADD_CHUNK], dtype=np.uint8))
        if n > ADD_CHUNK:
            progress(f"  ANN: appended {min(n, start + ADD_CHUNK)}/{n} codes")
    return index


def filled(codec: faiss.Index, codes: np.ndarray,
           progress: Callable[[str], None] = lambda _: None) -> faiss.Index:
    """A copy of trained, empty `codec` holding `codes` (row = id)."""
    return append_codes(faiss.clone_index(codec), codes, progress)


def build_ann(vectors: np.ndarray, params: AnnParams, seed: int = 0,
              progress: Callable[[str], None] = lambda _: None) -> faiss.Index:
    """A FAISS index of `params.kind` over L2-normalised float32 `vectors` (row = id), inner product,
    in this process: an IVF index trained on `params.train_rows` rows drawn at random, then filled;
    an HNSW graph added to in chunks."""
    if params.kind == "exact":
        raise ValueError("an exact index has no FAISS structure: the replica scans the gallery")
    n, dim = vectors.shape
    if params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    else:
        index = trained_codec(vectors, params, seed, progress)
    return add_vectors(index, vectors, progress, label=f"ANN {params.kind}")


def add_vectors(index: faiss.Index, vectors: np.ndarray, progress: Callable[[str], None] = lambda _: None,
                label: str = "ANN") -> faiss.Index:
    """`index` (trained, or an HNSW graph) with float32 `vectors` added in chunks of ADD_CHUNK, rows
    following on; progress after each chunk when there is more than one."""
    n = len(vectors)
    for start in range(0, n, ADD_CHUNK):
        index.add(np.ascontiguousarray(vectors[start:start + ADD_CHUNK], dtype=np.float32))
        if n > ADD_CHUNK:
            progress(f"  {label}: added {min(n, start + ADD_CHUNK)}/{n}")
    return index


def ann_to_bytes(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def ann_from_bytes(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def mapped_ann(path: str, kind: str) -> faiss.Index:
    """The FAISS index in local file `path` for searching: an IVF index whose inverted lists view the
    memory-mapped file (FAISS's IO_FLAG_MMAP_IFC: the codes stay in the page cache, shared by the
    replicas of a node, and are searched as fast as lists read into memory: a 300,000-vector 512-d
    IVF-PQ index added 1.6 MB to a process's RSS mapped against 22.1 MB read, p50 0.79 against 0.82
    ms a query), an HNSW graph read into memory. A mapped index is not added to: updates read a
    copy (ann_from_bytes). (IO_FLAG_MMAP's on-disk lists were slower: p50 1.2 ms, p99 4.3 ms.)"""
    if kind == "hnsw":
        return faiss.read_index(path)
    return faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC)


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int, chunk: int = 65_536) -> np.ndarray:
    """(Q, k) rows of each query's k best inner products over `vectors`, best first, computed a chunk
    of rows at a time (never a Q x N score matrix)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_rows = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(vectors), chunk):
        scores = queries @ np.asarray(vectors[start:start + chunk], np.float32).T
        take = min(k, scores.shape[1])
        part = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, part, axis=1)], axis=1)
        best_rows = np.concatenate([best_rows, part + start], axis=1)
        keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores, best_rows = np.take_along_axis(best_scores, keep, 1), np.take_along_axis(best_rows, keep, 1)
    return best_rows


class _Fp16Rows:
    """Rows of float32 `vectors` as the served fp16 file gives them (for AnnSearcher's re-rank), made
    only for the rows asked: no fp16 copy of the whole gallery."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors

    def __len__(self) -> int:
        return len(self.vectors)

    def __getitem__(self, rows):
        return np.asarray(self.vectors[rows], np.float32).astype(np.float16)


TUNE_DOUBLINGS = 4  # HNSW: ef_search tried at up to 2^4 x its planned value (IVF: up to nlist)
TUNE_MIN_GAIN = 0.01  # a doubling that adds less recall than this (target not met) is not taken


def tune_search(index: faiss.Index, vectors: np.ndarray, params: AnnParams, queries: np.ndarray,
                target_recall: float, k: int = 10) -> tuple[AnnParams, dict]:
    """The planned `params` with the smallest nprobe (IVF; at most nlist) or ef_search (HNSW), from
    the planned value doubling, at which `queries` find `target_recall` of their exact top-k over
    `vectors` (float32, the rows of `index`), re-ranked as a replica does from fp16; and a record of
    it. Short of the target, it stops where a doubling adds under TUNE_MIN_GAIN recall and keeps the
    value before (on a 300,000-tile gallery HNSW went 0.47 -> 0.60 from ef_search 256 to 65,536 at
    650 ms a query: slower than the exact scan), `met` false. autofaiss tunes the same way."""
    knob = "ef_search" if params.kind == "hnsw" else "nprobe"
    start = getattr(params, knob)
    limit = params.nlist if knob == "nprobe" else start << TUNE_DOUBLINGS
    truth = exact_top_k(queries, vectors, k)
    rows = _Fp16Rows(vectors)
    value, recall, tried = start, 0.0, []
    while True:
        candidate = AnnParams(**{**params.to_manifest(), knob: value})
        found = AnnSearcher(index, rows, candidate).search(queries, [k] * len(queries), [None] * len(queries))
        gained = float(np.mean([len(set(f) & set(t.tolist())) / k for (_, f), t in zip(found, truth, strict=True)]))
        tried.append([value, round(gained, 4)])
        if len(tried) > 1 and gained < target_recall and gained - recall < TUNE_MIN_GAIN:
            value = tried[-2][0]  # the doubling was not worth its cost
            break
        recall = gained
        if recall >= target_recall or value >= limit:
            break
        value = min(value * 2, limit)
    record = {"knob": knob, "planned": start, "chosen": value, "target_recall": target_recall,
              "recall_at_10": round(recall, 4), "met": recall >= target_recall, "queries": len(queries),
              "tried": tried}
    return AnnParams(**{**params.to_manifest(), knob: value}), record


def _search_params(params: AnnParams, selector, nprobe: int | None = None):
    if params.kind == "hnsw":
        p = faiss.SearchParametersHNSW()
        p.efSearch = params.ef_search
    else:
        p = faiss.SearchParametersIVF()
        p.nprobe = nprobe or params.nprobe
    if selector is not None:
        p.sel = selector
    return p


class AnnSearcher:
    """Top-k of queries against a FAISS index, each query with its own k and row mask, every hit
    re-scored from `vectors` (N, D), any float dtype (the index's fp16 file, memory-mapped)."""

    def __init__(self, index: faiss.Index, vectors: np.ndarray, params: AnnParams):
        if index.ntotal != len(vectors):
            raise ValueError(f"ANN index holds {index.ntotal} vectors, the re-rank store {len(vectors)}")
        self.index, self.vectors, self.params = index, vectors, params
        self.reranked = 0  # candidates re-scored since the last `take_reranked`

    @property
    def size(self) -> int:
        return len(self.vectors)

    def take_reranked(self) -> int:
        taken, self.reranked = self.reranked, 0
        return taken

    def search(self, queries: np.ndarray, ks: list[int], masks: list[np.ndarray | None]
               ) -> list[tuple[list[float], list[int]]]:
        """Per query (scores, rows), best first; queries sharing a mask (or none) share a FAISS call."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        out: list[tuple[list[float], list[int]]] = [([], [])] * len(ks)
        groups: dict[int, list[int]] = {}
        for i, mask in enumerate(masks):
            groups.setdefault(-1 if mask is None else id(mask), []).append(i)
        for members in groups.values():
            mask = masks[members[0]]
            allowed = self.size if mask is None else int(mask.sum())
            for i, found in zip(members, self._search_group(queries[members], [ks[i] for i in members], mask, allowed),
                                strict=True):
                out[i] = found
        return out

    def _search_group(self, queries: np.ndarray, ks: list[int], mask: np.ndarray | None, allowed: int):
        if allowed == 0:
            return [([], [])] * len(ks)
        if mask is not None and allowed <= EXACT_SUBSET_ROWS:
            rows = np.flatnonzero(mask)
            return [self._rescore(q, rows, k) for q, k in zip(queries, ks, strict=True)]
        want = min(allowed, max(ks) * self.params.rerank)
        bits = None if mask is None else np.packbits(mask, bitorder="little")
        selector = None if bits is None else faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
        if self.params.kind != "hnsw":
            faiss.extract_index_ivf(self.index).parallel_mode = 1 if len(queries) <= FEW_QUERIES else 0
        _, ids = self.index.search(queries, want, params=_search_params(self.params, selector))
        del selector, bits  # the bitmap outlives the search it was lent to
        answers = []
        for q, k, row_ids in zip(queries, ks, ids, strict=True):
            rows = row_ids[row_ids >= 0]
            if len(rows) < min(k, allowed):  # too few candidates in the probed cells: scan the allowed rows
                rows = np.arange(self.size) if mask is None else np.flatnonzero(mask)
            answers.append(self._rescore(q, rows, k))
        return answers

    def _rescore(self, query: np.ndarray, rows: np.ndarray, k: int) -> tuple[list[float], list[int]]:
        rows = np.sort(rows)  # a mapped file is read in order
        self.reranked += len(rows)
        scores = np.asarray(self.vectors[rows], dtype=np.float32) @ query
        top = np.argsort(-scores, kind="stable")[:k]
        return scores[top].tolist(), rows[top].tolist()
