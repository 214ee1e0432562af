"""The retrieval index: embeddings + metadata + a manifest naming the checkpoint; exact top-k search.

Layout of an index (a folder or s3:// prefix), written by `harma index build`:

    manifest.json      format, checkpoint URI and fingerprint, counts, embedding size, corpus, time,
                       version (1 for a build; harma.index.versions: parent, root_uri, change)
    images.npy         (N, D) float32 L2-normalised image embeddings (an exact index)
    images.f16.npy     (N, D) float16 image embeddings, memory-mapped (an approximate index:
                       manifest `ann.kind` hnsw | ivf_flat | ivf_pq, harma.index.ann)
    images.ann         the FAISS index over them (serialised), searched and re-ranked from images.f16.npy
    images.parquet     one row per image: id (the source key), source, image_id, split, label,
                       thumbnail (JPEG bytes, may be empty)
    captions.npy       (C, D) caption embeddings (only when captions were indexed)
    captions.parquet   one row per caption: caption, image (the id of its image), image_row

Exact search: one matrix product of the queries with the gallery on the replica's device, then
top-k; metadata filters become a boolean mask over the gallery. An approximate index hands the
same masks to FAISS (harma.index.ann.AnnSearcher) and re-scores its candidates exactly. Everything here is pure (numpy,
torch, pyarrow through `harma.storage`); Ray only builds indexes (`harma.serve.build`).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from harma import storage

FORMAT = "harma-index-v1"
MANIFEST = "manifest.json"
# Metadata columns a query may filter on (values compared as strings).
FILTER_COLUMNS = ("split", "label", "image_id", "source")
TILE_COLUMNS = ("scene", "datetime", "window", "gsd")  # a scene index's metadata shown with each hit


class IndexMismatchError(ValueError):
    """The index was built with another checkpoint than the one being served."""


# --- checkpoint fingerprint ------------------------------------------------------------------
def checkpoint_fingerprint(checkpoint_uri: str) -> dict[str, str]:
    """SHA-256 of the checkpoint's config.yaml and adapter.safetensors, and of the pair.

    Two checkpoints with the same fingerprint embed identically wherever they are stored.
    """
    from harma.model.checkpoint import ADAPTER_FILE, CONFIG_FILE

    config_sha = hashlib.sha256(storage.read_bytes(storage.join(checkpoint_uri, CONFIG_FILE))).hexdigest()
    adapter_sha = hashlib.sha256(storage.read_bytes(storage.join(checkpoint_uri, ADAPTER_FILE))).hexdigest()
    both = hashlib.sha256(f"{config_sha}:{adapter_sha}".encode()).hexdigest()
    return {"config_sha256": config_sha, "adapter_sha256": adapter_sha, "fingerprint": both}


def check_index_matches(manifest: dict[str, Any], checkpoint_uri: str, fingerprint: dict[str, str]) -> None:
    """Refuse an index built by another checkpoint (same content elsewhere is accepted)."""
    if manifest.get("format") != FORMAT:
        raise IndexMismatchError(f"not a {FORMAT} index (format {manifest.get('format')!r})")
    if manifest.get("checkpoint_fingerprint") != fingerprint["fingerprint"]:
        what = ("its config differs" if manifest.get("config_sha256") != fingerprint["config_sha256"]
                else "its adapter weights differ")
        raise IndexMismatchError(
            f"the index was built with checkpoint {manifest.get('checkpoint_uri')!r}, not with "
            f"{checkpoint_uri!r} ({what}); rebuild it: harma index build --config ... "
            f"index.checkpoint_uri={checkpoint_uri}")


# --- the index -------------------------------------------------------------------------------
@dataclass
class EmbeddingIndex:
    """Image gallery (+ optional caption gallery) with metadata, as loaded into a replica."""

    manifest: dict[str, Any]
    image_emb: np.ndarray  # (N, D) float32, L2-normalised
    images: dict[str, list]  # column -> N values (id, source, image_id, split, label, thumbnail)
    caption_emb: np.ndarray | None = None  # (C, D)
    captions: dict[str, list] | None = None  # caption, image, image_row
    row_of: dict[str, int] = field(init=False)
    ann: Any = None  # harma.index.ann.AnnSearcher of an approximate index (image_emb: its fp16 vectors)
    _masks: dict[tuple, np.ndarray] = field(init=False, default_factory=dict)
    _tiles: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.image_emb.ndim != 2 or len(self.image_emb) != len(self.images["id"]):
            raise ValueError(f"index has {len(self.image_emb)} image embeddings for "
                             f"{len(self.images['id'])} metadata rows")
        self.row_of = {item: row for row, item in enumerate(self.images["id"])}
        if len(self.row_of) != len(self.images["id"]):
            raise ValueError("index image ids are not unique")

    @property
    def size(self) -> int:
        return len(self.image_emb)

    @property
    def caption_count(self) -> int:
        return 0 if self.caption_emb is None else len(self.caption_emb)

    @property
    def embed_dim(self) -> int:
        return int(self.image_emb.shape[1])

    @property
    def has_footprints(self) -> bool:
        return "geometry" in self.images

    @property
    def tiles(self):
        """The tiles' footprints, times and scenes (harma.geo.query.TileGeometry) of a scene index."""
        if not self.has_footprints:
            raise ValueError("this index has no footprints (built from images, not GeoTIFF scenes): place and "
                             "time filters need an index of index.corpus_format geotiff")
        if self._tiles is None:
            from harma.geo.query import TileGeometry

            self._tiles = TileGeometry.from_columns(self.images)
        return self._tiles

    def place_mask(self, place) -> np.ndarray | None:
        """Boolean (N,) mask of tiles matching a harma.geo.query.PlaceQuery (None = no such filter)."""
        if place is None or place.empty:
            return None
        return self.tiles.mask(place)

    def image_mask(self, filters: dict[str, str | list[str]] | None) -> np.ndarray | None:
        """Boolean (N,) mask of images whose metadata match every filter (None = no filter)."""
        if not filters:
            return None
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else (v,)) for k, v in filters.items()))
        if key in self._masks:
            return self._masks[key]
        mask = np.ones(self.size, dtype=bool)
        for column, wanted in key:
            if column not in FILTER_COLUMNS:
                raise ValueError(f"cannot filter on {column!r}; filterable: {', '.join(FILTER_COLUMNS)}")
            values = np.array(["" if v is None else str(v) for v in self.images[column]], dtype=object)
            mask &= np.isin(values, [str(w) for w in wanted])
        if len(self._masks) > 256:
            self._masks.clear()
        self._masks[key] = mask
        return mask

    def caption_mask(self, filters: dict[str, str | list[str]] | None) -> np.ndarray | None:
        """Captions whose image matches the filters."""
        return self.search_mask("captions", filters)

    def search_mask(self, target: str, filters: dict[str, str | list[str]] | None, place=None) -> np.ndarray | None:
        """One mask over the `target` gallery ('images' | 'captions'): the metadata filters AND the
        place/time filters (a caption kept when its image is); None = nothing filtered."""
        mask = self.image_mask(filters)
        where = self.place_mask(place)
        if where is not None:
            mask = where if mask is None else mask & where  # a new array: image_mask's are cached
        if target == "images" or mask is None:
            return mask
        return None if self.captions is None else mask[np.asarray(self.captions["image_row"], dtype=np.int64)]

    def image_result(self, row: int, score: float) -> dict[str, Any]:
        hit = {"id": self.images["id"][row], "score": score,
               "metadata": {c: self.images[c][row] for c in FILTER_COLUMNS + TILE_COLUMNS if c in self.images}}
        if self.has_footprints:
            from shapely.geometry import mapping

            hit["geometry"] = mapping(self.tiles.geometries[row])
            hit["centre"] = [float(v) for v in self.tiles.centres[row]]
        return hit

    def caption_result(self, row: int, score: float) -> dict[str, Any]:
        assert self.captions is not None
        return {"caption": self.captions["caption"][row], "image": self.captions["image"][row],
                "score": score}

    def thumbnail(self, item_id: str) -> bytes | None:
        """JPEG thumbnail of an image by id (a dictionary lookup, never a path)."""
        row = self.row_of.get(item_id)
        if row is None or "thumbnail" not in self.images:
            return None
        return self.images["thumbnail"][row] or None


# --- search (pure) ---------------------------------------------------------------------------
def search_batch(
    queries: torch.Tensor, gallery: torch.Tensor, ks: list[int], masks: list[np.ndarray | None]
) -> list[tuple[list[float], list[int]]]:
    """Many queries with their own k and filter in one matrix product; per query (scores, rows)."""
    scores = queries @ gallery.T  # (Q, N)
    out = []
    if any(m is not None for m in masks):
        full = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        for i, m in enumerate(masks):
            if m is not None:
                full[i] = torch.from_numpy(m).to(scores.device)
        scores = scores.masked_fill(~full, float("-inf"))
        allowed = full.sum(dim=1).tolist()
    else:
        allowed = [gallery.shape[0]] * len(ks)
    k_max = min(max(ks), gallery.shape[0])
    values, rows = torch.topk(scores, k_max, dim=-1)
    values, rows = values.float().cpu().tolist(), rows.cpu().tolist()
    for i, k in enumerate(ks):
        n = min(k, allowed[i], k_max)
        out.append((values[i][:n], rows[i][:n]))
    return out


# --- storage ---------------------------------------------------------------------------------
def _npy_bytes(array: np.ndarray, dtype=np.float32) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=dtype), allow_pickle=False)
    return buf.getvalue()


def _parquet_bytes(columns: dict[str, list]) -> bytes:
    """Parquet of the columns; GeoParquet (harma.geo.geoparquet) when they hold tile footprints."""
    buf = io.BytesIO()
    if "geometry" in columns:
        from harma.geo.geoparquet import geoparquet_table

        table = geoparquet_table(columns)
    else:
        table = pa.table(columns)
    pq.write_table(table, buf)
    return buf.getvalue()


def _ann_kind(manifest: dict[str, Any]) -> str:
    return (manifest.get("ann") or {}).get("kind", "exact")


def save_index(uri: str, index: EmbeddingIndex, ann_index: Any = None) -> None:
    """Write an index (data files first, the manifest last: a reader never sees half an index);
    an approximate one (manifest `ann`) with its FAISS index `ann_index` and fp16 vectors."""
    storage.makedirs(uri)
    if _ann_kind(index.manifest) == "exact":
        storage.write_bytes(storage.join(uri, "images.npy"), _npy_bytes(index.image_emb))
    else:
        from harma.index.ann import ann_to_bytes

        if ann_index is None:
            raise ValueError(f"an index of ann kind {_ann_kind(index.manifest)!r} needs its FAISS index")
        storage.write_bytes(storage.join(uri, "images.f16.npy"), _npy_bytes(index.image_emb, np.float16))
        storage.write_bytes(storage.join(uri, "images.ann"), ann_to_bytes(ann_index))
    storage.write_bytes(storage.join(uri, "images.parquet"), _parquet_bytes(index.images))
    if index.caption_emb is not None and index.captions is not None:
        storage.write_bytes(storage.join(uri, "captions.npy"), _npy_bytes(index.caption_emb))
        storage.write_bytes(storage.join(uri, "captions.parquet"), _parquet_bytes(index.captions))
    write_manifest(uri, index.manifest)


def write_manifest(uri: str, manifest: dict[str, Any]) -> None:
    """The manifest of the index at `uri`, written last (its data files first: a reader never sees
    half an index); a sharded index's root manifest after its shards."""
    storage.write_bytes(storage.join(uri, MANIFEST), json.dumps(manifest, indent=1).encode())


def read_manifest(uri: str) -> dict[str, Any]:
    path = storage.join(uri, MANIFEST)
    if not storage.exists(path):
        raise FileNotFoundError(f"{uri}: no index here (no {MANIFEST}); build one with `harma index build`")
    return json.loads(storage.read_bytes(path))


def index_file(uri: str, manifest: dict[str, Any], name: str) -> str:
    """A local path of file `name` of the index at `uri`: the file itself, or the node's cached copy
    of an s3:// index's (harma.index.cache; one entry a version: versions of one index share their
    checkpoint and may share a build second)."""
    from harma.index.cache import local_file

    where = hashlib.sha256(str(uri).encode()).hexdigest()[:8]
    key = f"{manifest['checkpoint_fingerprint'][:16]}-{manifest.get('built_at', '')}-v{manifest.get('version', 1)}-{where}"
    return local_file(uri, name, key)


def load_index(uri: str) -> EmbeddingIndex:
    manifest = read_manifest(uri)
    if manifest.get("shards"):
        from harma.index.shards import shard_location

        raise ValueError(f"{uri} is an index of {len(manifest['shards'])} shards (harma.index.shards): load one "
                         f"of them ({shard_location(uri, manifest, 0)}, ...) or serve the whole")
    ann = None
    if _ann_kind(manifest) == "exact":
        image_emb = np.load(io.BytesIO(storage.read_bytes(storage.join(uri, "images.npy"))), allow_pickle=False)
    else:
        from harma.index.ann import AnnParams, AnnSearcher, mapped_ann

        image_emb = np.load(index_file(uri, manifest, "images.f16.npy"), mmap_mode="r", allow_pickle=False)
        ann = AnnSearcher(mapped_ann(index_file(uri, manifest, "images.ann"), manifest["ann"]["kind"]), image_emb,
                          AnnParams.from_manifest(manifest["ann"]))
    images = storage.read_table(storage.join(uri, "images.parquet")).to_pydict()
    images.pop("bbox", None)  # GeoParquet's covering column: derived from the geometry
    caption_emb = captions = None
    if manifest.get("captions", 0):
        caption_emb = np.load(io.BytesIO(storage.read_bytes(storage.join(uri, "captions.npy"))),
                              allow_pickle=False)
        captions = storage.read_table(storage.join(uri, "captions.parquet")).to_pydict()
    return EmbeddingIndex(manifest, image_emb, images, caption_emb, captions, ann)
