"""GPS and capture time from EXIF (written by Pillow as a camera does), and `crackq results --format geojson`:
a valid RFC 7946 FeatureCollection with one point per photo that has GPS."""

from __future__ import annotations

import csv
import json
import math

import pytest
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from benchmarks.common.imagery import GPS_PHOTO, ROTATED_PHOTO, gps_exif
from benchmarks.common.service import crackq_cli
from shared.exif import photo_metadata


# ---- EXIF -----------------------------------------------------------------------------------------
def _meta_of(tmp_path, exif) -> dict:
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 48), (90, 90, 90)).save(path, exif=exif)
    with Image.open(path) as img:
        return photo_metadata(img)


def test_gps_altitude_and_time_are_read_from_exif(tmp_path):
    meta = _meta_of(tmp_path, gps_exif(39.8912345, 32.7784321, 912.5, "2024:05:17 10:31:02"))
    assert meta == {"latitude": pytest.approx(39.8912345, abs=1e-6), "longitude": pytest.approx(32.7784321, abs=1e-6),
                    "altitude": 912.5, "captured_at": "2024-05-17T10:31:02"}


def test_southern_western_hemispheres_and_below_sea_level_are_negative(tmp_path):
    meta = _meta_of(tmp_path, gps_exif(-33.4489, -70.6693, -12.25))
    assert meta["latitude"] == pytest.approx(-33.4489, abs=1e-6)
    assert meta["longitude"] == pytest.approx(-70.6693, abs=1e-6)
    assert meta["altitude"] == -12.25


def test_photo_without_exif_or_with_broken_gps_has_no_position(tmp_path):
    assert _meta_of(tmp_path, Image.Exif()) == {}
    broken = Image.Exif()  # a zero denominator, as some firmware writes before it has a fix
    broken[0x8825] = {1: "N", 2: (IFDRational(1, 0), IFDRational(0, 1), IFDRational(0, 1)), 3: "E",
                      4: (1.0, 2.0, 3.0)}
    assert _meta_of(tmp_path, broken) == {}


# ---- GeoJSON from a real job -------------------------------------------------------------------------
def check_rfc7946_points(doc: dict) -> None:
    """The parts of RFC 7946 a FeatureCollection of points must satisfy (pure-python check)."""
    assert set(doc) <= {"type", "features", "bbox"} and doc["type"] == "FeatureCollection"
    assert "crs" not in doc  # RFC 7946 §4: WGS84 only, no crs member
    assert isinstance(doc["features"], list)
    for feature in doc["features"]:
        assert feature["type"] == "Feature"
        assert isinstance(feature["properties"], dict)
        geometry = feature["geometry"]
        assert geometry["type"] == "Point"
        coords = geometry["coordinates"]
        assert 2 <= len(coords) <= 3 and all(isinstance(c, (int, float)) and math.isfinite(c) for c in coords)
        lon, lat = coords[:2]
        assert -180 <= lon <= 180 and -90 <= lat <= 90  # longitude first (§3.1.1)


def test_results_as_geojson_place_each_photo_with_gps(survey_job, tmp_path):
    out = tmp_path / "survey.geojson"
    crackq_cli("results", survey_job.job_id, "--format", "geojson", "--output", str(out), env=survey_job.env)
    text = out.read_text()
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not valid JSON"))
    check_rfc7946_points(doc)
    photos = survey_job.expected["photos"]
    with_gps = {p: e["meta"] for p, e in photos.items() if e["meta"]}
    assert len(doc["features"]) == len(with_gps) == 2  # no GPS, no point; tiles are never points
    for feature in doc["features"]:
        props = feature["properties"]
        meta = with_gps[props["path"]]
        lon, lat, alt = feature["geometry"]["coordinates"]
        assert (lat, lon) == (pytest.approx(meta["lat"], abs=1e-6), pytest.approx(meta["lon"], abs=1e-6))
        assert alt == pytest.approx(meta["alt"])
        record = survey_job.photo(props["path"])
        for key in ("label", "crack_probability", "tiles", "crack_tiles", "crack_fraction",
                    "max_crack_probability", "in_domain", "domain_score", "captured_at", "model"):
            assert props[key] == record[key]
    assert {f["properties"]["captured_at"] for f in doc["features"]} == {
        "2024-05-17T10:31:02", "2024-05-18T08:00:00"}
    assert GPS_PHOTO["lat"] > 0 > ROTATED_PHOTO["lat"]


def test_photos_without_gps_are_still_in_csv(survey_job, tmp_path):
    out = tmp_path / "survey.csv"
    crackq_cli("results", survey_job.job_id, "--output", str(out), env=survey_job.env)
    rows = {r["path"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {r["path"] for r in survey_job.records if "tile" not in r}
    no_gps = next(p for p, e in survey_job.expected["photos"].items() if e["meta"] is None)
    assert rows[no_gps]["latitude"] == rows[no_gps]["longitude"] == "" and rows[no_gps]["label"]
    gps = next(p for p, e in survey_job.expected["photos"].items() if e["meta"] is GPS_PHOTO)
    assert float(rows[gps]["latitude"]) == pytest.approx(GPS_PHOTO["lat"], abs=1e-6)
    assert float(rows[gps]["altitude"]) == GPS_PHOTO["alt"]
