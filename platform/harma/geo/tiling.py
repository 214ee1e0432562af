"""Tiling plans and tile footprints (pure: no file is opened here).

    windows = plan_tiles(width, height, tile_size=256, stride=128)   # [(col, row, w, h), ...]
    ring = window_footprint(transform, "EPSG:32633", window)          # WGS84 polygon (shapely)

A plan covers the whole scene: tiles every `stride` pixels from the top-left corner, and one more
tile flush with the right (bottom) edge when the last stride leaves a strip uncovered, so no pixel
is missed and no tile is smaller than `tile_size` (a scene smaller than a tile is one tile of the
scene's size). With a target ground resolution the tile covers `tile_size * target_gsd` metres
(`native_tile_pixels`) and is resampled to `tile_size` pixels when read.

Footprints are reprojected with rasterio's (GDAL/PROJ) transform, the tile's edges densified so a
tile in a projected CRS keeps its true shape in longitude/latitude.
"""

from __future__ import annotations

import math

import numpy as np
from affine import Affine
from shapely.geometry import Polygon

Window = tuple[int, int, int, int]  # col_off, row_off, width, height (pixels)
EDGE_POINTS = 4  # points per tile edge in a footprint (corners included)


def _offsets(extent: int, tile: int, stride: int) -> list[int]:
    if extent <= tile:
        return [0]
    offsets = list(range(0, extent - tile + 1, stride))
    if offsets[-1] + tile < extent:
        offsets.append(extent - tile)
    return offsets


def plan_tiles(width: int, height: int, tile_size: int, stride: int | None = None) -> list[Window]:
    """Windows of `tile_size` pixels every `stride` (default: `tile_size`, no overlap), row by row."""
    stride = stride or tile_size
    if tile_size < 1 or stride < 1:
        raise ValueError(f"tile_size and stride must be positive, got {tile_size} and {stride}")
    if stride > tile_size:
        raise ValueError(f"stride {stride} > tile_size {tile_size} would leave gaps between tiles")
    w, h = min(tile_size, width), min(tile_size, height)
    return [(c, r, w, h) for r in _offsets(height, tile_size, stride) for c in _offsets(width, tile_size, stride)]


def native_tile_pixels(tile_size: int, native_gsd: float, target_gsd: float | None) -> int:
    """Native pixels a tile spans so that, resampled to `tile_size`, it has `target_gsd` metres per pixel."""
    if target_gsd is None:
        return tile_size
    if target_gsd <= 0:
        raise ValueError(f"target ground resolution must be positive, got {target_gsd}")
    return max(1, int(round(tile_size * target_gsd / native_gsd)))


def ground_resolution(transform: Affine) -> float:
    """Metres (CRS units) per pixel: the mean of the pixel's two side lengths."""
    return float((math.hypot(transform.a, transform.d) + math.hypot(transform.b, transform.e)) / 2)


def window_ring(transform: Affine, window: Window, points: int = EDGE_POINTS) -> np.ndarray:
    """(4 * (points - 1) + 1, 2) coordinates, in the scene's CRS, of the window's outline
    (clockwise from the top-left corner, closed)."""
    col, row, w, h = window
    t = np.linspace(0.0, 1.0, points)[:-1]
    cols = np.concatenate([col + t * w, np.full_like(t, col + w), col + w - t * w, np.full_like(t, col)])
    rows = np.concatenate([np.full_like(t, row), row + t * h, np.full_like(t, row + h), row + h - t * h])
    xs = transform.a * cols + transform.b * rows + transform.c  # pixel corner -> CRS coordinates
    ys = transform.d * cols + transform.e * rows + transform.f
    ring = np.column_stack([xs, ys])
    return np.vstack([ring, ring[:1]])


def to_wgs84(crs: str, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from rasterio.warp import transform as warp

    lon, lat = warp(crs, "EPSG:4326", list(map(float, xs)), list(map(float, ys)))
    return np.asarray(lon), np.asarray(lat)


def window_footprint(transform: Affine, crs: str, window: Window) -> Polygon:
    """The window's footprint in WGS84 longitude/latitude."""
    ring = window_ring(transform, window)
    lon, lat = to_wgs84(crs, ring[:, 0], ring[:, 1])
    return Polygon(np.column_stack([lon, lat]))


def footprints(transform: Affine, crs: str, windows: list[Window]) -> list[Polygon]:
    """Footprints of many windows with one reprojection call."""
    if not windows:
        return []
    rings = [window_ring(transform, w) for w in windows]
    flat = np.vstack(rings)
    lon, lat = to_wgs84(crs, flat[:, 0], flat[:, 1])
    n = len(rings[0])
    return [Polygon(np.column_stack([lon[i * n:(i + 1) * n], lat[i * n:(i + 1) * n]])) for i in range(len(rings))]
