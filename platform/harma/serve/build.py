"""`harma index build`: embed an image corpus with Ray Data batch inference and write the index.

    harma index build --config jobs/index_synth.yaml [index.checkpoint_uri=...]

The corpus is read where it lives (prepared Parquet shards or a folder of image files, local or
s3://) and streamed through a pool of embedding actors, each loading the checkpoint once (on a GPU
each when `index.use_gpu`). Captions of a prepared corpus are embedded the same way for
image -> text search. The driver gathers embeddings and metadata (a few hundred bytes per image)
and writes the index with a manifest naming the checkpoint and its fingerprint
(`harma.serve.index`). Undecodable images are skipped and listed in the manifest.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

import ray
from harma import storage
from harma.config import IndexConfig
from harma.serve.index import FORMAT, EmbeddingIndex, checkpoint_fingerprint, save_index

log = logging.getLogger(__name__)

READ_CPUS = 0.25  # CPU request of the corpus readers (file reads only: decoding is in the actors)
# Ray Data starts a pool's actors asynchronously and hands blocks to whichever is up: a small corpus
# was all embedded by the first actor while the others loaded the model. The build waits for the
# whole pool instead, and a cluster that cannot give it the resources fails with a clear message.
POOL_START_TIMEOUT_S = 600


def _thumbnail(img, size: int) -> bytes:
    """JPEG bytes of a copy of PIL image `img` fitted into size x size."""
    img = img.copy()
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


class ImageEmbedder:
    """Ray Data actor: image rows -> embeddings (+ thumbnails); undecodable rows flagged."""

    def __init__(self, checkpoint_uri: str, device: str, thumbnail_size: int, trace: bool = True,
                 precision: str = "validated", codec: Any = None):
        from harma.serve.encoder import ModelThread, QueryEncoder

        self.model_thread = ModelThread()  # __call__ runs on another thread than __init__
        self.encoder = self.model_thread.call(QueryEncoder, checkpoint_uri, device, trace, precision, ("image",))
        self.thumbnail_size = thumbnail_size
        self.actor_id = ray.get_runtime_context().get_actor_id()  # the build reports how many embedded
        self.codec = None  # a trained, empty IVF index (its bytes, or their object ref): rows get their codes
        if codec is not None:
            from harma.index.ann import ann_from_bytes

            self.codec = ann_from_bytes(ray.get(codec) if isinstance(codec, ray.ObjectRef) else codec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "pixels" in batch:
            return self._embed_tiles(batch)
        from harma.data.transforms import eval_uint8
        from harma.serve.encoder import UnreadableImageError, open_query_image

        pixels, ok, thumbs = [], [], []
        for data in batch["image"]:
            try:
                img = open_query_image(bytes(data))  # decoded once for the pixels and the thumbnail
                pixels.append(eval_uint8(img, self.encoder.image_size))
                thumbs.append(_thumbnail(img, self.thumbnail_size) if self.thumbnail_size else b"")
                ok.append(True)
            except UnreadableImageError:
                ok.append(False)
                thumbs.append(b"")
        dim = self.encoder.embed_dim
        ok = np.array(ok, dtype=bool)
        emb = np.zeros((len(ok), dim), np.float32)
        if pixels:
            emb[ok] = self.model_thread.call(self._embed_pixels, np.stack(pixels))
        out = {k: v for k, v in batch.items() if k != "image"}
        out.update(embedding=emb, ok=ok, thumbnail=np.array(thumbs, dtype=object),
                   embedder=np.full(len(ok), self.actor_id, dtype=object))
        return self._with_codes(out)

    def _embed_tiles(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Scene tiles (harma.geo.corpus rows: model-sized uint8 pixels, a status each)."""
        from PIL import Image

        ok = np.array([s == "ok" for s in batch["status"]], dtype=bool)
        pixels = batch["pixels"]
        if pixels.shape[-1] != self.encoder.image_size:
            raise ValueError(f"tiles of {pixels.shape[-1]} px for a model of {self.encoder.image_size} px")
        emb = np.zeros((len(ok), self.encoder.embed_dim), np.float32)
        if ok.all():  # the usual case: the block's pixels as they are (a boolean index would copy them)
            emb[:] = self.model_thread.call(self._embed_pixels, pixels)
        elif ok.any():
            emb[ok] = self.model_thread.call(self._embed_pixels, np.ascontiguousarray(pixels[ok]))
        thumbs = [_thumbnail(Image.fromarray(p.transpose(1, 2, 0)), self.thumbnail_size)
                  if good and self.thumbnail_size else b"" for p, good in zip(pixels, ok, strict=True)]
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out.update(embedding=emb, ok=ok, thumbnail=np.array(thumbs, dtype=object),
                   embedder=np.full(len(ok), self.actor_id, dtype=object))
        return self._with_codes(out)

    def _with_codes(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`out` with `ann_code`: each embedded row's IVF cell and code under the codec (zeros for a
        row not embedded), so the driver appends bytes instead of encoding the corpus itself."""
        if self.codec is not None:
            from harma.index.ann import encode

            codes = np.zeros((len(out["ok"]), self.codec.sa_code_size()), np.uint8)
            codes[out["ok"]] = encode(self.codec, out["embedding"][out["ok"]])
            out["ann_code"] = codes
        return out

    def _embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return self.encoder.encode_pixels(pixels).cpu().numpy()


class TextEmbedder:
    """Ray Data actor: caption rows -> embeddings."""

    def __init__(self, checkpoint_uri: str, device: str, trace: bool = True, precision: str = "validated"):
        from harma.serve.encoder import ModelThread, QueryEncoder

        self.model_thread = ModelThread()
        self.encoder = self.model_thread.call(QueryEncoder, checkpoint_uri, device, trace, precision, ("text",))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        emb = self.model_thread.call(self._embed_texts, [str(c) for c in batch["caption"]])
        return {**batch, "embedding": emb}

    def _embed_texts(self, captions: list[str]) -> np.ndarray:
        return self.encoder.encode_texts(captions).cpu().numpy()


def _prepared_files(cfg: IndexConfig) -> list[str]:
    from harma.data.prepared import split_files

    return [f for split in cfg.splits for f in split_files(cfg.corpus_uri, split)]


def _parquet_rows(files: list[str]) -> int:
    """Rows of Parquet files from their footers only."""
    import pyarrow.parquet as pq

    total = 0
    for uri in files:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


class NothingNewError(ValueError):
    """`harma index add` found no item of the corpus that the index lacks."""


def _relative(path: str, root: str) -> str:
    """An image file's id: its path under the corpus folder."""
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path


SAMPLE_SEED = 0  # the corpus sample an IVF index is trained on is the same on every run
# An IVF index's cells are trained on a sample streamed through the embedding actors before the
# whole corpus is embedded: SAMPLE_MARGIN x train_rows drawn (a Bernoulli draw, and some items may
# not decode), and only while that sample is at most 1 / SAMPLE_AT_MOST of the corpus; a smaller
# corpus is embedded once and its cells trained on the driver from the embedded vectors.
SAMPLE_MARGIN = 1.25
SAMPLE_AT_MOST = 2
GEO_COLUMNS = ("scene", "datetime", "window", "geometry", "centre_lon", "centre_lat", "gsd")


def _image_dataset(cfg: IndexConfig, image_size: int, skip: frozenset[str] = frozenset(),
                   sample_fraction: float | None = None) -> tuple[ray.data.Dataset, int | None, dict]:
    """(dataset of image rows with image (or pixels), id, source, image_id, split, label; number of
    images when known beforehand; the scenes of a geotiff corpus: {"scenes": [...], "bad": [...]}).
    Items in `skip` (image ids; scene ids of a geotiff corpus) are left out, before their pixels are
    read where the corpus lists them (files, scenes), as they are read from prepared shards. With
    `sample_fraction`, a seeded random share of the items (drawn from the file list or each
    scene's tiles before reading; from the rows of prepared shards as they stream)."""
    if cfg.corpus_format == "geotiff":
        from harma.geo.corpus import list_scenes, tile_dataset

        scenes, bad = list_scenes(cfg.corpus_uri)
        if skip:
            scenes = [s for s in scenes if s["scene"] not in skip]
            bad = [b for b in bad if b.get("scene") not in skip]
            if not scenes:
                raise NothingNewError(f"{cfg.corpus_uri}: every scene is already in the index")
        if not scenes:
            raise ValueError(f"{cfg.corpus_uri}: no readable scene ({'; '.join(b['reason'] for b in bad[:3])})")
        return (tile_dataset(scenes, cfg.geo.model_dump(), image_size, sample_fraction), None,
                {"scenes": scenes, "bad": bad})
    if cfg.corpus_format == "prepared":
        files = _prepared_files(cfg)
        fs, _ = storage.resolve(files[0])
        ds = ray.data.read_parquet([storage.resolve(f)[1] for f in files], filesystem=fs, num_cpus=READ_CPUS,
                                   columns=["image", "image_key", "image_id", "split", "label"])
        total = _parquet_rows(files)
        if skip:  # the keys alone (no image bytes read) say how many are new
            keys = [k for f in files for k in storage.read_table(f, columns=["image_key"]).column(0).to_pylist()]
            total = sum(1 for k in keys if str(k) not in skip)
            if not total:
                raise NothingNewError(f"{cfg.corpus_uri}: every image of splits {cfg.splits} is already in the index")

        def rename(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            keys = batch.pop("image_key")  # the image's path under the source image folder
            if skip:
                new = np.array([str(k) not in skip for k in keys], dtype=bool)
                batch, keys = {c: v[new] for c, v in batch.items()}, keys[new]
            return {**batch, "id": keys, "source": keys}

        ds = ds.map_batches(rename, batch_format="numpy", num_cpus=0.1)
        if sample_fraction is not None and sample_fraction < 1:
            ds = ds.random_sample(sample_fraction, seed=SAMPLE_SEED)
        return ds, total, {}
    extensions = tuple(e.lower() for e in cfg.image_extensions)
    files = [f for f in storage.list_files(cfg.corpus_uri) if f.lower().endswith(extensions)]
    if not files:
        raise FileNotFoundError(f"{cfg.corpus_uri}: no image files ({', '.join(extensions)})")
    fs, root = storage.resolve(cfg.corpus_uri)
    if skip:
        files = [f for f in files if _relative(storage.resolve(f)[1], root) not in skip]
        if not files:
            raise NothingNewError(f"{cfg.corpus_uri}: every image file is already in the index")
    if sample_fraction is not None and sample_fraction < 1:
        rng = np.random.default_rng(SAMPLE_SEED)
        files = [f for f, u in zip(files, rng.random(len(files)), strict=True) if u < sample_fraction]
    ds = ray.data.read_binary_files([storage.resolve(f)[1] for f in files], filesystem=fs,
                                    include_paths=True, num_cpus=READ_CPUS)

    def to_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rel = np.array([_relative(str(p), root) for p in batch["path"]], dtype=object)
        n = len(rel)
        return {"image": batch["bytes"], "id": rel, "source": rel,
                "image_id": np.full(n, -1, np.int64), "split": np.array([""] * n, dtype=object),
                "label": np.array([None] * n, dtype=object)}

    return ds.map_batches(to_rows, batch_format="numpy", num_cpus=0.1), len(files), {}


def _caption_dataset(cfg: IndexConfig) -> ray.data.Dataset:
    files = _prepared_files(cfg)
    fs, _ = storage.resolve(files[0])
    ds = ray.data.read_parquet([storage.resolve(f)[1] for f in files], filesystem=fs, num_cpus=READ_CPUS,
                               columns=["image_key", "captions"])
    return ds.flat_map(lambda row: [{"caption": str(c), "image": row["image_key"]} for c in row["captions"]],
                       num_cpus=0.1)


def _actor_options(cfg: IndexConfig) -> dict[str, Any]:
    return {"compute": ray.data.ActorPoolStrategy(size=cfg.actors), "num_cpus": cfg.cpus_per_actor,
            "num_gpus": 1 if cfg.use_gpu else 0, "batch_size": cfg.batch_size, "batch_format": "numpy"}


def _batches_of_whole_pool(ds: ray.data.Dataset, cfg: IndexConfig) -> Iterator[dict[str, np.ndarray]]:
    """`ds`'s output blocks as numpy batches, computed once all `cfg.actors` actors are up."""
    ds.context.wait_for_min_actors_s = POOL_START_TIMEOUT_S  # this dataset's own copy of the context
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except ray.exceptions.GetTimeoutError as err:
        gpus = f", {cfg.actors} GPU(s)" if cfg.use_gpu else ""
        raise RuntimeError(
            f"the {cfg.actors} embedding actor(s) did not all start within {POOL_START_TIMEOUT_S} s: the "
            f"cluster lacks the resources ({cfg.actors} x {cfg.cpus_per_actor} CPU{gpus}); lower index.actors "
            f"or index.cpus_per_actor, or add nodes") from err


PRECISION_SAMPLE_IMAGES = 2000  # images (with their captions) the bf16 cost is measured on


def _ann_params(cfg: IndexConfig, corpus: EmbeddedCorpus):
    """The AnnParams of the index: those its codes were made for, else `index.ann` planned for the
    embedded gallery."""
    from harma.index.ann import AnnParams, plan_ann

    if corpus.ann is not None:
        return AnnParams.from_manifest(corpus.ann)
    return plan_ann(cfg.ann, len(corpus.image_emb), corpus.image_emb.shape[1], cfg.ann_params.memory_budget_bytes,
                    **cfg.ann_params.model_dump(exclude={"memory_budget_bytes", "target_recall"}))


def _approximate(cfg: IndexConfig, corpus: EmbeddedCorpus, slices: list[tuple[int, int]], manifest: dict,
                 progress) -> list[Any]:
    """The FAISS index of `index.ann` over each slice of the gallery (one slice: the whole; None each
    for exact); its parameters, and how it was trained and encoded, go to `manifest["ann"]`. An IVF
    index's slices share one trained codec (the same cells): the actors' codes appended, or, for a
    corpus embedded without them, codes made here after training on the embedded vectors."""
    import faiss

    from harma.index.ann import add_vectors, build_ann, encoded_by_codes, filled, trained_codec

    params = _ann_params(cfg, corpus)
    manifest["ann"] = params.to_manifest()
    if params.kind == "exact":
        return [None] * len(slices)
    started = time.perf_counter()
    vectors = corpus.image_emb
    if not encoded_by_codes(params.kind):
        parts = [build_ann(vectors[first:end], params, progress=progress) for first, end in slices]
    else:
        codec, codes = corpus.codec, corpus.codes
        if codes is None:  # trained here; each slice's vectors added to its copy a chunk at a time
            codec = trained_codec(vectors, params, seed=SAMPLE_SEED, progress=progress)
            parts = [add_vectors(faiss.clone_index(codec), vectors[first:end], progress, label=f"ANN {params.kind}")
                     for first, end in slices]
            manifest["ann"].update(trained_on="embedded corpus", trained_rows=min(len(vectors), params.train_rows),
                                   encoded_by="driver")
        else:
            manifest["ann"].update(corpus.ann or {"trained_on": "index version", "encoded_by": "embedding actors"})
            parts = [filled(codec, codes[first:end], progress) for first, end in slices]
    manifest["ann"]["build_seconds"] = round(time.perf_counter() - started, 2)
    progress(f"  ANN {params.kind} over {len(vectors)} images in {manifest['ann']['build_seconds']} s"
             f"{' (codes from the embedding actors)' if corpus.codes is not None else ''}")
    if cfg.ann_params.target_recall is not None:
        _tune(cfg, corpus, parts[0], vectors[slices[0][0]:slices[0][1]], params, manifest, progress)
    return parts


TUNE_QUERIES = 200


def _tune(cfg: IndexConfig, corpus: EmbeddedCorpus, part, vectors: np.ndarray, params, manifest: dict,
          progress) -> None:
    """The search knob of the first slice's ANN index tuned to `ann_params.target_recall`
    (harma.index.ann.tune_search) on up to TUNE_QUERIES caption embeddings (text -> image, as users
    search), else image embeddings, drawn with a fixed seed; recorded in `manifest["ann"]`."""
    from harma.index.ann import tune_search

    rng = np.random.default_rng(SAMPLE_SEED)
    captions = corpus.caption_emb is not None and len(corpus.caption_emb) > 0
    pool = corpus.caption_emb if captions else vectors
    queries = np.asarray(pool[np.sort(rng.choice(len(pool), min(TUNE_QUERIES, len(pool)), replace=False))],
                         np.float32)
    started = time.perf_counter()
    tuned, record = tune_search(part, vectors, params, queries, cfg.ann_params.target_recall)
    record.update(query_source="captions" if captions else "images", seconds=round(time.perf_counter() - started, 2))
    manifest["ann"].update(tuned.to_manifest(), tuned=record)
    progress(f"  ANN search tuned: {record['knob']} {record['planned']} -> {record['chosen']}, recall@10 "
             f"{record['recall_at_10']:.3f} on {record['queries']} {record['query_source'][:-1]} queries (target "
             f"{record['target_recall']}{'' if record['met'] else ': NOT met at the largest value tried'}, "
             f"{record['seconds']} s)")


def precision_record(cfg: IndexConfig, image_emb: np.ndarray, caption_emb: np.ndarray | None,
                     captions: dict | None, meta: dict, progress=log.info) -> dict[str, Any]:
    """The index's numerics, and for an index of bf16 weights what they cost against the numerics
    that validated the checkpoint: mR of each on the indexed images and captions (up to
    `PRECISION_SAMPLE_IMAGES` images, re-embedded on this process's CPU with the validated model)
    and the mean share of each caption's top-10 images (top_k: fewer in a smaller index) both find."""
    from harma.model.checkpoint import read_numerics

    validated = read_numerics(cfg.checkpoint_uri)["validated_in"]
    weights = validated if cfg.precision == "validated" else cfg.precision
    record: dict[str, Any] = {"weights": weights, "validated_in": validated, "cost": None}
    if weights == validated or caption_emb is None or not len(caption_emb):
        return record
    from harma.eval import retrieval_metrics
    from harma.serve.encoder import QueryEncoder

    n = min(len(image_emb), PRECISION_SAMPLE_IMAGES)
    rows = np.array(captions["image_row"])
    take = np.flatnonzero(rows < n)
    progress(f"  measuring {weights} against {validated} on {n} images, {len(take)} captions")
    reference = QueryEncoder(cfg.checkpoint_uri, "cpu", trace=False, precision=validated)
    ref_images = _embed_index_images(reference, cfg, meta["id"][:n])
    ref_texts = reference.encode_texts([captions["caption"][i] for i in take]).cpu().numpy()
    low_sim = image_emb[:n] @ caption_emb[take].T
    ref_sim = ref_images @ ref_texts.T
    k = min(10, n)
    top_low = np.argsort(-low_sim.T, axis=1, kind="stable")[:, :k]
    top_ref = np.argsort(-ref_sim.T, axis=1, kind="stable")[:, :k]
    overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top_low, top_ref, strict=True)]))
    mr_low = retrieval_metrics(low_sim, rows[take])["mr"]
    mr_ref = retrieval_metrics(ref_sim, rows[take])["mr"]
    record["cost"] = {"images": int(n), "captions": int(len(take)), f"mr_{validated}": mr_ref,
                      f"mr_{weights}": mr_low, "mr_difference": mr_low - mr_ref, "top_k": k, "top_k_overlap": overlap}
    progress(f"  {weights} weights: mR {mr_low:.2f} against {mr_ref:.2f} in {validated}; top-{k} overlap "
             f"{overlap:.3f}")
    return record


def _embed_index_images(encoder, cfg: IndexConfig, ids: list[str]) -> np.ndarray:
    """The indexed images `ids` (prepared corpus image keys) embedded by `encoder`, in that order."""
    from harma.data.transforms import decode_image, eval_uint8

    want = {k: i for i, k in enumerate(ids)}
    pixels: list = [None] * len(ids)
    for uri in _prepared_files(cfg):
        table = storage.read_table(uri, columns=["image_key", "image"])
        for key, data in zip(table.column("image_key").to_pylist(), table.column("image").to_pylist(),
                             strict=True):
            if key in want:
                pixels[want[key]] = eval_uint8(decode_image(data), encoder.image_size)
    return np.concatenate([encoder.encode_pixels(np.stack(pixels[i:i + 64])).cpu().numpy()
                           for i in range(0, len(pixels), 64)])


def quicklook_name(position: int) -> str:
    return f"quicklooks/{position:05d}.png"


QUICKLOOK_PIXELS = 512  # long side of a scene's overview image in a scene index


def _quicklooks(cfg: IndexConfig, scenes: list[dict], bad: set[str], meta: dict, first: int = 0) -> list[dict]:
    """Each indexed scene's overview PNG written under `<index>/quicklooks/` (one Ray task per
    scene, reading the COG's overviews), and the scene list the manifest keeps: id, time, size,
    corners, the overview's file (named by position from `first`, never by the scene id)."""
    from harma.geo.radiometry import PRESETS
    from harma.geo.reader import make_quicklook

    times = dict(zip(meta["scene"], meta["datetime"], strict=True))
    wanted = [s for s in scenes if s["scene"] not in bad and s["scene"] in times]
    task = ray.remote(num_cpus=READ_CPUS)(make_quicklook)
    looks = ray.get([task.remote(s["uri"], PRESETS[cfg.geo.preset], QUICKLOOK_PIXELS) for s in wanted])
    listed = []
    for i, (scene, look) in enumerate(zip(wanted, looks, strict=True), start=first):
        name = quicklook_name(i)
        storage.write_bytes(storage.join(cfg.output_uri, name), look.pop("png"))
        listed.append({"scene": scene["scene"], "datetime": times[scene["scene"]], "quicklook": name, **look})
    return listed


def _check_bad_scenes(bad: list[dict], scenes: int, max_fraction: float, corpus_uri: str) -> None:
    if scenes and len(bad) / scenes > max_fraction:
        listed = "; ".join(f"{b['uri']}: {b['reason']}" for b in bad[:5])
        raise ValueError(f"{corpus_uri}: {len(bad)} of {scenes} scenes unreadable, above index.geo.max_bad_fraction "
                         f"{max_fraction} (nothing was written): {listed}")


@dataclass
class EmbeddedCorpus:
    """A corpus embedded by `embed_corpus`: what an index version is written from."""

    image_emb: np.ndarray  # (N, D) float32
    meta: dict[str, list]  # image columns (id, source, image_id, split, label, thumbnail [, geo])
    caption_emb: np.ndarray | None
    captions: dict[str, list] | None  # caption, image, image_row (rows of `meta`)
    skipped: list  # undecodable image ids; a geotiff corpus: unreadable scenes ({uri, scene, reason})
    scenes: list[dict]  # a geotiff corpus: the scenes read (harma.geo.corpus.list_scenes)
    nodata_tiles: int = 0
    codes: np.ndarray | None = None  # (N, code size) uint8: the actors' IVF codes of image_emb's rows
    codec: Any = None  # the trained, empty FAISS index they were encoded under
    ann: dict | None = None  # AnnParams (as in a manifest) and how the codec was trained, with `codes`


def _prepare(cfg: IndexConfig) -> IndexConfig:
    """Absolute URIs (Ray Data actors run in another working directory), storage checked, Ray Data quiet."""
    cfg = cfg.model_copy(update={k: storage.absolute(getattr(cfg, k))
                                 for k in ("checkpoint_uri", "corpus_uri", "output_uri")})
    storage.preflight(cfg.checkpoint_uri)
    storage.preflight(cfg.corpus_uri)
    storage.preflight(cfg.output_uri, write=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    return cfg


def _streamed_codec(cfg: IndexConfig, arch, skip: frozenset[str], total: int | None, archive: dict,
                    progress) -> tuple[Any, dict | None]:
    """(trained, empty FAISS index, its `ann` record) of the IVF index `index.ann` plans for this
    corpus, its cells trained on a sample of the corpus streamed through a pool of embedding actors
    (harma.index.ann.trained_codec); (None, None) for an exact or HNSW index, or a corpus too small
    for a sample to pay (its cells are trained from the embedded corpus)."""
    from harma.index.ann import encoded_by_codes, plan_ann, trained_codec

    if cfg.ann == "exact":
        return None, None
    if total is None:  # a scene archive: its tiles counted from the scene headers
        from harma.geo.corpus import count_tiles

        total = count_tiles(archive["scenes"], cfg.geo.model_dump(), arch.image_size)
    params = plan_ann(cfg.ann, max(total, 1), arch.embed_dim, cfg.ann_params.memory_budget_bytes,
                      **cfg.ann_params.model_dump(exclude={"memory_budget_bytes", "target_recall"}))
    if not encoded_by_codes(params.kind) or params.train_rows * SAMPLE_AT_MOST > total:
        return None, None
    fraction = min(1.0, SAMPLE_MARGIN * params.train_rows / total)
    started = time.perf_counter()
    progress(f"  ANN {params.kind} for {total} items: training its {params.nlist} cells on a {fraction:.1%} "
             f"sample streamed through the embedding actors")
    device = "cuda" if cfg.use_gpu else "cpu"
    sample_ds, _, _ = _image_dataset(cfg, arch.image_size, skip, sample_fraction=fraction)
    sample_ds = sample_ds.repartition(target_num_rows_per_block=cfg.batch_size).map_batches(
        ImageEmbedder, fn_constructor_args=(cfg.checkpoint_uri, device, 0, cfg.trace_encoders, cfg.precision),
        **_actor_options(cfg))
    parts = [batch["embedding"][batch["ok"].astype(bool)] for batch in _batches_of_whole_pool(sample_ds, cfg)]
    sample = np.concatenate(parts) if parts else np.zeros((0, arch.embed_dim), np.float32)
    codec = trained_codec(sample, params, seed=SAMPLE_SEED, progress=progress)
    record = {**params.to_manifest(), "planned_for": int(total), "trained_on": "streamed sample",
              "sample_rows": int(len(sample)), "trained_rows": int(min(len(sample), params.train_rows)),
              "train_seconds": round(time.perf_counter() - started, 2), "encoded_by": "embedding actors"}
    return codec, record


def embed_corpus(cfg: IndexConfig, progress=log.info, skip: frozenset[str] = frozenset(), codec: Any = None,
                 plan_ann: bool = False) -> EmbeddedCorpus:
    """Embed the corpus's images (but those in `skip`: image ids, or scene ids of a geotiff corpus)
    with a pool of `cfg.actors` actors, and the captions of the images embedded. With `codec` (a
    trained, empty IVF index), or with `plan_ann` when `index.ann` plans an IVF index for a corpus
    this large (its cells then trained first on a streamed sample: `_streamed_codec`), the actors
    also encode each image for it (`EmbeddedCorpus.codes`)."""
    t0 = time.perf_counter()
    device = "cuda" if cfg.use_gpu else "cpu"
    from harma.model.backbone import arch_info
    from harma.model.checkpoint import read_checkpoint_config

    arch = arch_info(read_checkpoint_config(cfg.checkpoint_uri).model.backbone.arch)
    image_size = arch.image_size
    images, total, archive = _image_dataset(cfg, image_size, skip)
    ann_record = None
    if plan_ann and codec is None:
        codec, ann_record = _streamed_codec(cfg, arch, skip, total, archive, progress)
    geo = cfg.corpus_format == "geotiff"
    # Readers hand on blocks of up to 128 MiB: a small corpus was one block, so one actor embedded
    # all of it whatever `index.actors` said. Blocks of one inference batch spread it over the pool.
    images = images.repartition(target_num_rows_per_block=cfg.batch_size)
    what = f"tiles of {len(archive['scenes'])} scene(s)" if geo else f"{total}{' new' if skip else ''} images"
    progress(f"embedding {what} from {cfg.corpus_uri} with {cfg.checkpoint_uri} "
             f"({cfg.actors} actor(s), {device})")
    if codec is not None:
        from harma.index.ann import ann_to_bytes

        codec_ref = ray.put(ann_to_bytes(codec))  # once in the object store, not in every actor's arguments
    embedded = images.map_batches(ImageEmbedder, fn_constructor_args=(cfg.checkpoint_uri, device,
                                                                        cfg.thumbnail_size, cfg.trace_encoders,
                                                                        cfg.precision,
                                                                        None if codec is None else codec_ref),
                                  **_actor_options(cfg))
    columns = ("id", "source", "image_id", "split", "label", "thumbnail") + (GEO_COLUMNS if geo else ())
    emb_parts, code_parts, meta = [], [], {c: [] for c in columns}
    skipped: list = []
    scene_errors: dict[str, dict] = {}
    nodata_tiles = 0
    embedders: set[str] = set()
    done, last = 0, time.perf_counter()
    for batch in _batches_of_whole_pool(embedded, cfg):
        ok = batch["ok"].astype(bool)
        embedders.update(str(a) for a in batch["embedder"])
        if geo:
            status = [str(x) for x in batch["status"]]
            nodata_tiles += status.count("nodata")
            for uri, scene, st in zip(batch["source"], batch["scene"], status, strict=True):
                if st.startswith("error: ") and str(scene) not in scene_errors:
                    scene_errors[str(scene)] = {"uri": str(uri), "scene": str(scene), "reason": st[len("error: "):]}
        else:
            skipped.extend(str(k) for k in batch["id"][~ok])
        emb_parts.append(batch["embedding"][ok])
        if codec is not None:
            code_parts.append(batch["ann_code"][ok])
        for column in meta:
            values = batch[column][ok].tolist()
            meta[column].extend(values)
        done += len(ok)
        if time.perf_counter() - last > 10 or done == total:
            rate = done / (time.perf_counter() - t0)
            eta = f", ETA {(total - done) / max(rate, 1e-9):.0f} s" if total else ""
            progress(f"  {'tiles' if geo else 'images'} {done}{f'/{total}' if total else ''} ({rate:.0f}/s{eta})")
            last = time.perf_counter()
    # a missing label may come back from Ray Data's numpy blocks as NaN
    meta["label"] = [None if v is None or (isinstance(v, float) and v != v) else str(v) for v in meta["label"]]
    meta["image_id"] = [int(v) for v in meta["image_id"]]
    meta["id"] = [str(v) for v in meta["id"]]
    meta["source"] = [str(v) for v in meta["source"]]
    meta["split"] = [str(v) for v in meta["split"]]
    meta["thumbnail"] = [bytes(v) for v in meta["thumbnail"]]
    if geo:
        skipped = archive["bad"] + list(scene_errors.values())
        _check_bad_scenes(skipped, len(archive["scenes"]) + len(archive["bad"]), cfg.geo.max_bad_fraction, cfg.corpus_uri)
        meta["window"] = [[int(x) for x in w] for w in meta["window"]]
        meta["geometry"] = [bytes(g) for g in meta["geometry"]]
        for key in ("scene", "datetime"):
            meta[key] = [str(v) for v in meta[key]]
        for key in ("centre_lon", "centre_lat", "gsd"):
            meta[key] = [float(v) for v in meta[key]]
        progress(f"  {done} tiles: {len(meta['id'])} embedded, {nodata_tiles} mostly nodata skipped, "
                 f"{len(skipped)} scene(s) skipped")
        for bad in skipped[:10]:
            progress(f"    skipped {bad['uri']}: {bad['reason']}")
    dim = int(emb_parts[0].shape[1]) if emb_parts else 0
    image_emb = np.concatenate(emb_parts) if emb_parts else np.zeros((0, dim), np.float32)
    progress(f"  embedded by {len(embedders)} of {cfg.actors} actor(s)")
    if skipped and not geo:
        progress(f"  skipped {len(skipped)} undecodable image(s): {', '.join(skipped[:10])}")
    if not len(image_emb):
        if skip and not skipped:
            raise NothingNewError(f"{cfg.corpus_uri}: every image of splits {cfg.splits} is already in the index")
        raise ValueError(f"{cfg.corpus_uri}: no decodable images to index")

    caption_emb = captions = None
    if cfg.captions and cfg.corpus_format == "prepared":
        row_of = {k: i for i, k in enumerate(meta["id"])}
        parts, captions = [], {"caption": [], "image": [], "image_row": []}
        per_batch = max(cfg.batch_size, 128)
        caption_ds = _caption_dataset(cfg).repartition(target_num_rows_per_block=per_batch).map_batches(
            TextEmbedder, fn_constructor_args=(cfg.checkpoint_uri, device, cfg.trace_encoders, cfg.precision),
            **{**_actor_options(cfg), "batch_size": per_batch})
        for batch in _batches_of_whole_pool(caption_ds, cfg):
            keep = np.array([str(k) in row_of for k in batch["image"]], dtype=bool)
            parts.append(batch["embedding"][keep])
            captions["caption"].extend(str(c) for c in batch["caption"][keep])
            captions["image"].extend(str(k) for k in batch["image"][keep])
            captions["image_row"].extend(row_of[str(k)] for k in batch["image"][keep])
        caption_emb = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
        progress(f"  captions {len(caption_emb)}")
    codes = None
    if codec is not None:
        codes = np.concatenate(code_parts) if code_parts else np.zeros((0, codec.sa_code_size()), np.uint8)
    return EmbeddedCorpus(image_emb, meta, caption_emb, captions, skipped, archive.get("scenes", []), nodata_tiles,
                          codes, codec, ann_record)


def _scenes_read(corpus: EmbeddedCorpus) -> int:
    return len({s["scene"] for s in corpus.scenes} - {b["scene"] for b in corpus.skipped})


def build_index(cfg: IndexConfig, progress=log.info) -> dict[str, Any]:
    """Embed the corpus, write the index to `cfg.output_uri` (version 1); returns the manifest."""
    t0 = time.perf_counter()
    cfg = _prepare(cfg)
    fingerprint = checkpoint_fingerprint(cfg.checkpoint_uri)
    corpus = embed_corpus(cfg, progress, plan_ann=True)
    geo = cfg.corpus_format == "geotiff"
    if geo:
        scene_list = _quicklooks(cfg, corpus.scenes, {b["scene"] for b in corpus.skipped}, corpus.meta)
    manifest = {
        "format": FORMAT,
        "version": 1,
        "parent": None,
        "checkpoint_uri": cfg.checkpoint_uri,
        "checkpoint_fingerprint": fingerprint["fingerprint"],
        "config_sha256": fingerprint["config_sha256"],
        "adapter_sha256": fingerprint["adapter_sha256"],
        "embed_dim": int(corpus.image_emb.shape[1]),
        "images": int(len(corpus.image_emb)),
        "captions": 0 if corpus.caption_emb is None else int(len(corpus.caption_emb)),
        "corpus_uri": cfg.corpus_uri,
        "corpus_format": cfg.corpus_format,
        "splits": cfg.splits if cfg.corpus_format == "prepared" else [],
        "skipped": corpus.skipped,
        "thumbnails": bool(cfg.thumbnail_size),
        "thumbnail_size": cfg.thumbnail_size,
        **({"geo": {"crs": "OGC:CRS84", "scenes": _scenes_read(corpus), "tiles_nodata": corpus.nodata_tiles,
                    "scene_list": scene_list, **cfg.geo.model_dump()}} if geo else {}),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.perf_counter() - t0, 2),
        "precision": precision_record(cfg, corpus.image_emb, corpus.caption_emb, corpus.captions, corpus.meta,
                                      progress),
    }
    slices, capacity = _shard_plan(cfg, corpus)
    ann_parts = _approximate(cfg, corpus, slices, manifest, progress)
    if len(slices) > 1:
        manifest["shard_images_max"] = capacity
        _write_shards(cfg, manifest, corpus, slices, ann_parts, progress)
    else:
        save_index(cfg.output_uri, EmbeddingIndex(manifest, corpus.image_emb, corpus.meta, corpus.caption_emb,
                                                  corpus.captions), ann_parts[0])
    progress(f"index written to {cfg.output_uri}: {manifest['images']} images, {manifest['captions']} "
             f"captions{f' in {len(slices)} shards' if len(slices) > 1 else ''}, {manifest['build_seconds']:.0f} s")
    return manifest


def _shard_plan(cfg: IndexConfig, corpus: EmbeddedCorpus) -> tuple[list[tuple[int, int]], int | None]:
    """(the slices of the gallery each shard holds, the most images a shard may hold), from the RAM
    a vector costs in the index's ANN kind; one slice (and no bound) without `max_shard_bytes`."""
    from harma.index.ann import ram_bytes_per_vector
    from harma.index.shards import plan_shards, shard_capacity

    n = len(corpus.image_emb)
    if cfg.max_shard_bytes is None:
        return [(0, n)], None
    params = _ann_params(cfg, corpus)
    per_vector = ram_bytes_per_vector(params.kind, corpus.image_emb.shape[1], params.pq_m, cfg.ann_params.hnsw_m)
    return plan_shards(n, per_vector, cfg.max_shard_bytes), shard_capacity(per_vector, cfg.max_shard_bytes)


def _write_shards(cfg: IndexConfig, manifest: dict, corpus: EmbeddedCorpus, slices: list[tuple[int, int]],
                  ann_parts: list[Any], progress) -> None:
    """Each slice of the gallery (with its images' captions and its part of the FAISS index: the
    whole index's cells) as a whole index under shards/NNNNN/, then the root manifest."""
    from harma.index.shards import shard_name
    from harma.index.update import Rows, sliced
    from harma.serve.index import write_manifest

    rows = Rows(corpus.image_emb, corpus.meta, corpus.caption_emb, corpus.captions)
    listed = []
    for position, (first, end) in enumerate(slices):
        part = sliced(rows, first, end)
        shard = {**manifest, "images": end - first, "captions": 0 if part.caption_emb is None else len(part.caption_emb),
                 "shard": {"position": position, "of": len(slices), "first_row": first}}
        uri = storage.join(cfg.output_uri, shard_name(position))
        save_index(uri, EmbeddingIndex(shard, part.vectors, part.images, part.caption_emb, part.captions),
                   ann_parts[position])
        listed.append({"uri": shard_name(position), "images": shard["images"], "captions": shard["captions"],
                       "first_row": first})
        progress(f"  shard {position + 1}/{len(slices)}: images {first}-{end - 1} ({manifest['ann']['kind']})")
    manifest["shards"] = listed
    manifest["ann"] = {"kind": manifest["ann"]["kind"]}
    write_manifest(cfg.output_uri, manifest)
