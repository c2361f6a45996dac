"""Where and when a photo was taken, from its EXIF block (Pillow's own readers).

Drone photos carry GPS position and capture time; results put them beside
each photo so ``crackq results --format geojson`` can place it on a map.
"""

from __future__ import annotations

import math

from PIL import ExifTags, Image

_GPS = ExifTags.GPS
_DATETIME_ORIGINAL = 0x9003
_DATETIME = 0x0132


def photo_metadata(img: Image.Image) -> dict:
    """``latitude``, ``longitude`` (decimal degrees, WGS84), ``altitude`` (m), ``captured_at`` (ISO 8601).

    Keys are present only when the photo has them; a malformed EXIF block gives ``{}``.
    """
    try:
        exif = img.getexif()
    except Exception:  # noqa: BLE001 - broken EXIF must never lose the image
        return {}
    meta: dict = {}
    try:
        meta.update(_gps(exif.get_ifd(ExifTags.IFD.GPSInfo)))
    except Exception:  # noqa: BLE001
        pass
    try:
        when = exif.get_ifd(ExifTags.IFD.Exif).get(_DATETIME_ORIGINAL) or exif.get(_DATETIME)
        if when:
            meta["captured_at"] = _iso(str(when))
    except Exception:  # noqa: BLE001
        pass
    return meta


def _gps(gps: dict) -> dict:
    out = {}
    lat, lon = gps.get(_GPS.GPSLatitude), gps.get(_GPS.GPSLongitude)
    if lat and lon:
        latitude = _degrees(lat) * (-1 if str(gps.get(_GPS.GPSLatitudeRef, "N")).upper().startswith("S") else 1)
        longitude = _degrees(lon) * (-1 if str(gps.get(_GPS.GPSLongitudeRef, "E")).upper().startswith("W") else 1)
        if -90 <= latitude <= 90 and -180 <= longitude <= 180:
            out["latitude"] = round(latitude, 7)
            out["longitude"] = round(longitude, 7)
    alt = gps.get(_GPS.GPSAltitude)
    if alt is not None:
        ref = gps.get(_GPS.GPSAltitudeRef, 0)
        below = ref in (1, b"\x01") or ref == "1"
        altitude = float(alt)
        if math.isfinite(altitude):  # a zero denominator gives NaN: no altitude rather than invalid JSON
            out["altitude"] = round(altitude * (-1 if below else 1), 2)
    return out


def _degrees(dms) -> float:
    d, m, s = (float(v) for v in dms)
    value = d + m / 60.0 + s / 3600.0
    return value if math.isfinite(value) else math.nan  # NaN fails the range check: no position


def _iso(exif_time: str) -> str:
    # EXIF writes "YYYY:MM:DD HH:MM:SS".
    date, _, time = exif_time.strip().partition(" ")
    return f"{date.replace(':', '-')}T{time}" if time else date.replace(":", "-")
