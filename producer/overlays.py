"""Crack maps: per photo, a downsized copy with its crack tiles shaded by probability.

A survey is thousands of photos; a person checks it faster by looking at where
the cracks are than by reading tile boxes in a CSV.  Each map is the photo
(EXIF-oriented, at most :data:`MAX_SIDE` px) with every tile at or above the
threshold shaded from yellow (just at the threshold) to red (probability 1)
and outlined, and a caption bar saying what the colours mean.

Maps are drawn by the producer from the result records (a photo record
followed by its tile records, as ``crackq results --per-tile`` lists them),
so it must be able to read the photos; photos it cannot read are skipped with
a warning, never an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from shared import raster, storage
from shared.config import Settings
from shared.preprocessing import ImageError, load_rgb

log = logging.getLogger(__name__)

#: Longest side of a crack map in px: enough to see a tile of a 4000 px photo, small enough to mail.
MAX_SIDE = 1600
LOW, HIGH = np.array([255, 214, 0]), np.array([225, 20, 20])   # colour at the threshold / at probability 1
ALPHA_LOW, ALPHA_HIGH = 0.25, 0.5
CAPTION = 28


def write_overlays(records: Iterable[dict], out_dir: str | os.PathLike, threshold: float = 0.5,
                   max_side: int = MAX_SIDE) -> list[Path]:
    """Write one ``<photo name>.jpg`` crack map per tiled photo in ``records``; return the files written.

    Small images (classified whole, so no tile records) and error records get no map.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    taken: set[str] = set()
    for photo, tiles in photos_with_tiles(records):
        if photo.get("error") or not tiles:
            continue
        try:
            image = render(photo, tiles, threshold, max_side)
        except (ImageError, OSError) as exc:
            log.warning("no crack map for %s: %s", photo["path"], exc)
            continue
        target = out / map_name(photo["path"], taken)
        image.save(target, quality=88)
        written.append(target)
    return written


def photos_with_tiles(records: Iterable[dict]) -> Iterator[tuple[dict, list[dict]]]:
    """``(photo record, its tile records)`` from a stream where tile records follow their photo's."""
    photo, tiles = None, []
    for record in records:
        if "tile" in record:
            if photo is not None and record.get("path") == photo.get("path"):
                tiles.append(record)
            continue
        if photo is not None:
            yield photo, tiles
        photo, tiles = record, []
    if photo is not None:
        yield photo, tiles


def map_name(photo_path: str, taken: set[str]) -> str:
    """``<stem>.jpg``, or ``<stem>-<hash of the full path>.jpg`` when another photo already took the stem."""
    stem = Path(photo_path).stem
    name = f"{stem}.jpg"
    if name in taken:
        name = f"{stem}-{hashlib.sha1(photo_path.encode()).hexdigest()[:8]}.jpg"
    taken.add(name)
    return name


def render(photo: dict, tiles: list[dict], threshold: float, max_side: int = MAX_SIDE) -> Image.Image:
    """The crack map of one photo (RGB)."""
    width, height = int(photo["width"]), int(photo["height"])
    scale = min(1.0, max_side / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    base = _base(photo["path"], size, scale, "windows" in photo)
    if base.size != size:
        base = base.resize(size, Image.Resampling.BILINEAR)
    prob = probability_map(tiles, size, scale)
    shaded = shade(base, prob, threshold)
    _outline(shaded, tiles, threshold, scale)
    return _with_caption(shaded, photo, tiles, threshold)


def _base(path: str, size: tuple[int, int], scale: float, windowed: bool) -> Image.Image:
    """The photo at map size: JPEG decoded at 1/2..1/8 when that is enough; a raster read decimated (issue 12)."""
    if windowed:
        return raster.read_reduced(path, size)
    settings = Settings.load()
    return load_rgb(storage.source(path, settings.max_file_bytes), max_pixels=settings.max_pixels,
                    max_file_bytes=settings.max_file_bytes, draft_scale=scale)


def probability_map(tiles: list[dict], size: tuple[int, int], scale: float) -> np.ndarray:
    """Per pixel of the map, the highest probability of the tiles covering it (overlapping tiles)."""
    prob = np.zeros((size[1], size[0]), np.float32)
    for t in tiles:
        x0, y0 = round(t["x"] * scale), round(t["y"] * scale)
        x1, y1 = round((t["x"] + t["w"]) * scale), round((t["y"] + t["h"]) * scale)
        region = prob[y0:y1, x0:x1]
        np.maximum(region, float(t["crack_probability"] or 0.0), out=region)
    return prob


def shade(base: Image.Image, prob: np.ndarray, threshold: float) -> Image.Image:
    """Blend a yellow→red tint, stronger with probability, over pixels at or above ``threshold``."""
    rgb = np.asarray(base, np.float32)
    crack = prob >= threshold
    t = np.clip((prob - threshold) / max(1e-6, 1.0 - threshold), 0.0, 1.0)[..., None]
    colour = LOW * (1 - t) + HIGH * t
    alpha = (ALPHA_LOW + (ALPHA_HIGH - ALPHA_LOW) * t) * crack[..., None]
    return Image.fromarray(np.clip(rgb * (1 - alpha) + colour * alpha, 0, 255).astype(np.uint8), "RGB")


def _outline(img: Image.Image, tiles: list[dict], threshold: float, scale: float) -> None:
    draw = ImageDraw.Draw(img)
    for t in tiles:
        p = float(t["crack_probability"] or 0.0)
        if p < threshold:
            continue
        k = min(1.0, max(0.0, (p - threshold) / max(1e-6, 1.0 - threshold)))
        colour = tuple(int(v) for v in LOW * (1 - k) + HIGH * k)
        box = [round(t["x"] * scale), round(t["y"] * scale),
               round((t["x"] + t["w"]) * scale) - 1, round((t["y"] + t["h"]) * scale) - 1]
        draw.rectangle(box, outline=colour, width=2 if img.width >= 800 else 1)


def _with_caption(img: Image.Image, photo: dict, tiles: list[dict], threshold: float) -> Image.Image:
    """A bar under the map: file name, crack tile count, and the colour scale."""
    out = Image.new("RGB", (img.width, img.height + CAPTION), (24, 24, 24))
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=15)
    n_crack = sum(1 for t in tiles if (t["crack_probability"] or 0.0) >= threshold)
    text = (f"{Path(photo['path']).name}: {n_crack}/{len(tiles)} tiles with crack probability >= "
            f"{threshold:g} (max {float(photo.get('max_crack_probability') or 0):.2f})")
    if photo.get("in_domain") is False:
        text += "  -  unfamiliar imagery, check by eye"
    y = img.height + (CAPTION - 15) // 2
    draw.text((8, y - 1), text, fill=(235, 235, 235), font=font)
    _scale_bar(draw, out.width, y, threshold, font)
    return out


def _scale_bar(draw: ImageDraw.ImageDraw, width: int, y: int, threshold: float, font) -> None:
    bar_w = 120
    if width < 700:
        return
    x0 = width - bar_w - 40
    for i in range(bar_w):
        t = i / (bar_w - 1)
        draw.line([x0 + i, y, x0 + i, y + 13], fill=tuple(int(v) for v in LOW * (1 - t) + HIGH * t))
    draw.text((x0 - 8 - draw.textlength(f"{threshold:g}", font=font), y - 1), f"{threshold:g}",
              fill=(235, 235, 235), font=font)
    draw.text((x0 + bar_w + 6, y - 1), "1", fill=(235, 235, 235), font=font)
