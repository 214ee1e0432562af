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
import copy
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
    # strict: `"k": true` or `"k": "5"` is a 422, not k=1 / k=5 (JSON numbers still fill floats)
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("k", mode="before")
    @classmethod
    def _integral_number(cls, value: Any) -> Any:
        """5.0 is the JSON integer 5 (JSON Schema counts it an integer); 5.5 and true stay refused."""
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

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
    model_config = ConfigDict(extra="forbid", strict=True)

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


# A character that is not blank, as Python's str.isspace has it, written out so that JSON
# Schema's ECMA-262 regexes (whose \s differs: no U+001C-U+001F or U+0085, but U+FEFF) and the
# handler agree on which texts are empty.
NOT_BLANK = r"[^\t\n\u000b\f\r\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


def check_text_query(query: TextQuery, limits: Limits) -> None:
    if not re.search(NOT_BLANK, query.text):
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


def single_values(pairs: list[tuple[str, Any]], what: str) -> dict[str, Any]:
    """Query-string or form fields as a dict, refusing a field given more than once (422)."""
    values: dict[str, Any] = {}
    for key, value in pairs:
        if key in values:
            raise ApiError(422, f"{what} field {key!r} is given more than once; give it once")
        values[key] = value
    return values


def parse_image_params(params: dict[str, str], limits: Limits) -> _Request:
    """k/filters/include_thumbnails from query-string or form fields (raw and multipart uploads)."""
    raw: dict[str, Any] = {}
    known = {"k", "filters", "include_thumbnails", "bbox", "intersects", "datetime", "scene", "nms", "format"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ApiError(422, f"unknown parameter(s): {', '.join(unknown)}")
    if "k" in params:
        if not re.fullmatch(r"[+-]?[0-9]+", params["k"].strip()):
            raise ApiError(422, f"k must be an integer, got {params['k']!r}")
        raw["k"] = int(params["k"])
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
            if params[name].lower() not in BOOLEANS:
                raise ApiError(422, f"{name} must be true or false, got {params[name]!r}")
            raw[name] = BOOLEANS[params[name].lower()]
    query = _validate(_Request, raw)
    check_common(query, limits)
    return query


PLACE_FIELDS = ("bbox", "intersects", "datetime", "scene")


def openapi_contract(spec: dict[str, Any], limits: Limits, scene_index: bool = False,
                     examples: dict[str, Any] | None = None) -> dict[str, Any]:
    """FastAPI's OpenAPI document of the app made exact for a deployment: every request model's
    `$defs` moved to `components/schemas` (so `#/components/schemas/TextQuery` resolves, where the
    embedded `#/$defs/TextQuery` did not), and the bounds the handlers enforce declared: k in
    1..max_top_k, text of 1..max_text_chars with a non-blank character, 1..max_batch_queries
    queries, image_base64 base64, filters on the filterable columns only, each a value or a
    non-empty list; the place and time fields only for an index of scenes (any other answers
    them with 422); `examples` gives path parameters a served value (an item id that has a
    thumbnail), so a client or a fuzzer can fetch a real one."""
    spec = copy.deepcopy(spec)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    pending: list[Any] = [spec]
    while pending:
        node = pending.pop()
        if isinstance(node, list):
            pending.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for name, schema in (node.pop("$defs", None) or {}).items():
            schemas.setdefault(name, schema)
            pending.append(schemas[name])
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            node["$ref"] = "#/components/schemas/" + ref[len("#/$defs/"):]
        props = node.get("properties")
        if isinstance(props, dict):
            _declare_bounds(props, limits)
            if not scene_index and "k" in props:
                for name in PLACE_FIELDS:
                    props.pop(name, None)
        pending.extend(node.values())
    for operation in (op for path in spec.get("paths", {}).values() for op in path.values()):
        for parameter in operation.get("parameters", []) if isinstance(operation, dict) else []:
            if parameter.get("in") == "path" and parameter.get("name") in (examples or {}):
                parameter["example"] = examples[parameter["name"]]
    return spec


def filters_schema() -> dict[str, Any]:
    from harma.serve.index import FILTER_COLUMNS

    # one schema with a list of types, not anyOf: a fuzzer's "wrong type" for one branch of an
    # anyOf can be the other branch, a valid value it then expects refused
    value = {"type": ["string", "array"], "items": {"type": "string"}, "minItems": 1}
    return {"type": "object", "additionalProperties": False, "properties": {c: value for c in FILTER_COLUMNS},
            "description": "Metadata filters on the image gallery (values compared as strings), e.g. "
            "{\"split\": \"test\", \"label\": [\"airport\", \"port\"]}."}


def _declare_bounds(props: dict[str, Any], limits: Limits) -> None:
    if isinstance(props.get("k"), dict) and props["k"].get("type") == "integer":
        props["k"].update(minimum=1, maximum=limits.max_top_k)
    if isinstance(props.get("text"), dict) and props["text"].get("type") == "string":
        props["text"].update(minLength=1, maxLength=limits.max_text_chars, pattern=NOT_BLANK)
    if isinstance(props.get("queries"), dict) and props["queries"].get("type") == "array":
        props["queries"].update(minItems=1, maxItems=limits.max_batch_queries)
    if isinstance(props.get("image_base64"), dict):
        props["image_base64"].update(minLength=1, contentEncoding="base64")
    if isinstance(props.get("filters"), dict):
        props["filters"] = filters_schema()


BOOLEANS = {"true": True, "false": False}  # a form or query field's text, as the document's boolean


Target = Literal["images", "captions"]
