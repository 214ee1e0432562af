"""Geospatial corpora: GeoTIFF / COG scenes tiled, footprinted and searched by place and time."""
