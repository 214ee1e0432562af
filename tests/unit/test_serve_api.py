"""Request parsing of the HTTP API: every client mistake is a 4xx ApiError with a clear message."""

import base64
import io
import re
import zlib

import numpy as np
import pytest
from PIL import Image

from harma.serve.api import (
    ApiError,
    Limits,
    ServeArgs,
    decode_base64,
    parse_image_json,
    parse_image_params,
    parse_text_queries,
    parse_text_query,
    single_values,
)
from harma.serve.encoder import UnreadableImageError, decode_query_image

LIMITS = Limits(max_top_k=20, max_text_chars=50, max_batch_queries=3)
JSON = "application/json"


def _png(w=40, h=30):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_text_query_ok():
    q = parse_text_query(b'{"text": "two bridges", "k": 5, "filters": {"split": ["test"]}}', JSON + "; charset=utf-8", LIMITS)
    assert (q.text, q.k, q.filters, q.include_thumbnails) == ("two bridges", 5, {"split": ["test"]}, False)
    q = parse_text_query(b'{"text": "two bridges", "k": 5.0}', JSON, LIMITS)  # JSON Schema's integer 5
    assert type(q.k) is int and q.k == 5


@pytest.mark.parametrize("body, ctype, status, message", [
    (b'{"text": "x"}', "text/plain", 415, "expected Content-Type application/json"),
    (b'{"text": "x"}', None, 415, "got 'none'"),
    (b'\xff\xfe{"text": 1}', JSON, 400, "not valid UTF-8"),
    (b'{"text": "x",', JSON, 400, "malformed JSON"),
    (b'', JSON, 400, "body is empty"),
    (b'["x"]', JSON, 422, "must be a JSON object, got list"),
    (b'{"txt": "x"}', JSON, 422, "text: Field required"),
    (b'{"text": "x", "extra": 1}', JSON, 422, "extra: Extra inputs are not permitted"),
    (b'{"text": "   "}', JSON, 422, "text is empty"),
    (b'{"text": "' + b"a" * 51 + b'"}', JSON, 422, "text has 51 characters; the limit is 50"),
    (b'{"text": "x", "k": 0}', JSON, 422, "k must be between 1 and 20, got 0"),
    (b'{"text": "x", "k": 21}', JSON, 422, "got 21"),
    (b'{"text": "x", "k": "many"}', JSON, 422, "k: Input should be a valid integer"),
    (b'{"text": "x", "k": true}', JSON, 422, "k: Input should be a valid integer"),  # strict: not k=1
    (b'{"text": "x", "k": "5"}', JSON, 422, "k: Input should be a valid integer"),
    (b'{"text": "x", "k": 5.5}', JSON, 422, "k: Input should be a valid integer"),
    (b'{"text": "x", "include_thumbnails": 1}', JSON, 422, "include_thumbnails: Input should be a valid boolean"),
    (b'{"text": 7}', JSON, 422, "text: Input should be a valid string"),
    (b'{"text": "x", "filters": {"colour": "red"}}', JSON, 422, "cannot filter on 'colour'"),
    (b'{"text": "x", "filters": {"split": []}}', JSON, 422, "empty list"),
])
def test_text_query_errors(body, ctype, status, message):
    with pytest.raises(ApiError) as err:
        parse_text_query(body, ctype, LIMITS)
    assert err.value.status == status
    assert message in err.value.message


def test_image_json_and_base64():
    png = _png()
    body = (f'{{"image_base64": "{base64.b64encode(png).decode()}", "k": 3}}').encode()
    query, data = parse_image_json(body, JSON, LIMITS)
    assert data == png and query.k == 3
    assert decode_base64("data:image/png;base64," + base64.b64encode(png).decode()) == png
    with pytest.raises(ApiError, match="not valid base64") as err:
        decode_base64("@@@not base64@@@")
    assert err.value.status == 400
    with pytest.raises(ApiError, match="empty"):
        decode_base64("")


def test_image_params_from_query_string_or_form():
    q = parse_image_params({"k": "4", "filters": '{"label": "port"}', "include_thumbnails": "true"}, LIMITS)
    assert (q.k, q.filters, q.include_thumbnails) == (4, {"label": "port"}, True)
    for params, message in [({"k": "x"}, "k must be an integer"), ({"filters": "{"}, "JSON object"),
                            ({"kk": "1"}, r"unknown parameter\(s\): kk"), ({"k": "99"}, "between 1 and 20"),
                            ({"k": "4.0"}, "k must be an integer"), ({"k": "١"}, "k must be an integer"),
                            ({"nms": "maybe"}, "nms must be true or false, got 'maybe'"),
                            ({"include_thumbnails": "1"}, "include_thumbnails must be true or false, got '1'"),
                            ({"filters": '{"label": [null]}'}, "filters"), ({"filters": '{"label": 3}'}, "filters"),
                            ({"filters": '{"label": []}'}, "empty list"), ({"filters": '{"label": [["x"]]}'}, "filters"),
                            ({"filters": '["label"]'}, "valid dictionary")]:
        with pytest.raises(ApiError, match=message) as err:
            parse_image_params(params, LIMITS)
        assert err.value.status == 422


def test_query_image_decoding_and_limits():
    pixels = decode_query_image(_png(40, 30), 32)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.uint8 and int(pixels[0, 0, 0]) == 120
    with pytest.raises(UnreadableImageError, match="not a decodable image"):
        decode_query_image(b"GIF89a-but-not-really", 32)
    with pytest.raises(UnreadableImageError, match="truncated or corrupt"):
        decode_query_image(_png()[:60], 32)
    # A header that claims 100k x 100k pixels is refused before decoding.
    from harma.serve import encoder

    big = io.BytesIO()
    Image.new("L", (10, 10)).save(big, format="PNG")
    raw = bytearray(big.getvalue())
    for side in (9_000, 100_000):  # above our limit; above PIL's own bomb limit
        raw[16:24] = side.to_bytes(4, "big") * 2
        raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")  # keep the IHDR CRC valid
        with pytest.raises(UnreadableImageError, match="at most 64,000,000 pixels"):
            decode_query_image(bytes(raw), 32)
    assert encoder.MAX_IMAGE_PIXELS == 64_000_000


def test_serve_args_are_strict():
    args = ServeArgs(checkpoint_uri="c", index_uri="i")
    assert args.limits.max_top_k == 100
    with pytest.raises(ValueError, match="index"):
        ServeArgs(checkpoint_uri="c", index="i")


def test_batch_of_text_queries_ok_in_order():
    body = b'{"queries": [{"text": "two bridges", "k": 3}, {"text": "a port", "filters": {"split": "test"}}]}'
    queries = parse_text_queries(body, JSON, LIMITS)
    assert [(q.text, q.k, q.filters) for q in queries] == [("two bridges", 3, {}), ("a port", 10, {"split": "test"})]


@pytest.mark.parametrize("body, status, message", [
    (b'{"queries": []}', 422, "queries is empty"),
    (b'{"queries": [' + b", ".join([b'{"text": "x"}'] * 4) + b"]}", 422, "4 queries; the limit is 3 per request"),
    (b'{"queries": [{"text": "x"}, {"text": "  "}]}', 422, "queries[1]: text is empty"),
    (b'{"queries": [{"text": "x"}, {"text": "y"}, {"text": "z", "k": 21}]}', 422,
     "queries[2]: k must be between 1 and 20, got 21"),
    (b'{"queries": [{"text": "x", "filters": {"colour": "red"}}]}', 422, "queries[0]: cannot filter on 'colour'"),
    (b'{"queries": [{"k": 2}]}', 422, "queries.0.text: Field required"),
    (b'{"queries": "two bridges"}', 422, "queries: Input should be a valid list"),
    (b'{"texts": ["x"]}', 422, "queries: Field required"),
    (b'[{"text": "x"}]', 422, "must be a JSON object"),
    (b'{"queries": [', 400, "malformed JSON"),
])
def test_batch_of_text_queries_errors_name_the_query(body, status, message):
    with pytest.raises(ApiError) as err:
        parse_text_queries(body, JSON, LIMITS)
    assert err.value.status == status and message in err.value.message, err.value.message


def test_a_field_given_twice_is_refused_not_one_of_them_picked():
    assert single_values([("k", "3"), ("nms", "false")], "form") == {"k": "3", "nms": "false"}
    with pytest.raises(ApiError, match="form field 'k' is given more than once") as err:
        single_values([("k", "3"), ("k", "4")], "form")
    assert err.value.status == 422


def test_the_documented_non_blank_pattern_is_exactly_what_the_handler_calls_empty():
    """The document's text pattern and the handler agree on every code point (ECMA-262's \\s and
    Python's differ: a fuzzer sent "\\u001c", schema-valid under \\S, and got 422 'text is empty')."""
    from harma.serve.api import NOT_BLANK, TextQuery, check_text_query

    pattern = re.compile(NOT_BLANK)
    mismatched = [hex(c) for c in range(0x110000) if bool(pattern.fullmatch(chr(c))) == chr(c).isspace()]
    assert mismatched == []
    for text, empty in (("\u001c", True), ("\u0085 \u3000", True), ("\ufeff", False), ("a", False)):
        query = TextQuery.model_validate({"text": text})
        if empty:
            with pytest.raises(ApiError, match="text is empty"):
                check_text_query(query, LIMITS)
        else:
            check_text_query(query, LIMITS)


def test_the_openapi_document_resolves_its_references_and_declares_the_limits():
    from harma.serve.api import NOT_BLANK, TextQueries, openapi_contract

    raw = {"openapi": "3.1.0", "paths": {"/v1/text-to-images/batch": {"post": {"requestBody": {"content": {
        "application/json": {"schema": TextQueries.model_json_schema()}}}}}},
           "components": {"schemas": {"ErrorBody": {"type": "object"}}}}
    assert "$defs" in str(raw)  # as FastAPI embeds a route's own JSON schema
    spec = openapi_contract(raw, LIMITS)
    body = spec["paths"]["/v1/text-to-images/batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["queries"]["items"] == {"$ref": "#/components/schemas/TextQuery"}
    assert (body["properties"]["queries"]["minItems"], body["properties"]["queries"]["maxItems"]) == (1, 3)
    query = spec["components"]["schemas"]["TextQuery"]
    assert query["properties"]["text"] | {} == {"type": "string", "title": "Text", "description": "The query caption.",
                                                "minLength": 1, "maxLength": 50, "pattern": NOT_BLANK}
    assert (query["properties"]["k"]["minimum"], query["properties"]["k"]["maximum"]) == (1, 20)
    assert "ErrorBody" in spec["components"]["schemas"] and "$defs" not in str(spec)
    thumbs = {"openapi": "3.1.0", "paths": {"/v1/thumbnails/{item_id}": {"get": {"parameters": [
        {"name": "item_id", "in": "path", "required": True, "schema": {"type": "string"}},
        {"name": "item_id", "in": "query", "schema": {"type": "string"}}]}}}}
    params = openapi_contract(thumbs, LIMITS, examples={"item_id": "tile_7"})["paths"]["/v1/thumbnails/{item_id}"]
    assert [p.get("example") for p in params["get"]["parameters"]] == ["tile_7", None]  # path parameters only

    def refs(node):
        if isinstance(node, dict):
            yield from ([node["$ref"]] if "$ref" in node else [])
            for v in node.values():
                yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    for ref in refs(spec):  # every reference resolves
        target = spec
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
    assert "$defs" in str(raw)  # the input is left as it was
