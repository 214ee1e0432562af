"""Place search scored against ground-truth object footprints: for each class query ("storage
tanks"), how many of the top-k tiles (overlaps suppressed, as the API answers) hold an object of
that class, and how many of the class's objects those tiles find.

    harma eval --geo --index runs/index-scenes --truth data/scenes/ground_truth.geojson [--k 10]
               [--bbox min_lon,min_lat,max_lon,max_lat] [--scene ID ...]

precision@k = top-k tiles containing the centre of at least one object of the class / k (a search
that returns fewer than k tiles counts the missing ones as misses); recall = objects of the class in
the searched area whose centre lies in one of the top-k tiles / objects of the class there. The
mean over classes is reported beside each class.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from harma import storage
from harma.geo.query import NMS_POOL, PlaceQuery, suppress_overlaps


def read_truth(uri: str) -> list[dict[str, Any]]:
    """Ground-truth objects: {"class", "scene", "centre": shapely Point} of a GeoJSON FeatureCollection."""
    from shapely.geometry import shape

    features = json.loads(storage.read_bytes(uri)).get("features", [])
    return [{"class": f["properties"]["class"], "scene": f["properties"].get("scene"),
             "centre": shape(f["geometry"]).centroid} for f in features]


def place_search_scores(index, encoder, truth: list[dict], k: int = 10, place: PlaceQuery | None = None,
                        classes: list[str] | None = None) -> dict[str, Any]:
    """Per class and mean precision@k and recall of place search over a scene index."""
    import shapely

    tiles = index.tiles
    mask = index.place_mask(place) if place is not None else None
    area_ok = np.ones(len(truth), bool)
    if place is not None and not place.empty:
        from shapely.geometry import box

        centres = np.array([t["centre"] for t in truth], dtype=object)
        if place.bbox is not None:
            area_ok &= shapely.intersects(centres, box(*place.bbox))
        if place.geometry is not None:
            area_ok &= shapely.intersects(centres, place.geometry)
        if place.scenes:
            area_ok &= np.isin([t["scene"] for t in truth], list(place.scenes))
        if place.start is not None or place.end is not None:  # objects of scenes acquired in the interval
            in_time = set(np.asarray(tiles.scenes)[mask]) if mask is not None else set()
            area_ok &= np.isin([t["scene"] for t in truth], list(in_time))
    classes = classes or sorted({t["class"] for t in truth})
    queries = encoder.encode_texts(classes).cpu().numpy()
    scores = queries @ index.image_emb.T  # (classes, tiles)
    if mask is not None:
        scores = np.where(mask[None, :], scores, -np.inf)
    per_class = {}
    for c, name in enumerate(classes):
        order = [int(r) for r in np.argsort(-scores[c])[: k * NMS_POOL] if np.isfinite(scores[c, r])]
        top = suppress_overlaps(order, tiles.geometries)[:k]
        objects = [t["centre"] for t, ok in zip(truth, area_ok, strict=True) if ok and t["class"] == name]
        points = np.array(objects, dtype=object)
        hits, found = 0, np.zeros(len(objects), bool)
        for row in top:
            inside = shapely.contains(tiles.geometries[row], points) if len(points) else np.zeros(0, bool)
            hits += bool(inside.any())
            found |= inside
        per_class[name] = {"precision_at_k": hits / k, "recall": float(found.mean()) if len(objects) else None,
                           "objects": len(objects), "tiles_returned": len(top)}
    recalls = [v["recall"] for v in per_class.values() if v["recall"] is not None]
    return {"k": k, "classes": per_class,
            "mean_precision_at_k": float(np.mean([v["precision_at_k"] for v in per_class.values()])),
            "mean_recall": float(np.mean(recalls)) if recalls else None, "tiles_searched":
            int(mask.sum()) if mask is not None else index.size}


def format_scores(result: dict[str, Any]) -> str:
    k = result["k"]
    lines = [f"{'class':<16}{f'P@{k}':>8}{'recall':>9}{'objects':>9}"]
    for name, v in result["classes"].items():
        recall = "-" if v["recall"] is None else f"{100 * v['recall']:.1f}"
        lines.append(f"{name:<16}{100 * v['precision_at_k']:>8.1f}{recall:>9}{v['objects']:>9}")
    mean_recall = "-" if result["mean_recall"] is None else f"{100 * result['mean_recall']:.1f}"
    lines.append(f"{'mean':<16}{100 * result['mean_precision_at_k']:>8.1f}{mean_recall:>9}")
    return "\n".join(lines)
