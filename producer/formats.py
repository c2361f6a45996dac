"""Result files: CSV (one row per image), JSON lines, and GeoJSON for GIS tools.

CSV columns are :data:`shared.contract.RESULT_COLUMNS` in that order; GeoJSON
holds one Point feature per photo that has GPS (``[longitude, latitude(,
altitude)]``, WGS84 as RFC 7946 requires) with the result fields as properties,
and one Polygon per crack tile of a georeferenced raster (every tile with
``--per-tile``), reprojected to WGS84 (:mod:`producer.mapping`); ``gpkg`` writes
the same polygons to a GeoPackage in the raster's own CRS.
"""

from __future__ import annotations

import csv
import json
from typing import IO, Iterable

from shared.contract import RESULT_COLUMNS, TILE_COLUMNS

#: CSV columns when per-tile records follow each photo's record.
PER_TILE_COLUMNS = RESULT_COLUMNS + tuple(c for c in TILE_COLUMNS if c not in RESULT_COLUMNS)

FORMATS = ("csv", "jsonl", "geojson", "gpkg")
#: Formats that place results on a map: they need the tile records of georeferenced rasters (issue 12).
MAP_FORMATS = ("geojson", "gpkg")


def format_for(filename: str | None, explicit: str | None) -> str:
    """``--format`` if given, else the output file's extension, else CSV."""
    if explicit:
        return explicit
    if filename:
        lower = filename.lower()
        if lower.endswith((".jsonl", ".ndjson")):
            return "jsonl"
        if lower.endswith((".geojson", ".json")):
            return "geojson"
        if lower.endswith(".gpkg"):
            return "gpkg"
    return "csv"


def write(records: Iterable[dict], out: IO[str], fmt: str, columns=RESULT_COLUMNS, all_tiles: bool = False) -> int:
    if fmt == "geojson":  # issue 12: tile polygons of georeferenced rasters (all of them with all_tiles)
        return write_geojson(records, out, all_tiles=all_tiles)
    if fmt == "gpkg":
        raise ValueError("a GeoPackage is a file: give --output/--out FILE.gpkg")
    writer = {"csv": write_csv, "jsonl": write_jsonl}[fmt]
    return writer(records, out, columns) if fmt == "csv" else writer(records, out)


def write_csv(records: Iterable[dict], out: IO[str], columns=RESULT_COLUMNS) -> int:
    writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    n = 0
    for record in records:
        writer.writerow({k: _cell(record.get(k)) for k in columns})
        n += 1
    return n


def write_jsonl(records: Iterable[dict], out: IO[str]) -> int:
    n = 0
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        n += 1
    return n


def write_geojson(records: Iterable[dict], out: IO[str], all_tiles: bool = False) -> int:
    from producer.mapping import tile_features  # issue 12

    records = list(records)
    features = [feature(r) for r in records if _has_position(r) and "tile" not in r]
    features += tile_features(records, all_tiles)  # issue 12: crack tiles of georeferenced rasters, in WGS84
    json.dump({"type": "FeatureCollection", "features": features}, out, ensure_ascii=False)
    out.write("\n")
    return len(features)


def feature(record: dict) -> dict:
    coords = [record["longitude"], record["latitude"]]
    if record.get("altitude") is not None:
        coords.append(record["altitude"])
    properties = {k: record.get(k) for k in RESULT_COLUMNS if k not in ("latitude", "longitude", "altitude")}
    return {"type": "Feature", "geometry": {"type": "Point", "coordinates": coords}, "properties": properties}


def _has_position(record: dict) -> bool:
    return record.get("latitude") is not None and record.get("longitude") is not None


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value

