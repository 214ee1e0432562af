"""GeoParquet (1.1) tables: a WKB `geometry` column, a `bbox` covering column and the `geo` file
metadata with the CRS, so geopandas, DuckDB spatial and QGIS open the file as it is.

    table = geoparquet_table({"id": [...], "geometry": [wkb, ...], ...})
    pq.write_table(table, path)
    geopandas.read_parquet(path)     # a GeoDataFrame in OGC:CRS84 (WGS84 lon/lat)
"""

from __future__ import annotations

import json

import pyarrow as pa

GEOPARQUET_VERSION = "1.1.0"


def crs84_projjson() -> dict:
    """PROJJSON of OGC:CRS84 (WGS84 with longitude first), GeoParquet's default CRS, written out."""
    from rasterio.crs import CRS

    return CRS.from_string("OGC:CRS84").to_dict(projjson=True)


def geoparquet_table(columns: dict[str, list], geometry: str = "geometry") -> pa.Table:
    """`columns` (one of them WKB geometries in lon/lat) as a GeoParquet table."""
    import shapely

    geoms = shapely.from_wkb(columns[geometry])
    bounds = shapely.bounds(geoms)
    bbox = pa.StructArray.from_arrays([pa.array(bounds[:, i], pa.float64()) for i in range(4)],
                                      names=["xmin", "ymin", "xmax", "ymax"])
    table = pa.table({**{k: v for k, v in columns.items() if k != geometry},
                      geometry: pa.array(columns[geometry], pa.binary()), "bbox": bbox})
    types = sorted({t for t in shapely.get_type_id(geoms).tolist()})
    names = {0: "Point", 1: "LineString", 3: "Polygon", 4: "MultiPoint", 5: "MultiLineString", 6: "MultiPolygon"}
    meta = {"version": GEOPARQUET_VERSION, "primary_column": geometry,
            "columns": {geometry: {"encoding": "WKB", "geometry_types": [names.get(t, "Unknown") for t in types],
                                   "crs": crs84_projjson(), "edges": "planar",
                                   "bbox": [float(bounds[:, 0].min()), float(bounds[:, 1].min()),
                                            float(bounds[:, 2].max()), float(bounds[:, 3].max())] if len(bounds) else [],
                                   "covering": {"bbox": {"xmin": ["bbox", "xmin"], "ymin": ["bbox", "ymin"],
                                                         "xmax": ["bbox", "xmax"], "ymax": ["bbox", "ymax"]}}}}}
    return table.replace_schema_metadata({**(table.schema.metadata or {}), b"geo": json.dumps(meta).encode()})
