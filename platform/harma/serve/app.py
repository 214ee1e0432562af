"""The Ray Serve application: `harma.serve.app:build_app`, one autoscaling Retriever deployment.

    serve run serve_configs/local.yaml          # Ray's own tools take the config unchanged
    serve deploy serve_configs/gpu.yaml         # on a running cluster (code installed there)
    harma serve serve_configs/local.yaml        # validates, resolves local paths, then `serve run`

Each Retriever replica holds the query encoder (the checkpoint's own architecture, read from its
config.yaml) and the whole index on its device, and is the FastAPI ingress, so a query costs one
hop from Serve's ingress: text and image queries are micro-batched by a BatchCoalescer that merges
every query waiting for the model into its next forward pass, encoded in one forward pass and
searched exactly as one matrix product per gallery. All torch work runs on
one model thread, so the replica keeps accepting requests, which then form the next batch.

HTTP API (OpenAPI at /openapi.json, interactive docs at /docs; the web page at /):

    POST /v1/text-to-images      {"text": "...", "k": 10, "filters": {"split": "test"}}
    POST /v1/text-to-images/batch {"queries": [{"text": "...", "k": 10}, ...]}: many queries, one
                                 request (up to max_batch_queries; answered in order)
    POST /v1/image-to-images     JSON {"image_base64": ...}, a multipart upload (field `image`),
    POST /v1/image-to-captions   or the raw bytes with Content-Type image/* (k etc. in the query)
    GET  /v1/thumbnails/{id}     the JPEG thumbnail kept in the index
    GET  /v1/info                checkpoint, index, limits, versions
    GET  /healthz                liveness (no auth)

Set the environment variable named by `api_key_env` (default HARMA_API_KEY) on the replicas to
require `X-API-Key: <key>` or `Authorization: Bearer <key>` on /v1/*. The index can be replaced
without a restart by setting the deployment's `user_config: {index_uri: ...}`; a sharded index by
setting it on the Retriever to another version of the same shard count (harma index add/delete
write one), which its IndexShard deployments load shard by shard (harma.serve.shard).
"""
# No `from __future__ import annotations` here: FastAPI must see real types on the route methods.

import asyncio
import functools
import hmac
import logging
import os
import time
from importlib import resources
from typing import Any

import numpy as np
import ray.serve
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

import ray
from harma.geo.query import NMS_POOL, feature_collection
from harma.index.shards import is_sharded, merge_hits
from harma.serve.api import (
    GEOJSON,
    ApiError,
    BatchSearchResponse,
    ErrorBody,
    ImageQuery,
    SearchResponse,
    ServeArgs,
    TextQueries,
    TextQuery,
    media_type,
    openapi_contract,
    parse_image_json,
    parse_image_params,
    parse_text_queries,
    parse_text_query,
    single_values,
    wants_geojson,
)
from harma.serve.coalesce import BatchCoalescer
from harma.serve.index import EmbeddingIndex, check_index_matches
from harma.serve.metrics import current as current_metrics
from harma.serve.metrics import install as install_metrics
from harma.serve.search import (
    NO_CAPTIONS,
    Job,
    Loaded,
    ShardedIndex,
    hits_of,
    load_served,
    search_jobs,
    suppress_hits,
    wants_suppression,
)

log = logging.getLogger("harma.serve")


api = FastAPI(
    title="HarMA retrieval",
    version="1",
    description="Remote-sensing image-text retrieval with HarMA adapters: text -> images, "
    "image -> captions, image -> images. Errors are JSON: {\"error\": {\"status\", \"message\"}}.",
)
class _Measured:
    """ASGI middleware: every HTTP answer's latency and status into the replica's metrics, by route
    template (harma.serve.metrics; a plain ASGI wrapper, not BaseHTTPMiddleware, whose extra task
    per request costs a replica on 2 cores)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_with_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            metrics = current_metrics()
            if metrics is not None:
                metrics.request(getattr(scope.get("route"), "path", "unmatched"), status[0],
                                time.perf_counter() - started)


api.add_middleware(_Measured)
_ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 413, 415, 422)}
_SEARCH_RESPONSES = {**_ERRORS, 200: {"model": SearchResponse}}
_IMAGE_SEARCH_RESPONSES = {**_SEARCH_RESPONSES, 411: {"model": ErrorBody, "description": "multipart without Content-Length"}}


def _binary(media: str) -> dict[str, Any]:
    return {200: {"description": media, "content": {media: {"schema": {"type": "string", "format": "binary"}}}}}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status)


@api.exception_handler(ApiError)
async def _api_error(_: Request, err: ApiError) -> JSONResponse:
    return _error(err.status, err.message)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    response = _error(err.status_code, str(err.detail))
    response.headers.update(err.headers or {})  # a 405 keeps its Allow
    return response


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
    return _error(422, problems)


@api.exception_handler(Exception)
async def _internal_error(_: Request, err: Exception) -> JSONResponse:
    log.exception("internal error")
    return _error(500, f"internal error ({type(err).__name__})")


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 above `limit` (by Content-Length, or while streaming)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body of {int(length):,} bytes; the limit is {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI request body of a route that parses its own JSON (for our 4xx messages)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()}}}}


def _image_body() -> dict[str, Any]:
    upload = {"type": "object", "additionalProperties": False, "properties": {
        "image": {"type": "string", "format": "binary", "minLength": 1}, "k": {"type": "integer"},
        "filters": {"type": "object", "description": "JSON object (the part's content: application/json)"},
        "include_thumbnails": {"type": "boolean"}, "nms": {"type": "boolean"}}, "required": ["image"]}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": ImageQuery.model_json_schema()},
        "multipart/form-data": {"schema": upload, "encoding": {"filters": {"contentType": "application/json"}}},
        "image/*": {"schema": {"type": "string", "format": "binary", "minLength": 1}}}}}


# Module functions the deployment calls are defined above it: Serve pickles the class with the
# module globals as they are at its definition.
def _scene_info(manifest: dict[str, Any]) -> dict[str, Any]:
    """A scene index's scenes for /v1/info (each with its overview's URL); nothing for other indexes."""
    listed = (manifest.get("geo") or {}).get("scene_list")
    if not listed:
        return {}
    return {"scenes": [{k: v for k, v in sc.items() if k != "quicklook"} | {"quicklook": f"v1/quicklooks/{i}"}
                       for i, sc in enumerate(listed)]}


_CONTRACT: dict[str, Any] = {}  # the replica's OpenAPI document, made once (api.openapi_contract)
_SERVED: dict[str, Any] = {"scene_index": False, "examples": {}}  # what the document says of the index


def _index_served(index: EmbeddingIndex) -> None:
    """The replica now serves `index`: its document is made again, offering place filters only for
    an index of scenes and a served item id (one with a thumbnail) as the thumbnail example."""
    with_thumbnail = next((item for item in index.images["id"] if index.thumbnail(item)), None) \
        if "thumbnail" in index.images else None
    served = {"scene_index": index.has_footprints,
              "examples": {"position": 0} if index.has_footprints else {}}
    if with_thumbnail is not None:
        served["examples"]["item_id"] = with_thumbnail
    if served != _SERVED:
        _SERVED.update(served)
        _CONTRACT.clear()


def _exact_openapi(limits) -> dict[str, Any]:
    """`api.openapi` in a replica: FastAPI's document with its references resolvable and the
    deployment's limits declared (built at the first request, when Serve has bound the routes)."""
    if not _CONTRACT:
        _CONTRACT.update(openapi_contract(FastAPI.openapi(api), limits, **_SERVED))
    return _CONTRACT


def _page_html() -> str:
    return resources.files("harma.serve").joinpath("page.html").read_text()


@ray.serve.deployment(
    name="Retriever",
    # Batching wants several requests queued per replica: the autoscaler keeps ~8 ongoing per
    # replica; a replica accepts up to 64 (>= max_batch_size, so a batch can fill). The serve
    # config files set these per environment, with comments.
    max_ongoing_requests=64,
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8,
                        "upscale_delay_s": 10, "downscale_delay_s": 120},
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
    graceful_shutdown_timeout_s=20,
)
@ray.serve.ingress(api)
class Retriever:
    """Query encoder + index + HTTP API in one replica (see the module docstring)."""

    def __init__(self, args: dict[str, Any], *shards):
        from harma.serve.encoder import ModelThread, QueryEncoder
        from harma.serve.index import checkpoint_fingerprint

        self.args = ServeArgs.model_validate(args)
        self.limits = self.args.limits
        api.openapi = functools.partial(_exact_openapi, self.limits)
        # Every torch computation of the replica runs on one thread, model loading included (see
        # ModelThread: a second OpenMP team slowed ViT-B-32 queries on CPU by ~40%).
        self._model_thread = ModelThread()
        self.encoder = self._model_thread.call(QueryEncoder, self.args.checkpoint_uri, self.args.device,
                                               self.args.trace_encoders, self.args.precision)
        self.fingerprint = checkpoint_fingerprint(self.args.checkpoint_uri)
        self._api_key = os.environ.get(self.args.api_key_env, "").encode()
        # DeploymentHandles of a sharded index's IndexShard deployments, over the replicas' gRPC
        # servers rather than Ray actor calls (Serve's `_by_reference=False`: what its throughput-
        # optimised mode uses by default): 3 shards cost 3.5 ms a query over the unsharded index
        # instead of 8.6 on 2 cores (benchmarks/shard_fanout.py).
        self.shards = [shard.options(_by_reference=False) for shard in shards]
        self.state = self._load(self.args.index_uri)
        self.index_error: dict[str, Any] | None = None  # the last index version that failed to load
        self.metrics = install_metrics()
        self.metrics.index(self.state.index.manifest, self.state.index.size)
        _index_served(self.state.index)
        # The replica's dynamic batching (see coalesce.py for why not Serve's @serve.batch).
        self._coalescers = {kind: BatchCoalescer(functools.partial(self._answer, kind), self._model_thread.executor,
                                                 self.args.max_batch_size, self.args.batch_wait_timeout_s,
                                                 functools.partial(self.metrics.forward_pass, kind))
                            for kind in ("text", "image")}
        log.info("Retriever ready: %s, index %s (%d images) on %s (towers %s), auth %s",
                 self.args.checkpoint_uri, self.args.index_uri, self.state.index.size, self.encoder.device,
                 self.encoder.towers,
                 "on" if self._api_key else "off")

    # --- index ---------------------------------------------------------------------------------
    def _load(self, uri: str) -> Loaded:
        if self.shards:  # the shards hold the galleries; the ingress only their root manifest
            from harma.serve.index import read_manifest

            manifest = read_manifest(uri)
            check_index_matches(manifest, self.args.checkpoint_uri, self.fingerprint)
            count = len(manifest.get("shards") or [])
            if count != len(self.shards):
                raise ValueError(f"{uri} is an index of {count or 'no'} shards; this application deploys "
                                 f"{len(self.shards)} (IndexShard0..{len(self.shards) - 1}): an index of another "
                                 f"shard count is served by deploying the application again with it "
                                 f"(args.index_uri), not through user_config")
            return Loaded(uri, ShardedIndex(manifest), {})
        return load_served(uri, self.args.checkpoint_uri, self.fingerprint, self.encoder.device)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """`user_config: {index_uri: ...}` swaps the index in place: no restart, no lost request. An
        index that fails to load (missing, of another checkpoint, corrupt; for a sharded index, a
        shard any shard deployment cannot load, or another shard count) leaves the replica serving
        the one it has, the failure in /v1/info's `index_error` and the metrics."""
        unknown = sorted(set(user_config or {}) - {"index_uri"})
        if unknown:
            raise ValueError(f"user_config: unknown key(s) {unknown}; only index_uri")
        uri = (user_config or {}).get("index_uri")
        if uri and uri != self.state.uri:
            try:
                loaded = await asyncio.get_running_loop().run_in_executor(None, self._load, uri)
                # a sharded index: every shard deployment loads its shard of the version before the
                # first query is sent for it (a replica that has not yet loads it at that query)
                await asyncio.gather(*(shard.prepare.remote(uri) for shard in self.shards))
            except Exception as err:  # a version that cannot load: keep serving the one loaded
                self.index_error = {"index_uri": uri, "message": f"{type(err).__name__}: {err}"[:500],
                                    "at": time.time()}
                self.metrics.index_load_failed()
                log.error("index %s not loaded, still serving %s: %s", uri, self.state.uri, err)
                return
            self.state = loaded  # requests already in a batch finish on the old index
            self.index_error = None
            self.metrics.index(loaded.index.manifest, loaded.index.size)
            _index_served(loaded.index)
            log.info("index replaced: %s (%d images)", uri, loaded.index.size)

    def check_health(self) -> None:
        if not self.state.index.size:
            raise RuntimeError("no index loaded")
        self.metrics.refresh()

    # --- auth ----------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if not self._api_key:
            return
        given = request.headers.get("x-api-key")
        bearer = request.headers.get("authorization", "")
        if given is None and bearer.lower().startswith("bearer "):
            given = bearer[7:].strip()
        if not given:
            raise ApiError(401, "missing API key: send the X-API-Key header or Authorization: Bearer <key>")
        if not hmac.compare_digest(given.encode(), self._api_key):
            raise ApiError(401, "invalid API key")

    # --- batched model work --------------------------------------------------------------------
    def _answer(self, kind: str, jobs: list[Job]) -> list[dict[str, Any] | ApiError | np.ndarray]:
        """Encode a batch in one forward pass and search each gallery with one matrix product (a
        sharded index: the embeddings, for `_sharded_answers` to send to the shards)."""
        loaded = self.state
        if kind == "text":
            emb = self.encoder.encode_texts([j.text for j in jobs])
        else:
            emb = self.encoder.encode_pixels(np.stack([j.pixels for j in jobs]))
        if self.shards:
            return list(emb.float().cpu().numpy())
        answers: list[dict[str, Any] | ApiError] = [None] * len(jobs)  # type: ignore[list-item]
        for target in ("images", "captions"):
            rows = [i for i, j in enumerate(jobs) if j.target == target]
            if not rows:
                continue
            found = search_jobs(loaded, target, emb[rows], [jobs[i] for i in rows],
                                on_reranked=self.metrics.reranked)
            for i, answer in zip(rows, found, strict=True):
                answers[i] = answer if isinstance(answer, ApiError) else \
                    self._results(loaded.index, hits_of(loaded.index, jobs[i], *answer))
        return answers

    async def _sharded_answers(self, jobs: list[Job], embeddings: list[np.ndarray]) -> list[dict[str, Any] | ApiError]:
        """Each job's answer from every shard (one handle call a shard and gallery for the whole
        group), merged: the k best of the shards' k best, suppressed after the merge for a scene index."""
        loaded = self.state  # the version the whole group is answered from, asked of every shard
        index = loaded.index
        answers: list[dict[str, Any] | ApiError] = [None] * len(jobs)  # type: ignore[list-item]
        for target in ("images", "captions"):
            rows = [i for i, j in enumerate(jobs) if j.target == target]
            if not rows:
                continue
            if target == "captions" and not index.caption_count:
                for i in rows:
                    answers[i] = ApiError(422, NO_CAPTIONS)
                continue
            emb = np.stack([embeddings[i] for i in rows])
            specs = [jobs[i].for_search() for i in rows]
            pending = [shard.search.remote(target, emb, specs, loaded.uri) for shard in self.shards]  # all sent, then awaited
            per_shard = [await response for response in pending]
            for n, i in enumerate(rows):
                parts = [answer[n] for answer in per_shard]
                failed = next((p for p in parts if isinstance(p, tuple)), None)
                if failed is not None:
                    answers[i] = ApiError(*failed)
                    continue
                pooled = wants_suppression(index.has_footprints, jobs[i])
                merged = merge_hits(parts, jobs[i].k * NMS_POOL if pooled else jobs[i].k)
                answers[i] = self._results(index, suppress_hits(merged, jobs[i].k) if pooled else merged)
        return answers

    async def _search(self, kind: str, jobs: list[Job]) -> list[dict[str, Any] | ApiError]:
        """The jobs through the replica's batcher (and the shards of a sharded index)."""
        answers = await self._coalescers[kind].submit(jobs)
        return await self._sharded_answers(jobs, answers) if self.shards else answers

    @staticmethod
    def _results(index, hits: list[dict[str, Any]]) -> dict[str, Any]:
        return {"results": [{"rank": rank, **hit} for rank, hit in enumerate(hits, start=1)],
                "index": {"fingerprint": index.manifest["checkpoint_fingerprint"], "images": index.size,
                          "captions": index.caption_count, "built_at": index.manifest.get("built_at")}}

    async def _respond(self, job: Job, kind: str, started: float, request: Request) -> JSONResponse:
        """One query's answer, as SearchResponse documents it (built here, not re-validated by
        FastAPI: that cost ~8% of a replica's per-request Python time on 2 CPU cores), or as a
        GeoJSON FeatureCollection (`format=geojson` or `Accept: application/geo+json`)."""
        geojson = wants_geojson(dict(request.query_params), request.headers.get("accept"))
        if geojson and (job.target != "images" or not self.state.index.has_footprints):
            raise ApiError(422, "GeoJSON answers need image hits from a scene index (index.corpus_format geotiff)")
        [answer] = await self._search(kind, [job])
        if isinstance(answer, ApiError):
            raise answer
        query = {"kind": kind, "target": job.target, "k": job.k, "filters": job.filters}
        if job.place is not None:
            query["place"] = {"bbox": job.place.bbox, "datetime": [job.place.start, job.place.end],
                              "scene": list(job.place.scenes), "intersects": job.place.geometry is not None}
        took = round((time.perf_counter() - started) * 1000, 3)
        if geojson:
            body = feature_collection(answer["results"], query)
            return JSONResponse({**body, "index": answer["index"], "took_ms": took}, media_type=GEOJSON)
        return JSONResponse({"query": query, **answer, "took_ms": took})

    # --- routes --------------------------------------------------------------------------------
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(_page_html())

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "images": self.state.index.size}

    @api.get("/v1/info", responses=_ERRORS)
    async def info(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        import open_clip

        import harma

        manifest = self.state.index.manifest
        return {
            "checkpoint_uri": self.args.checkpoint_uri,
            "checkpoint_fingerprint": self.fingerprint["fingerprint"],
            "arch": self.encoder.arch, "embed_dim": self.encoder.embed_dim,
            "device": str(self.encoder.device), "towers": self.encoder.towers,
            "precision": self.encoder.precision,
            "index_uri": self.state.uri,
            "index_error": self.index_error,
            "index": {"images": self.state.index.size, "captions": self.state.index.caption_count,
                      "built_at": manifest.get("built_at"), "corpus_uri": manifest.get("corpus_uri"),
                      "precision": manifest.get("precision"), **_scene_info(manifest),
                      **({"ann": manifest["ann"]} if self.state.index.ann is not None else {}),
                      **({"shards": len(self.shards)} if self.shards else {})},
            "limits": self.limits.model_dump(),
            "batching": {"max_batch_size": self.args.max_batch_size,
                         "batch_wait_timeout_s": self.args.batch_wait_timeout_s,
                         **{f"{kind}_forward_passes": c.calls for kind, c in self._coalescers.items()},
                         **{f"{kind}_queries": c.items for kind, c in self._coalescers.items()}},
            "auth": "api-key" if self._api_key else "none",
            "replica": ray.serve.get_replica_context().replica_id.unique_id,
            "versions": {"harma": getattr(harma, "__version__", "0"), "ray": ray.__version__,
                         "torch": torch.__version__, "open_clip": open_clip.__version__},
        }

    @api.post("/v1/text-to-images", responses=_SEARCH_RESPONSES, openapi_extra=_json_body(TextQuery))
    async def text_to_images(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        self._authorize(request)
        query = parse_text_query(await _read_body(request, self.limits.max_request_bytes), request.headers.get("content-type"), self.limits)
        job = Job.of("images", query, text=query.text)
        return await self._respond(job, "text", started, request)

    @api.post("/v1/text-to-images/batch", responses={**_ERRORS, 200: {"model": BatchSearchResponse}},
              openapi_extra=_json_body(TextQueries))
    async def text_to_images_batch(self, request: Request) -> JSONResponse:
        """Many text queries in one request: HTTP and JSON costs paid once for all of them.

        The queries go to the replica's batcher in groups of at most `max_batch_size`, where they
        share forward passes with each other and with single queries. All or nothing: a query that
        fails (a filter on a value of the wrong kind, say) fails the request with its position.
        (The response is documented with BatchSearchResponse but not re-validated against it: for
        256 queries that would cost more than the search.)
        """
        started = time.perf_counter()
        self._authorize(request)
        queries = parse_text_queries(await _read_body(request, self.limits.max_request_bytes),
                                     request.headers.get("content-type"), self.limits)
        jobs = [Job.of("images", q, text=q.text) for q in queries]
        size = self.args.max_batch_size
        groups = await asyncio.gather(*(self._search("text", jobs[i:i + size]) for i in range(0, len(jobs), size)))
        answers = [answer for group in groups for answer in group]
        for i, answer in enumerate(answers):
            if isinstance(answer, ApiError):
                raise ApiError(answer.status, f"queries[{i}]: {answer.message}")
        index = answers[0]["index"]
        return JSONResponse({
            "responses": [{"query": {"kind": "text", "target": "images", "k": job.k, "filters": job.filters},
                           "results": answer["results"]} for job, answer in zip(jobs, answers, strict=True)],
            "index": index, "took_ms": round((time.perf_counter() - started) * 1000, 3)})

    @api.post("/v1/image-to-images", responses=_IMAGE_SEARCH_RESPONSES, openapi_extra=_image_body())
    async def image_to_images(self, request: Request) -> JSONResponse:
        return await self._image_search(request, "images")

    @api.post("/v1/image-to-captions", responses=_IMAGE_SEARCH_RESPONSES, openapi_extra=_image_body())
    async def image_to_captions(self, request: Request) -> JSONResponse:
        return await self._image_search(request, "captions")

    @api.get("/v1/thumbnails/{item_id:path}", response_class=Response,
             responses={**_ERRORS, 404: {"model": ErrorBody}, **_binary("image/jpeg")})
    async def thumbnail(self, item_id: str, request: Request) -> Response:
        self._authorize(request)
        data = self.state.index.thumbnail(item_id)  # a dictionary lookup, never a file path
        if data is None and self.shards:
            version = self.state.uri
            found = await asyncio.gather(*(shard.thumbnail.remote(item_id, version) for shard in self.shards))
            data = next((d for d in found if d), None)
        if data is None:
            raise ApiError(404, f"no thumbnail for {item_id!r} in this index")
        return Response(data, media_type="image/jpeg")

    @api.get("/v1/quicklooks/{position}", response_class=Response,
             responses={**_ERRORS, 404: {"model": ErrorBody}, **_binary("image/png")})
    async def quicklook(self, position: int, request: Request) -> Response:
        """The overview PNG of the index's scene at `position` in /v1/info's `index.scenes`."""
        self._authorize(request)
        loaded = self.state
        scenes = (loaded.index.manifest.get("geo") or {}).get("scene_list", [])
        if not 0 <= position < len(scenes):
            raise ApiError(404, f"no scene {position} in this index ({len(scenes)} scenes)")
        from harma import storage

        data = await asyncio.to_thread(storage.read_bytes, storage.join(loaded.uri, scenes[position]["quicklook"]))
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    async def _image_search(self, request: Request, target: str) -> JSONResponse:
        from harma.serve.encoder import UnreadableImageError

        started = time.perf_counter()
        self._authorize(request)
        content_type = request.headers.get("content-type")
        kind = media_type(content_type)
        if kind == "application/json":
            query, data = parse_image_json(await _read_body(request, self.limits.max_request_bytes),
                                           content_type, self.limits)
        elif kind == "multipart/form-data":
            length = request.headers.get("content-length")
            if length is None or not length.isdigit() or int(length) > self.limits.max_request_bytes:
                raise ApiError(413 if length and length.isdigit() else 411,
                               f"multipart uploads need a Content-Length of at most "
                               f"{self.limits.max_request_bytes:,} bytes")
            try:
                form = await request.form(max_files=1, max_fields=8, max_part_size=self.limits.max_request_bytes)
            except ApiError:
                raise
            except Exception as err:  # starlette's multipart parser errors
                raise ApiError(400, f"malformed multipart body: {err}") from None
            fields = single_values(form.multi_items(), "form")
            upload = fields.get("image")
            if upload is None or isinstance(upload, str):
                raise ApiError(422, "multipart upload needs a file field named 'image'")
            data = await upload.read()
            query = parse_image_params({k: str(v) for k, v in fields.items() if k != "image"}, self.limits)
        elif kind.startswith("image/") or kind == "application/octet-stream":
            data = await _read_body(request, self.limits.max_request_bytes)
            query = parse_image_params(single_values(request.query_params.multi_items(), "query"), self.limits)
        else:
            raise ApiError(415, "send the image as application/json (image_base64), "
                                f"multipart/form-data (field 'image') or image/*; got {content_type or 'none'!r}")
        if not data:
            raise ApiError(400, "the image is empty")  # as any other bytes that are no image
        try:
            pixels = await asyncio.to_thread(self.encoder.preprocess, data)
        except UnreadableImageError as err:
            raise ApiError(400, str(err)) from None
        job = Job.of(target, query, pixels=pixels)
        return await self._respond(job, "image", started, request)


def build_app(args: dict[str, Any]) -> ray.serve.Application:
    """The import_path target: validate `args`, check the index belongs to the checkpoint, bind."""
    from harma.serve.index import checkpoint_fingerprint, read_manifest

    parsed = ServeArgs.model_validate(args)
    manifest = read_manifest(parsed.index_uri)
    check_index_matches(manifest, parsed.checkpoint_uri, checkpoint_fingerprint(parsed.checkpoint_uri))
    if not is_sharded(manifest):
        return Retriever.bind(parsed.model_dump())
    from harma.serve.shard import IndexShard

    shards = [IndexShard.options(name=f"IndexShard{i}").bind(
        {"checkpoint_uri": parsed.checkpoint_uri, "index_uri": parsed.index_uri, "position": i})
        for i in range(len(manifest["shards"]))]
    return Retriever.bind(parsed.model_dump(), *shards)
