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
A sharded index is updated shard by shard: only the shards that gain or lose images are read whole
and written again (`Part`: the others' id columns alone are read), new images fill the shards with
room first, then new shards (harma.index.shards.place_new_rows).

Where versions live and how serving moves between them: harma.index.versions.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from harma import storage
from harma.index.shards import is_sharded
from harma.index.versions import VERSIONS, next_version, root_of
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


def sliced(rows: Rows, first: int, end: int) -> Rows:
    """Images `first`..`end - 1` of `rows` with their captions (pointing at their new rows)."""
    drop = np.ones(len(rows.vectors), dtype=bool)
    drop[first:end] = False
    return kept(rows, drop)


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
class Part:
    """One index an update reads: a whole index, or one shard of a sharded one. Its id (and scene)
    columns are read alone; its vectors, captions and FAISS index only when it changes."""

    def __init__(self, uri: str):
        from harma.serve.index import read_manifest

        self.uri = uri
        self.manifest = read_manifest(uri)

    @property
    def size(self) -> int:
        return int(self.manifest["images"])

    def column(self, name: str) -> list:
        return storage.read_table(storage.join(self.uri, "images.parquet"), [name]).column(name).to_pylist()

    @functools.cached_property
    def index(self) -> EmbeddingIndex:
        return load_index(self.uri)

    @functools.cached_property
    def ann(self):
        """A copy of its FAISS index to change (the served one maps its file read-only), or None."""
        if (self.manifest.get("ann") or {}).get("kind", "exact") == "exact":
            return None
        import faiss

        from harma.serve.index import index_file

        return faiss.read_index(index_file(self.uri, self.manifest, "images.ann"))

    def rows(self) -> Rows:
        index = self.index
        return Rows(np.asarray(index.image_emb, np.float32), index.images, index.caption_emb, index.captions)


def _parent(uri: str) -> tuple[str, dict, list[Part]]:
    """(absolute URI, manifest, parts: the index itself, or its shards by position) of the version
    an update starts from, checked against its checkpoint as it is stored now."""
    from harma.index.shards import shard_location
    from harma.serve.index import read_manifest

    uri = storage.absolute(uri)
    manifest = read_manifest(uri)
    check_index_matches(manifest, manifest["checkpoint_uri"], checkpoint_fingerprint(manifest["checkpoint_uri"]))
    if not is_sharded(manifest):
        return uri, manifest, [Part(uri)]
    return uri, manifest, [Part(shard_location(uri, manifest, p)) for p in range(len(manifest["shards"]))]


def _manifest(parent_uri: str, parent: dict, number: int, images: int, captions: int, change: dict,
              started: float) -> dict:
    return {**parent, "version": number, "parent": parent_uri, "root_uri": root_of(parent_uri, parent),
            "images": images, "captions": captions, "change": change,
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(time.perf_counter() - started, 2)}


def _caption_count(rows: Rows) -> int:
    return 0 if rows.caption_emb is None else len(rows.caption_emb)


def _write(uri: str, manifest: dict, rows: Rows, ann_index, progress) -> None:
    save_index(uri, EmbeddingIndex(manifest, rows.vectors, rows.images, rows.caption_emb, rows.captions), ann_index)
    progress(f"index version {manifest['version']} written to {uri}: {manifest['images']} images, "
             f"{manifest['captions']} captions ({manifest['build_seconds']:.1f} s)")


def _write_root(uri: str, manifest: dict, progress) -> None:
    """A sharded version's root manifest, written after its shards (a reader never sees half a version)."""
    from harma.serve.index import write_manifest

    write_manifest(uri, manifest)
    progress(f"index version {manifest['version']} written to {uri}: {manifest['images']} images, "
             f"{manifest['captions']} captions in {len(manifest['shards'])} shards "
             f"({manifest['build_seconds']:.1f} s)")


def _write_shard(root: str, number: int, position: int, template: dict, rows: Rows, ann_index) -> dict:
    """Shard `position` of version `number` (under the version's folder), with `template`'s (its
    parent shard's) manifest; returns its entry in the root manifest (uri relative to `root`)."""
    from harma.index.shards import shard_name

    relative = f"{VERSIONS}/{number:05d}/{shard_name(position)}"
    manifest = {**template, "version": number, "images": len(rows.vectors), "captions": _caption_count(rows),
                "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "shard": {"position": position}}  # the root manifest's list says the rest
    save_index(storage.join(root, relative), EmbeddingIndex(manifest, rows.vectors, rows.images, rows.caption_emb,
                                                            rows.captions), ann_index)
    return {"uri": relative, "images": manifest["images"], "captions": manifest["captions"]}


def _numbered(entries: list[dict]) -> list[dict]:
    """Shard entries with their `first_row` (the images before them) recounted."""
    first, out = 0, []
    for entry in entries:
        out.append({**entry, "first_row": first})
        first += int(entry["images"])
    return out


def _copy_quicklooks(parent_uri: str, uri: str, scene_list: list[dict]) -> list[dict]:
    """The parent's scene overviews copied into the new version, renumbered by their new positions."""
    from harma.serve.build import quicklook_name

    listed = []
    for position, scene in enumerate(scene_list):
        name = quicklook_name(position)
        storage.write_bytes(storage.join(uri, name), storage.read_bytes(storage.join(parent_uri, scene["quicklook"])))
        listed.append({**scene, "quicklook": name})
    return listed


def _added_ann(part_ann, new: Rows, codes: np.ndarray | None, progress):
    """`part_ann` (a copy) with the new vectors appended: as the embedding actors' codes under its
    cells when they made them, else the vectors added; None for an exact index."""
    if part_ann is None:
        return None
    if codes is not None:
        from harma.index.ann import append_codes

        return append_codes(part_ann, codes, progress)
    return added_ann(part_ann, new.vectors)


def _new_ann(parts: list[Part], manifest: dict, new: Rows, codes: np.ndarray | None, progress):
    """The FAISS index of a new shard holding only `new`: the index's trained cells (an empty copy
    of a shard's) filled, or an HNSW graph built; None for an exact index."""
    kind = (manifest.get("ann") or {}).get("kind", "exact")
    if kind == "exact":
        return None
    from harma.index.ann import AnnParams, build_ann

    if kind == "hnsw":
        return build_ann(new.vectors, AnnParams.from_manifest(parts[-1].manifest["ann"]), progress=progress)
    return _added_ann(_codec_of(parts[-1].ann, manifest), new, codes, progress)




def _added_shards(parts: list[Part], manifest: dict, root: str, number: int, new: Rows, codes: np.ndarray | None,
                  progress) -> list[dict]:
    """The new version's shard entries: the new images placed into the shards with room (each
    rewritten with them), the rest as new shards of at most `shard_images_max`; the other shards
    listed as they are."""
    from harma.index.shards import place_new_rows

    capacity = manifest.get("shard_images_max")
    taken, left = place_new_rows([p.size for p in parts], capacity, len(new.vectors))
    entries, first = [], 0
    for position, (part, count) in enumerate(zip(parts, taken, strict=True)):
        if not count:
            entries.append(manifest["shards"][position])
            continue
        batch = sliced(new, first, first + count)
        batch_codes = None if codes is None else codes[first:first + count]
        entries.append(_write_shard(root, number, position, part.manifest, appended(part.rows(), batch),
                                    _added_ann(part.ann, batch, batch_codes, progress)))
        progress(f"  shard {position + 1}/{len(parts)}: +{count} images -> {entries[-1]['images']}")
        first += count
    if left:  # no shard has room: new shards, near-equal, each within the bound
        from harma.index.shards import plan_shards

        for start, end in plan_shards(left, 1.0, capacity):
            batch = sliced(new, first + start, first + end)
            batch_codes = None if codes is None else codes[first + start:first + end]
            position = len(entries)
            entries.append(_write_shard(root, number, position, parts[-1].manifest, batch,
                                        _new_ann(parts, manifest, batch, batch_codes, progress)))
            progress(f"  shard {position + 1} (new): {end - start} images; serving this version needs the application "
                     f"deployed again (its shard count changed)")
    return _numbered(entries)


def _kept_shards(parts: list[Part], manifest: dict, root: str, number: int, drop: np.ndarray,
                 progress) -> list[dict]:
    """The new version's shard entries: each shard that loses images rewritten without them (one
    that loses all of them left out), the others listed as they are."""
    from harma.index.ann import AnnParams

    entries, first = [], 0
    for position, part in enumerate(parts):
        flags = drop[first:first + part.size]
        first += part.size
        if not flags.any():
            entries.append(manifest["shards"][position])
        elif flags.all():
            progress(f"  shard {position + 1}/{len(parts)}: all {part.size} images deleted, the shard is left out; serving this "
                     f"version needs the application deployed again (its shard count changed)")
        else:
            rows = kept(part.rows(), flags)
            ann_index = None if part.ann is None else \
                kept_ann(part.ann, AnnParams.from_manifest(part.manifest["ann"]), rows.vectors, progress)
            entries.append(_write_shard(root, number, len(entries), part.manifest, rows, ann_index))
            progress(f"  shard {position + 1}/{len(parts)}: -{int(flags.sum())} images -> {entries[-1]['images']}")
    return _numbered(entries)


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
    parent_uri, parent, parts = _parent(index_uri)
    sharded = is_sharded(parent)
    root = root_of(parent_uri, parent)
    number, uri = next_version(root)
    cfg = _prepare(add_config(parent, uri, dict(settings or {})))
    geo = cfg.corpus_format == "geotiff"
    if geo:
        listed = (parent.get("geo") or {}).get("scene_list", [])
        skip = frozenset(s for p in parts for s in p.column("scene")) | {s["scene"] for s in listed}
    else:
        skip = frozenset(i for p in parts for i in p.column("id")) | {str(s) for s in parent.get("skipped", [])}
    size = sum(p.size for p in parts)
    progress(f"adding to version {parent.get('version', 1)} of {root} ({size} images"
             f"{f' in {len(parts)} shards' if sharded else ''}): new items of {cfg.corpus_uri}")
    codec = _codec_of(parts[-1].ann, parent)
    corpus = embed_corpus(cfg, progress, skip=skip, codec=codec)
    new = Rows(corpus.image_emb, corpus.meta, corpus.caption_emb, corpus.captions)
    change = {"kind": "add", "corpus_uri": cfg.corpus_uri, "added": len(new.vectors),
              "added_captions": _caption_count(new), "skipped": corpus.skipped,
              "embed_seconds": round(time.perf_counter() - started, 2)}
    if sharded:
        entries = _added_shards(parts, parent, root, number, new, corpus.codes, progress)
        change["shards"] = [len(parts), len(entries)]
        manifest = _manifest(parent_uri, parent, number, size + len(new.vectors),
                             int(parent.get("captions", 0)) + _caption_count(new), change, started)
        manifest["shards"] = entries
    else:
        rows = appended(parts[0].rows(), new)
        ann_index = _added_ann(parts[0].ann, new, corpus.codes, progress)
        manifest = _manifest(parent_uri, parent, number, len(rows.vectors), _caption_count(rows), change, started)
    if not geo:
        manifest["skipped"] = list(parent.get("skipped", [])) + corpus.skipped
    else:
        scene_list = _copy_quicklooks(parent_uri, uri, listed)
        scene_list += _quicklooks(cfg, corpus.scenes, {b["scene"] for b in corpus.skipped}, corpus.meta,
                                  first=len(scene_list))
        manifest["geo"] = {**parent["geo"], "scene_list": scene_list,
                           "scenes": parent["geo"].get("scenes", len(listed)) + _scenes_read(corpus),
                           "tiles_nodata": parent["geo"].get("tiles_nodata", 0) + corpus.nodata_tiles}
    if (parent.get("ann") or {}).get("kind", "exact") != "exact":
        manifest["ann"] = {**parent["ann"], "added_since_training":
                           parent["ann"].get("added_since_training", 0) + len(new.vectors)}
    if sharded:
        _write_root(uri, manifest, progress)
    else:
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
    parent_uri, parent, parts = _parent(index_uri)
    sharded = is_sharded(parent)
    geo = parent.get("corpus_format") == "geotiff"
    index_ids = [i for p in parts for i in p.column("id")]
    row_scenes = [s for p in parts for s in p.column("scene")] if geo else None
    drop = drop_flags(index_ids, row_scenes, ids, scenes, missing_ok)
    root = root_of(parent_uri, parent)
    number, uri = next_version(root)
    progress(f"deleting {int(drop.sum())} of {len(drop)} images from version {parent.get('version', 1)} of {root}")
    if sharded:
        entries = _kept_shards(parts, parent, root, number, drop, progress)
        images, captions = sum(e["images"] for e in entries), sum(e["captions"] for e in entries)
    else:
        rows = kept(parts[0].rows(), drop)
        images, captions = len(rows.vectors), _caption_count(rows)
    change = {"kind": "delete", "deleted": int(drop.sum()), "ids": ids[:1000], "scenes": scenes,
              "deleted_captions": int(parent.get("captions", 0)) - captions,
              **({"shards": [len(parts), len(entries)]} if sharded else {})}
    manifest = _manifest(parent_uri, parent, number, images, captions, change, started)
    if geo:
        remaining = {s for s, gone in zip(row_scenes, drop, strict=True) if not gone}
        listed = [s for s in parent["geo"].get("scene_list", []) if s["scene"] in remaining]
        manifest["geo"] = {**parent["geo"], "scene_list": _copy_quicklooks(parent_uri, uri, listed),
                           "scenes": len(listed)}
    if sharded:
        manifest["shards"] = entries
        _write_root(uri, manifest, progress)
        return manifest
    ann_index = None
    if parts[0].ann is not None:
        from harma.index.ann import AnnParams

        ann_index = kept_ann(parts[0].ann, AnnParams.from_manifest(parent["ann"]), rows.vectors, progress)
    _write(uri, manifest, rows, ann_index, progress)
    return manifest
