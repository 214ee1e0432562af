"""Place and time in queries (pure): parsing, the mask over a tile index, overlap suppression, GeoJSON.

    place = parse_place(bbox=[4.3, 51.8, 4.5, 52.0], datetime="2025-03-01/..", scene=None, intersects=None)
    mask = TileGeometry.from_columns(images).mask(place)        # (N,) bool, applied before top-k
    keep = suppress_overlaps(rows, tiles.geometries, iou=0.3)    # rows in score order -> the kept ones

Intervals follow STAC's `datetime` parameter: `start/end` with `..` for an open end, or one
instant; a date alone (`2025-03-01`) means the whole day (its start as a start, its end as an end).
Coordinates are WGS84 longitude/latitude (GeoJSON's order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timezone
from typing import Any

import numpy as np

NMS_IOU = 0.3  # tiles whose footprints overlap by more than this (intersection over union) show one object
NMS_POOL = 5  # candidates per requested hit that suppression chooses from


@dataclass(frozen=True)
class PlaceQuery:
    bbox: tuple[float, float, float, float] | None = None
    geometry: Any = None  # shapely geometry (from `intersects`)
    start: float | None = None  # POSIX seconds, inclusive
    end: float | None = None
    scenes: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self.bbox is None and self.geometry is None and self.start is None and self.end is None and not self.scenes


def parse_bbox(values: Any) -> tuple[float, float, float, float]:
    if not isinstance(values, list | tuple) or len(values) != 4:
        raise ValueError(f"bbox must be [min_lon, min_lat, max_lon, max_lat], got {values!r}")
    try:
        w, s, e, n = (float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"bbox must hold 4 numbers, got {values!r}") from None
    if not all(np.isfinite([w, s, e, n])):
        raise ValueError(f"bbox must hold finite numbers, got {values!r}")
    if not (-180 <= w <= 180 and -180 <= e <= 180 and -90 <= s <= 90 and -90 <= n <= 90):
        raise ValueError(f"bbox {values!r} is not longitude/latitude (lon in [-180, 180], lat in [-90, 90])")
    if s > n:
        raise ValueError(f"bbox {values!r}: min_lat {s} is north of max_lat {n}")
    if w > e:
        raise ValueError(f"bbox {values!r}: min_lon {w} is east of max_lon {e} (a box across the antimeridian "
                         "is not supported: send two queries)")
    return w, s, e, n


def _instant(text: str, end: bool) -> float:
    text = text.strip()
    try:
        if len(text) == 10:  # a date: the whole day
            day = date.fromisoformat(text)
            when = datetime.combine(day, time.max if end else time.min, tzinfo=timezone.utc)
        else:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
    except ValueError:
        raise ValueError(f"datetime {text!r} is not RFC 3339 (e.g. 2025-03-01T00:00:00Z) or a date (2025-03-01)") from None
    return when.timestamp()


def parse_interval(text: str) -> tuple[float | None, float | None]:
    """STAC `datetime`: 'start/end' ('..' or '' = open) or one instant -> (start, end) POSIX seconds."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("datetime must be a string like 2025-03-01T00:00:00Z/.. or 2025-01-01/2025-06-30")
    if "/" not in text:
        return _instant(text, end=False), _instant(text, end=True)
    if text.count("/") != 1:
        raise ValueError(f"datetime {text!r}: one '/' between start and end")
    lo, hi = (part.strip() for part in text.split("/"))
    start = None if lo in ("", "..") else _instant(lo, end=False)
    stop = None if hi in ("", "..") else _instant(hi, end=True)
    if start is None and stop is None:
        raise ValueError(f"datetime {text!r}: at least one end of the interval must be given")
    if start is not None and stop is not None and start > stop:
        raise ValueError(f"datetime {text!r}: the interval ends before it starts")
    return start, stop


def parse_intersects(geojson: Any):
    """A GeoJSON geometry (Polygon, MultiPolygon, Point ...) in lon/lat -> shapely geometry."""
    import shapely
    from shapely.geometry import shape

    if not isinstance(geojson, dict) or "type" not in geojson:
        raise ValueError("intersects must be a GeoJSON geometry object, e.g. {\"type\": \"Polygon\", "
                         "\"coordinates\": [[[lon, lat], ...]]}")
    try:
        geom = shape(geojson)
    except Exception as err:  # shapely raises several kinds for malformed coordinates
        raise ValueError(f"intersects is not a valid GeoJSON geometry: {err}") from None
    if geom.is_empty:
        raise ValueError("intersects is an empty geometry")
    w, s, e, n = geom.bounds
    if not (-180 <= w <= e <= 180 and -90 <= s <= n <= 90):
        raise ValueError(f"intersects has coordinates outside longitude/latitude (bounds {geom.bounds})")
    if not geom.is_valid:
        raise ValueError(f"intersects is not a valid geometry: {shapely.is_valid_reason(geom)}")
    return geom


def parse_place(bbox: Any = None, intersects: Any = None, datetime: str | None = None,
                scene: str | list[str] | None = None) -> PlaceQuery:
    """A query's place and time filters, validated (ValueError names the field)."""
    start = end = None
    if datetime is not None:
        start, end = parse_interval(datetime)
    scenes = () if scene is None else ((scene,) if isinstance(scene, str) else tuple(str(s) for s in scene))
    if scene is not None and not scenes:
        raise ValueError("scene has an empty list of values")
    return PlaceQuery(bbox=None if bbox is None else parse_bbox(bbox),
                      geometry=None if intersects is None else parse_intersects(intersects),
                      start=start, end=end, scenes=scenes)


@dataclass
class TileGeometry:
    """The footprints, times and scenes of an index's tiles, ready for masks."""

    geometries: np.ndarray  # shapely geometries (N,)
    bounds: np.ndarray  # (N, 4) min_lon, min_lat, max_lon, max_lat
    times: np.ndarray  # (N,) POSIX seconds, NaN when unknown
    scenes: np.ndarray  # (N,) object
    centres: np.ndarray  # (N, 2) lon, lat
    _tree: Any = field(default=None, repr=False)

    @classmethod
    def from_columns(cls, images: dict[str, list]) -> TileGeometry:
        import shapely

        geoms = shapely.from_wkb(np.asarray(images["geometry"], dtype=object))
        times = np.array([np.nan if not t else datetime.fromisoformat(str(t).replace("Z", "+00:00")).timestamp()
                          for t in images["datetime"]], dtype=np.float64)
        centres = np.column_stack([images["centre_lon"], images["centre_lat"]]).astype(np.float64)
        return cls(geoms, shapely.bounds(geoms), times, np.asarray(images["scene"], dtype=object), centres)

    def mask(self, place: PlaceQuery) -> np.ndarray:
        import shapely
        from shapely.geometry import box

        keep = np.ones(len(self.geometries), dtype=bool)
        if place.bbox is not None:
            keep &= shapely.intersects(self.geometries, box(*place.bbox))
        if place.geometry is not None:
            keep &= shapely.intersects(self.geometries, place.geometry)
        if place.start is not None:
            keep &= self.times >= place.start  # NaN (unknown time) never matches an interval
        if place.end is not None:
            keep &= self.times <= place.end
        if place.scenes:
            keep &= np.isin(self.scenes, list(place.scenes))
        return keep


def suppress_overlaps(rows: list[int], geometries: np.ndarray, iou: float = NMS_IOU) -> list[int]:
    """Greedy non-maximum suppression: `rows` in descending score order; a row is dropped when its
    footprint overlaps an already kept one by more than `iou` (intersection over union)."""
    import shapely

    kept: list[int] = []
    for row in rows:
        g = geometries[row]
        if kept:
            others = geometries[kept]
            inter = shapely.area(shapely.intersection(others, g))
            union = shapely.area(shapely.union(others, g))
            if np.any(inter > iou * np.maximum(union, 1e-30)):
                continue
        kept.append(row)
    return kept


def feature_collection(hits: list[dict[str, Any]], query: dict[str, Any]) -> dict[str, Any]:
    """Search hits (each with `geometry` as GeoJSON) -> a GeoJSON FeatureCollection, hit fields as properties."""
    features = [{"type": "Feature", "id": h["id"], "geometry": h.get("geometry"),
                 "properties": {k: v for k, v in h.items() if k not in ("geometry",)}} for h in hits]
    return {"type": "FeatureCollection", "features": features, "query": query}
