"""Tile polygons of georeferenced rasters on the map: GeoJSON (WGS84) and GeoPackage (native CRS).

Workers store each tile of a georeferenced raster with its polygon in the
raster's CRS (``polygon``: a closed ring in map units) and the raster's
record carries that CRS (``crs``).  GeoJSON must be WGS84
longitude/latitude (RFC 7946 §4, no ``crs`` member), so rings are reprojected
with pyproj and wound counterclockwise (§3.1.6); the source CRS is kept in
each feature's properties.  A GeoPackage keeps the native CRS (one layer per
CRS), which is what a GIS wants for measuring.  Photos with EXIF GPS remain
points (:func:`producer.formats.feature`).
"""

from __future__ import annotations

import functools
import logging
from typing import Iterable, Iterator

from shared.contract import RESULT_COLUMNS, TILE_COLUMNS

log = logging.getLogger(__name__)

#: Properties of a tile feature (the polygon is its geometry).
TILE_PROPERTIES = tuple(c for c in TILE_COLUMNS if c != "polygon") + ("crs",)
WGS84 = "EPSG:4326"


def georeferenced_tiles(records: Iterable[dict], all_tiles: bool) -> Iterator[tuple[dict, str]]:
    """``(tile record, its raster's CRS)`` for tiles with a polygon: crack tiles, or all with ``all_tiles``."""
    crs = ""
    for record in records:
        if "tile" not in record:
            crs = record.get("crs") or ""
            continue
        if crs and record.get("polygon") and (all_tiles or record.get("label") == "crack"):
            yield record, crs


@functools.lru_cache(maxsize=16)
def _to_wgs84(crs: str):
    from pyproj import Transformer

    return Transformer.from_crs(crs, WGS84, always_xy=True)


def wgs84_ring(ring: list[list[float]], crs: str) -> list[list[float]]:
    """The ring in longitude/latitude, counterclockwise, closed."""
    xs, ys = _to_wgs84(crs).transform([p[0] for p in ring], [p[1] for p in ring])
    out = [[round(float(x), 9), round(float(y), 9)] for x, y in zip(xs, ys)]
    if _signed_area(out) < 0:
        out.reverse()
    return out


def _signed_area(ring: list[list[float]]) -> float:
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:])) / 2


def tile_features(records: Iterable[dict], all_tiles: bool) -> list[dict]:
    """GeoJSON Polygon features of the georeferenced tiles, in WGS84.

    Tiles in a CRS that cannot be transformed to WGS84 (an engineering or unknown CRS) are left out
    with one warning per CRS; they stay in the GeoPackage, CSV and JSONL output.
    """
    from pyproj.exceptions import CRSError, ProjError

    features, refused = [], set()
    for tile, crs in georeferenced_tiles(records, all_tiles):
        if crs in refused:
            continue
        try:
            ring = wgs84_ring(tile["polygon"], crs)
        except (CRSError, ProjError) as exc:
            refused.add(crs)
            log.warning("tiles in CRS %s left out of the GeoJSON: no transformation to WGS84 (%s)", crs, exc)
            continue
        properties = {k: tile.get(k) for k in TILE_PROPERTIES if k != "crs"}
        properties["crs"] = crs
        features.append({"type": "Feature", "properties": properties,
                         "geometry": {"type": "Polygon", "coordinates": [ring]}})
    return features


def write_gpkg(records: Iterable[dict], path: str, all_tiles: bool = False) -> int:
    """A GeoPackage of tile polygons (one layer ``tiles`` per CRS, native coordinates) and GPS photo points.

    Returns the features written; an empty result still writes nothing and returns 0.
    """
    import numpy as np
    import pyogrio.raw
    import shapely

    records = list(records)
    layers: dict[str, list[dict]] = {}
    for tile, crs in georeferenced_tiles(records, all_tiles):
        layers.setdefault(crs, []).append(tile)
    written = 0
    append = False
    for crs, tiles in layers.items():
        name = "tiles" if len(layers) == 1 else "tiles_" + crs.replace(":", "_")
        geometry = shapely.to_wkb(shapely.polygons([t["polygon"] for t in tiles]))
        fields = [k for k in TILE_PROPERTIES if k != "crs"]
        data = [_column([t.get(k) for t in tiles]) for k in fields]
        pyogrio.raw.write(path, geometry=np.asarray(geometry, dtype=object), field_data=data, fields=fields,
                          crs=crs, geometry_type="Polygon", driver="GPKG", layer=name, append=append)
        append = True
        written += len(tiles)
    photos = [r for r in records if "tile" not in r and r.get("latitude") is not None
              and r.get("longitude") is not None]
    if photos:
        geometry = shapely.to_wkb(shapely.points([[r["longitude"], r["latitude"]] for r in photos]))
        fields = [k for k in RESULT_COLUMNS if k not in ("latitude", "longitude")]
        data = [_column([r.get(k) for r in photos]) for k in fields]
        pyogrio.raw.write(path, geometry=np.asarray(geometry, dtype=object), field_data=data, fields=fields,
                          crs=WGS84, geometry_type="Point", driver="GPKG", layer="photos", append=append)
        written += len(photos)
    return written


def _column(values: list):
    """A typed column for OGR: numbers as float64 (None -> NaN), anything else as text."""
    import numpy as np

    present = [v for v in values if v is not None]
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return np.array(["" if v is None else (str(v).lower() if isinstance(v, bool) else str(v)) for v in values],
                    dtype=object)
