"""Result files: CSV (one row per image), JSON lines, and GeoJSON for GIS tools.

CSV columns are :data:`shared.contract.RESULT_COLUMNS` in that order; GeoJSON
holds one Point feature per photo that has GPS (``[longitude, latitude(,
altitude)]``, WGS84 as RFC 7946 requires) with the result fields as properties,
and one Polygon per crack tile of a georeferenced raster (every tile with
``--per-tile``), reprojected to WGS84 (:mod:`producer.mapping`); ``gpkg`` writes
the same polygons to a GeoPackage in the raster's own CRS.

Files must be safe to open (docs/reliability.md, *Result files*): a CSV text
cell that a spreadsheet would run as a formula (``= + - @``, tab, CR first) is
prefixed with ``'``; numbers are written as numbers (a longitude of -3.5 stays
-3.5); JSON never holds NaN or Infinity (``allow_nan=False``; they are null
from the records on); a file name that is not UTF-8 (Python's
surrogate-escaped ``str``) is written as its original bytes.
"""

from __future__ import annotations

import csv
import json
import math
from typing import IO, Iterable

from shared.contract import RESULT_COLUMNS, TILE_COLUMNS, finite

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


#: First characters that make a spreadsheet treat a cell as a formula (OWASP "CSV injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def open_results_file(path: str) -> IO[str]:
    """A results file for writing: UTF-8, and names that are not UTF-8 written as their original bytes."""
    return open(path, "w", newline="", encoding="utf-8", errors="surrogateescape")


def write(records: Iterable[dict], out: IO[str], fmt: str, columns=RESULT_COLUMNS, all_tiles: bool = False) -> int:
    if fmt == "geojson":  # issue 12: tile polygons of georeferenced rasters (all of them with all_tiles)
        return write_geojson(records, out, all_tiles=all_tiles)
    if fmt == "gpkg":
        raise ValueError("a GeoPackage is a file: give --output/--out FILE.gpkg")
    writer = {"csv": write_csv, "jsonl": write_jsonl}[fmt]
    return writer(records, out, columns) if fmt == "csv" else writer(records, out)


def write_csv(records: Iterable[dict], out: IO[str], columns=RESULT_COLUMNS) -> int:
    writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    # Python's csv quotes a field holding "\n" (the line terminator) but not one holding a bare "\r",
    # which readers then take for a line break: such rows are written with every field quoted.
    quoted = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n",
                            quoting=csv.QUOTE_ALL)
    writer.writeheader()
    n = 0
    for record in records:
        row = {k: _cell(record.get(k)) for k in columns}
        (quoted if any(isinstance(v, str) and "\r" in v for v in row.values()) else writer).writerow(row)
        n += 1
    return n


def write_jsonl(records: Iterable[dict], out: IO[str]) -> int:
    n = 0
    for record in records:
        out.write(json.dumps(finite(record), ensure_ascii=False, allow_nan=False) + "\n")
        n += 1
    return n


def write_geojson(records: Iterable[dict], out: IO[str], all_tiles: bool = False) -> int:
    from producer.mapping import tile_features  # issue 12

    records = list(records)
    features = [feature(r) for r in records if _has_position(r) and "tile" not in r]
    features += tile_features(records, all_tiles)  # issue 12: crack tiles of georeferenced rasters, in WGS84
    json.dump(finite({"type": "FeatureCollection", "features": features}), out, ensure_ascii=False,
              allow_nan=False)
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
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value  # text only: numbers are never strings here, so -3.5 stays a number
    return value

