"""The HTTP API's contract: request/response models, limits, and request parsing with 4xx errors.

Everything a client can get wrong is turned into `ApiError(status, message)` here or in the app, before any
model work: wrong content type (415), body too large (413), non-UTF-8 or malformed JSON (400),
schema violations, empty or over-long text, k out of range (422), undecodable base64 or image
bytes (400). The Serve deployment (`harma.serve.app`) renders an ApiError as
`{"error": {"status": ..., "message": ...}}`.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Filters = dict[str, str | list[str]]


class ApiError(Exception):
    """A client error: HTTP status + one clear message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Limits(BaseModel):
    """Request limits of a deployment (from ServeArgs)."""

    max_top_k: int = 100
    max_text_chars: int = 1000
    max_request_bytes: int = 8 * 1024 * 1024
    max_batch_queries: int = 256


class ServeArgs(BaseModel):
    """`args:` of a serve config's application (validated when the app is built)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint_uri: str = Field(description="Trained checkpoint (folder or s3:// prefix).")
    index_uri: str = Field(description="Index built from that checkpoint (`harma index build`).")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_top_k: int = Field(100, ge=1, le=10_000)
    max_text_chars: int = Field(1000, ge=1)
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Larger bodies get 413.")
    max_batch_queries: int = Field(256, ge=1, le=10_000,
                                   description="Most text queries in one POST /v1/text-to-images/batch.")
    api_key_env: str = Field("HARMA_API_KEY", description="Env var holding the API key; unset = no auth.")
    max_batch_size: int = Field(32, ge=1, description="Queries encoded and searched together.")
    trace_encoders: bool = Field(
        True, description="Run the text and image towers as TorchScript graphs, checked against the "
        "eager model at start-up (eager if they differ): no Python per layer, and the GIL stays free "
        "for the HTTP work while a batch runs.")
    precision: Literal["validated", "fp32", "bf16"] = Field(
        "validated", description="Weights the queries are embedded with: the numerics that validated "
        "the checkpoint, or explicitly bf16/fp32 (match the index's, shown by /v1/info).")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="How long an idle replica holds a first query for company (batches "
        "fill anyway while a forward pass runs: the queries arriving meanwhile form the next one).")

    @property
    def limits(self) -> Limits:
        return Limits(max_top_k=self.max_top_k, max_text_chars=self.max_text_chars,
                      max_request_bytes=self.max_request_bytes, max_batch_queries=self.max_batch_queries)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: int = Field(10, description="How many results (1..max_top_k).")
    filters: Filters = Field(
        default_factory=dict,
        description="Metadata filters on the image gallery, e.g. {\"split\": \"test\", \"label\": "
        "[\"airport\", \"port\"]}; filterable: split, label, image_id, source.")
    include_thumbnails: bool = Field(False, description="Add each image's JPEG thumbnail as a data URI.")
    bbox: list[float] | None = Field(
        None, description="Scene index: only tiles whose footprint intersects [min_lon, min_lat, max_lon, "
        "max_lat] (WGS84).")
    intersects: dict[str, Any] | None = Field(
        None, description="Scene index: only tiles whose footprint intersects this GeoJSON geometry (WGS84).")
    datetime: str | None = Field(
        None, description="Scene index: acquisition time in a STAC interval, e.g. \"2025-03-01/..\", "
        "\"2025-01-01T00:00:00Z/2025-06-30T23:59:59Z\", or one date.")
    scene: str | list[str] | None = Field(None, description="Scene index: only tiles of these scene ids.")
    nms: bool = Field(
        True, description="Scene index: merge overlapping tiles (non-maximum suppression on footprints, "
        "IoU > 0.3): one hit per object where tiles overlap.")


class TextQuery(_Request):
    text: str = Field(description="The query caption.")


class TextQueries(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queries: list[TextQuery] = Field(description="Text queries (up to max_batch_queries), answered in order.")


class ImageQuery(_Request):
    image_base64: str = Field(description="The query image (PNG, JPEG, TIFF ...), base64-encoded.")


class ImageHit(BaseModel):
    rank: int
    id: str = Field(description="The image's key in the corpus (a scene index: <scene>/<col>_<row>).")
    score: float = Field(description="Cosine similarity.")
    metadata: dict[str, Any]
    thumbnail: str | None = Field(None, description="data:image/jpeg;base64,... when asked for.")
    geometry: dict[str, Any] | None = Field(None, description="Scene index: the tile's footprint, GeoJSON, WGS84.")
    centre: list[float] | None = Field(None, description="Scene index: [lon, lat] of the footprint's centre.")


class CaptionHit(BaseModel):
    rank: int
    caption: str
    image: str = Field(description="Id of the image the caption belongs to.")
    score: float


class SearchResponse(BaseModel):
    query: dict[str, Any]
    results: list[ImageHit] | list[CaptionHit]
    index: dict[str, Any]
    took_ms: float


class BatchItem(BaseModel):
    query: dict[str, Any]
    results: list[ImageHit]


class BatchSearchResponse(BaseModel):
    responses: list[BatchItem] = Field(description="One per query, in the order sent.")
    index: dict[str, Any]
    took_ms: float


class ErrorBody(BaseModel):
    error: dict[str, Any]


# --- parsing ---------------------------------------------------------------------------------
def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_json(body: bytes, content_type: str | None) -> Any:
    if media_type(content_type) != "application/json":
        raise ApiError(415, f"expected Content-Type application/json, got {content_type or 'none'!r}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"the body is not valid UTF-8 (byte {err.start})") from None
    if not text.strip():
        raise ApiError(400, "the body is empty; send a JSON object")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}") from None


def _validate(model: type[BaseModel], raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ApiError(422, f"the body must be a JSON object, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors())
        raise ApiError(422, problems) from None


def check_common(query: _Request, limits: Limits) -> None:
    if not 1 <= query.k <= limits.max_top_k:
        raise ApiError(422, f"k must be between 1 and {limits.max_top_k}, got {query.k}")
    from harma.serve.index import FILTER_COLUMNS

    for key, value in query.filters.items():
        if key not in FILTER_COLUMNS:
            raise ApiError(422, f"cannot filter on {key!r}; filterable: {', '.join(FILTER_COLUMNS)}")
        if isinstance(value, list) and not value:
            raise ApiError(422, f"filter {key!r} has an empty list of values")
    place_of(query)


def place_of(query: _Request):
    """The query's place and time filters (harma.geo.query.PlaceQuery), or None; 422 when malformed."""
    if query.bbox is None and query.intersects is None and query.datetime is None and query.scene is None:
        return None
    from harma.geo.query import parse_place

    try:
        return parse_place(bbox=query.bbox, intersects=query.intersects, datetime=query.datetime, scene=query.scene)
    except ValueError as err:
        raise ApiError(422, str(err)) from None


GEOJSON = "application/geo+json"


def wants_geojson(params: dict[str, str], accept: str | None) -> bool:
    """`format=geojson` in the query string, or an Accept header naming GeoJSON."""
    fmt = params.get("format", "json").lower()
    if fmt not in ("json", "geojson"):
        raise ApiError(422, f"format must be json or geojson, got {fmt!r}")
    return fmt == "geojson" or GEOJSON in (accept or "")


def check_text_query(query: TextQuery, limits: Limits) -> None:
    if not query.text.strip():
        raise ApiError(422, "text is empty")
    if len(query.text) > limits.max_text_chars:
        raise ApiError(422, f"text has {len(query.text)} characters; the limit is {limits.max_text_chars}")
    check_common(query, limits)


def parse_text_query(body: bytes, content_type: str | None, limits: Limits) -> TextQuery:
    query = _validate(TextQuery, parse_json(body, content_type))
    check_text_query(query, limits)
    return query


def parse_text_queries(body: bytes, content_type: str | None, limits: Limits) -> list[TextQuery]:
    """The queries of a batch request; an error names the query it is about (`queries[3]: ...`)."""
    queries = _validate(TextQueries, parse_json(body, content_type)).queries
    if not queries:
        raise ApiError(422, "queries is empty; send at least one")
    if len(queries) > limits.max_batch_queries:
        raise ApiError(422, f"{len(queries)} queries; the limit is {limits.max_batch_queries} per request")
    for i, query in enumerate(queries):
        try:
            check_text_query(query, limits)
        except ApiError as err:
            raise ApiError(err.status, f"queries[{i}]: {err.message}") from None
    return queries


def decode_base64(data: str) -> bytes:
    if data.startswith("data:") and "," in data:  # a data URI as the browser makes it
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image_base64 is not valid base64") from None
    if not raw:
        raise ApiError(422, "image_base64 is empty")
    return raw


def parse_image_json(body: bytes, content_type: str | None, limits: Limits) -> tuple[ImageQuery, bytes]:
    query = _validate(ImageQuery, parse_json(body, content_type))
    check_common(query, limits)
    return query, decode_base64(query.image_base64)


def parse_image_params(params: dict[str, str], limits: Limits) -> _Request:
    """k/filters/include_thumbnails from query-string or form fields (raw and multipart uploads)."""
    raw: dict[str, Any] = {}
    known = {"k", "filters", "include_thumbnails", "bbox", "intersects", "datetime", "scene", "nms", "format"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ApiError(422, f"unknown parameter(s): {', '.join(unknown)}")
    if "k" in params:
        try:
            raw["k"] = int(params["k"])
        except ValueError:
            raise ApiError(422, f"k must be an integer, got {params['k']!r}") from None
    for name in ("filters", "intersects"):
        if name in params:
            try:
                raw[name] = json.loads(params[name])
            except json.JSONDecodeError:
                raise ApiError(422, f"{name} must be a JSON object") from None
    if "bbox" in params:  # 4.3,51.8,4.5,52.0 or a JSON list
        text = params["bbox"].strip()
        try:
            raw["bbox"] = json.loads(text) if text.startswith("[") else [float(v) for v in text.split(",")]
        except (json.JSONDecodeError, ValueError):
            raise ApiError(422, f"bbox must be min_lon,min_lat,max_lon,max_lat, got {text!r}") from None
    if "datetime" in params:
        raw["datetime"] = params["datetime"]
    if "scene" in params:
        text = params["scene"].strip()
        try:
            raw["scene"] = json.loads(text) if text.startswith("[") else text
        except json.JSONDecodeError:
            raise ApiError(422, f"scene must be a scene id or a JSON list of ids, got {text!r}") from None
    for name in ("include_thumbnails", "nms"):
        if name in params:
            raw[name] = params[name].lower() in ("1", "true", "yes")
    query = _validate(_Request, raw)
    check_common(query, limits)
    return query


Target = Literal["images", "captions"]
