"""Index updates without re-embedding what is indexed: `harma index add` and `harma index delete`.

    harma index add --index URI [--corpus URI] [index.splits=[train,test] index.actors=2 ...]
    harma index delete --index URI (--ids ID ... | --ids-file FILE | --scene SCENE ...)
    harma index versions URI

`add` embeds only the corpus items the index lacks (image files or prepared image keys not in it;
scenes of a scene archive not in it), with the parent's checkpoint, numerics, thumbnails and tiling
(read from its manifest: an added version embeds as the parent did), and writes parent + new as the
next version. `delete` writes the next version without the given items (and their captions). The
parent's vectors are copied, never re-embedded. An approximate index keeps its trained quantiser:
`add` appends the new vectors to its IVF lists (encoded under its cells by the embedding actors) or
HNSW graph; `delete` re-adds the kept vectors to
the emptied IVF lists (encoding only, no k-means), and rebuilds an HNSW graph (HNSW cannot remove).
The index keeps the kind it was built with; rebuild (`harma index build`) to change it, or when many
vectors were added since the quantiser was trained (the manifest's `ann.added_since_training`).

Where versions live and how serving moves between them: harma.index.versions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from harma import storage
from harma.index.versions import next_version, root_of
from harma.serve.index import (
    EmbeddingIndex,
    check_index_matches,
    checkpoint_fingerprint,
    load_index,
    save_index,
)

log = logging.getLogger(__name__)

# Settings of `harma index add` a user may change; everything that decides an embedding comes from
# the parent's manifest.
ADD_SETTINGS = ("corpus_uri", "splits", "image_extensions", "batch_size", "actors", "cpus_per_actor", "use_gpu",
                "trace_encoders", "geo.max_bad_fraction", "geo.windows_per_task", "geo.tiles_per_output")


class UnknownItemsError(ValueError):
    """`harma index delete` named ids or scenes the index does not hold."""


@dataclass
class Rows:
    """An index's rows as an update handles them: vectors, image columns, captions."""

    vectors: np.ndarray  # (N, D) float32
    images: dict[str, list]
    caption_emb: np.ndarray | None
    captions: dict[str, list] | None


# --- the row arithmetic (pure) -----------------------------------------------------------------
def appended(parent: Rows, new: Rows) -> Rows:
    """`parent` followed by `new`: new caption rows point past the parent's images."""
    if set(parent.images) != set(new.images):
        raise ValueError(f"the new items have columns {sorted(new.images)}, the index {sorted(parent.images)}")
    if parent.vectors.shape[1] != new.vectors.shape[1]:
        raise ValueError(f"new embeddings of {new.vectors.shape[1]} dims for an index of {parent.vectors.shape[1]}")
    images = {c: list(parent.images[c]) + list(new.images[c]) for c in parent.images}
    vectors = np.concatenate([np.asarray(parent.vectors, np.float32), np.asarray(new.vectors, np.float32)])
    if parent.captions is None and new.captions is None:
        return Rows(vectors, images, None, None)
    offset = len(parent.vectors)
    dim = parent.vectors.shape[1]
    old_caps = parent.captions or {"caption": [], "image": [], "image_row": []}
    new_caps = new.captions or {"caption": [], "image": [], "image_row": []}
    captions = {"caption": list(old_caps["caption"]) + list(new_caps["caption"]),
                "image": list(old_caps["image"]) + list(new_caps["image"]),
                "image_row": list(old_caps["image_row"]) + [r + offset for r in new_caps["image_row"]]}
    caption_emb = np.concatenate([np.zeros((0, dim), np.float32) if e is None else np.asarray(e, np.float32)
                                  for e in (parent.caption_emb, new.caption_emb)])
    return Rows(vectors, images, caption_emb, captions)


def kept(rows: Rows, drop: np.ndarray) -> Rows:
    """`rows` without the images where `drop` (bool, one per image) is set, nor their captions;
    the kept captions point at their images' new rows."""
    keep = ~np.asarray(drop, dtype=bool)
    if len(keep) != len(rows.vectors):
        raise ValueError(f"{len(keep)} flags for {len(rows.vectors)} images")
    where = np.flatnonzero(keep)
    images = {c: [values[i] for i in where] for c, values in rows.images.items()}
    vectors = np.asarray(rows.vectors[where], np.float32)
    if rows.captions is None:
        return Rows(vectors, images, None, None)
    new_row = np.cumsum(keep) - 1  # an image's row once the dropped ones are gone
    image_rows = np.asarray(rows.captions["image_row"], dtype=np.int64)
    take = np.flatnonzero(keep[image_rows]) if len(image_rows) else np.zeros(0, np.int64)
    captions = {"caption": [rows.captions["caption"][i] for i in take],
                "image": [rows.captions["image"][i] for i in take],
                "image_row": [int(new_row[image_rows[i]]) for i in take]}
    return Rows(vectors, images, np.asarray(rows.caption_emb[take], np.float32), captions)


def drop_flags(index_ids: list[str], scenes_of_rows: list[str] | None, ids: list[str], scenes: list[str],
               missing_ok: bool = False) -> np.ndarray:
    """One flag per image: drop it (its id in `ids`, or its scene in `scenes`). Ids or scenes the
    index lacks are refused, naming them (a typo deletes nothing), unless `missing_ok`."""
    if scenes and scenes_of_rows is None:
        raise ValueError("--scene needs a scene index (index.corpus_format geotiff); this one has image ids")
    drop = np.isin(np.asarray(index_ids, dtype=object), list(ids)) if ids else np.zeros(len(index_ids), bool)
    if scenes:
        drop |= np.isin(np.asarray(scenes_of_rows, dtype=object), list(scenes))
    if not missing_ok:
        missing = sorted(set(ids) - set(index_ids)) + sorted(set(scenes) - set(scenes_of_rows or []))
        if missing:
            shown = ", ".join(map(repr, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise UnknownItemsError(f"not in the index: {shown} (nothing was written; --missing-ok to delete the others)")
    if drop.all():
        raise ValueError(f"deleting all {len(drop)} images would leave an empty index")
    return drop


# --- the ANN structure ---------------------------------------------------------------------------
def added_ann(parent_ann, new_vectors: np.ndarray):
    """The parent's FAISS index (deserialised: a copy) with `new_vectors` appended (rows follow on)."""
    from harma.index.ann import add_vectors

    return add_vectors(parent_ann, new_vectors)


def kept_ann(parent_ann, params, vectors: np.ndarray, progress=log.info):
    """A FAISS index over the kept `vectors`: an IVF index's trained cells (and PQ codebooks) reused
    with its lists emptied and refilled; an HNSW graph built again."""
    from harma.index.ann import add_vectors, build_ann

    if params.kind == "hnsw":
        progress(f"  HNSW cannot remove vectors: building its graph again over {len(vectors)}")
        return build_ann(vectors, params, progress=progress)
    parent_ann.reset()  # the inverted lists only: the quantiser and codebooks stay trained
    return add_vectors(parent_ann, vectors, progress, label=f"ANN {params.kind} refilled")


def _codec_of(parent_ann, manifest: dict):
    """An empty copy of an IVF parent's FAISS index (its trained cells and codebooks): what the
    embedding actors encode new items under; None for an exact or HNSW index."""
    from harma.index.ann import encoded_by_codes

    if parent_ann is None or not encoded_by_codes((manifest.get("ann") or {}).get("kind", "exact")):
        return None
    import faiss

    codec = faiss.clone_index(parent_ann)
    codec.reset()
    return codec


# --- versions ------------------------------------------------------------------------------------
def _parent(uri: str) -> tuple[str, EmbeddingIndex, Any]:
    """(absolute URI, loaded index, its FAISS index or None) of the version an update starts from,
    checked against its checkpoint as it is stored now."""
    from harma.serve.index import read_manifest

    uri = storage.absolute(uri)
    if read_manifest(uri).get("shards"):
        raise ValueError(f"{uri} is a sharded index: harma index add and delete update an index of one shard; "
                         f"rebuild a sharded one (harma index build)")
    index = load_index(uri)
    fingerprint = checkpoint_fingerprint(index.manifest["checkpoint_uri"])
    check_index_matches(index.manifest, index.manifest["checkpoint_uri"], fingerprint)
    faiss_index = None
    if index.ann is not None:  # a copy to change: the served one maps its file read-only
        import faiss

        from harma.serve.index import index_file

        faiss_index = faiss.read_index(index_file(uri, index.manifest, "images.ann"))  # the file load_index fetched
    return uri, index, faiss_index


def _rows_of(index: EmbeddingIndex) -> Rows:
    return Rows(np.asarray(index.image_emb, np.float32), index.images, index.caption_emb, index.captions)


def _manifest(parent_uri: str, parent: dict, number: int, rows: Rows, change: dict, started: float) -> dict:
    manifest = {**parent, "version": number, "parent": parent_uri, "root_uri": root_of(parent_uri, parent),
                "images": len(rows.vectors), "captions": 0 if rows.caption_emb is None else len(rows.caption_emb),
                "change": change, "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "build_seconds": round(time.perf_counter() - started, 2)}
    return manifest


def _write(uri: str, manifest: dict, rows: Rows, ann_index, progress) -> None:
    save_index(uri, EmbeddingIndex(manifest, rows.vectors, rows.images, rows.caption_emb, rows.captions), ann_index)
    progress(f"index version {manifest['version']} written to {uri}: {manifest['images']} images, "
             f"{manifest['captions']} captions ({manifest['build_seconds']:.1f} s)")


def _copy_quicklooks(parent_uri: str, uri: str, scene_list: list[dict]) -> list[dict]:
    """The parent's scene overviews copied into the new version, renumbered by their new positions."""
    from harma.serve.build import quicklook_name

    listed = []
    for position, scene in enumerate(scene_list):
        name = quicklook_name(position)
        storage.write_bytes(storage.join(uri, name), storage.read_bytes(storage.join(parent_uri, scene["quicklook"])))
        listed.append({**scene, "quicklook": name})
    return listed


def add_config(manifest: dict, output_uri: str, settings: dict[str, Any]):
    """The IndexConfig an added version embeds with: the parent's embedding (checkpoint, numerics,
    thumbnails, tiling, corpus format) and the user's `settings` (only ADD_SETTINGS)."""
    from harma.config import GeoIndexConfig, IndexConfig, apply_overrides

    refused = sorted(k for k in settings if k not in ADD_SETTINGS)
    if refused:
        raise ValueError(f"harma index add cannot change {', '.join(refused)}: an added version embeds as the "
                         f"index did (its manifest); changeable: {', '.join(ADD_SETTINGS)}")
    precision = manifest.get("precision") or {}
    weights, validated = precision.get("weights"), precision.get("validated_in")
    raw: dict[str, Any] = {
        "checkpoint_uri": manifest["checkpoint_uri"], "corpus_uri": manifest["corpus_uri"],
        "corpus_format": manifest["corpus_format"], "output_uri": output_uri,
        "splits": manifest.get("splits") or ["test"], "captions": bool(manifest.get("captions")),
        "thumbnail_size": manifest.get("thumbnail_size", 128 if manifest.get("thumbnails") else 0),
        "precision": "validated" if weights == validated else weights,
        "ann": (manifest.get("ann") or {}).get("kind", "exact")}
    if manifest["corpus_format"] == "geotiff":
        raw["geo"] = {k: manifest["geo"][k] for k in GeoIndexConfig.model_fields if k in manifest["geo"]}
    raw = apply_overrides({"index": raw}, {f"index.{k}": v for k, v in settings.items()})["index"]
    return IndexConfig.model_validate(raw)


def add_to_index(index_uri: str, settings: dict[str, Any] | None = None, progress=log.info) -> dict[str, Any]:
    """Embed the items of the corpus the index at `index_uri` lacks and write parent + new as the next
    version (Ray must be up); returns its manifest."""
    from harma.serve.build import _prepare, _quicklooks, _scenes_read, embed_corpus

    started = time.perf_counter()
    parent_uri, parent, parent_ann = _parent(index_uri)
    root = root_of(parent_uri, parent.manifest)
    number, uri = next_version(root)
    cfg = _prepare(add_config(parent.manifest, uri, dict(settings or {})))
    geo = cfg.corpus_format == "geotiff"
    if geo:
        listed = (parent.manifest.get("geo") or {}).get("scene_list", [])
        skip = frozenset(parent.images["scene"]) | {s["scene"] for s in listed}
    else:
        skip = frozenset(parent.images["id"]) | {str(s) for s in parent.manifest.get("skipped", [])}
    progress(f"adding to version {parent.manifest.get('version', 1)} of {root} ({parent.size} images): "
             f"new items of {cfg.corpus_uri}")
    codec = _codec_of(parent_ann, parent.manifest)
    corpus = embed_corpus(cfg, progress, skip=skip, codec=codec)
    new = Rows(corpus.image_emb, corpus.meta, corpus.caption_emb, corpus.captions)
    rows = appended(_rows_of(parent), new)
    change = {"kind": "add", "corpus_uri": cfg.corpus_uri, "added": len(new.vectors),
              "added_captions": 0 if new.caption_emb is None else len(new.caption_emb), "skipped": corpus.skipped,
              "embed_seconds": round(time.perf_counter() - started, 2)}
    manifest = _manifest(parent_uri, parent.manifest, number, rows, change, started)
    if not geo:
        manifest["skipped"] = list(parent.manifest.get("skipped", [])) + corpus.skipped
    else:
        scene_list = _copy_quicklooks(parent_uri, uri, listed)
        scene_list += _quicklooks(cfg, corpus.scenes, {b["scene"] for b in corpus.skipped}, corpus.meta,
                                  first=len(scene_list))
        manifest["geo"] = {**parent.manifest["geo"], "scene_list": scene_list,
                           "scenes": parent.manifest["geo"].get("scenes", len(listed)) + _scenes_read(corpus),
                           "tiles_nodata": parent.manifest["geo"].get("tiles_nodata", 0) + corpus.nodata_tiles}
    ann_index = None
    if parent_ann is not None:
        if corpus.codes is not None:  # encoded by the embedding actors under the parent's cells
            from harma.index.ann import append_codes

            ann_index = append_codes(parent_ann, corpus.codes, progress)
        else:
            ann_index = added_ann(parent_ann, new.vectors)
        manifest["ann"] = {**parent.manifest["ann"], "added_since_training":
                           parent.manifest["ann"].get("added_since_training", 0) + len(new.vectors)}
    _write(uri, manifest, rows, ann_index, progress)
    return manifest


def delete_from_index(index_uri: str, ids: list[str] = (), scenes: list[str] = (), missing_ok: bool = False,
                      progress=log.info) -> dict[str, Any]:
    """Write the next version of the index at `index_uri` without the images `ids` and the tiles of
    `scenes` (no Ray, no model); returns its manifest."""
    started = time.perf_counter()
    ids, scenes = [str(i) for i in ids], [str(s) for s in scenes]
    if not ids and not scenes:
        raise ValueError("name what to delete: --ids, --ids-file or --scene")
    parent_uri, parent, parent_ann = _parent(index_uri)
    drop = drop_flags(parent.images["id"], parent.images.get("scene"), ids, scenes, missing_ok)
    root = root_of(parent_uri, parent.manifest)
    number, uri = next_version(root)
    rows = kept(_rows_of(parent), drop)
    change = {"kind": "delete", "deleted": int(drop.sum()), "ids": ids[:1000], "scenes": scenes,
              "deleted_captions": parent.caption_count - (0 if rows.caption_emb is None else len(rows.caption_emb))}
    manifest = _manifest(parent_uri, parent.manifest, number, rows, change, started)
    if parent.has_footprints:
        remaining = set(rows.images["scene"])
        listed = [s for s in parent.manifest["geo"].get("scene_list", []) if s["scene"] in remaining]
        manifest["geo"] = {**parent.manifest["geo"], "scene_list": _copy_quicklooks(parent_uri, uri, listed),
                           "scenes": len(listed)}
    ann_index = None
    if parent_ann is not None:
        from harma.index.ann import AnnParams

        ann_index = kept_ann(parent_ann, AnnParams.from_manifest(parent.manifest["ann"]), rows.vectors, progress)
    progress(f"deleting {change['deleted']} of {parent.size} images from version "
             f"{parent.manifest.get('version', 1)} of {root}")
    _write(uri, manifest, rows, ann_index, progress)
    return manifest
