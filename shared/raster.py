"""Large rasters (orthomosaics, GeoTIFFs) read by windows with rasterio: never decoded whole.

An orthomosaic is one GeoTIFF of 20k-100k px a side.  The producer splits it
into *windows* of whole tiles of the job's tile grid (:func:`plan_windows`),
one task item each (``{"index", "path", "window": [x, y, w, h], "raster": [part,
parts]}``), so its windows spread over all workers; a worker reads only its
window (:func:`prepare_window`), skips tiles that are mostly nodata or
transparent, and classifies the rest exactly as it would tiles of a photo
(:func:`shared.preprocessing.tiles_to_inputs`).  Memory per worker is one or
two windows, whatever the raster's size.

Each tile of a georeferenced raster carries its polygon in the raster's own
CRS (map coordinates, from the affine geotransform); the producer reprojects
to WGS84 for GeoJSON and keeps the native CRS for GeoPackage.  A raster
without a CRS keeps pixel boxes only.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from shared import storage
from shared.config import default
from shared.preprocessing import INPUT_SIZE, Box, ImageError, PreparedImage, tile_grid, tiles_to_inputs

#: File extensions that are planned as rasters (read by GDAL) rather than decoded by Pillow.
RASTER_EXTENSIONS = (".tif", ".tiff")
#: A tile is classified only when at least this share of its pixels is valid (not nodata, not transparent).
MIN_VALID_SHARE = 0.5
#: GDAL block cache per worker process (MB) while a window is read.
GDAL_CACHE_MB = 128
#: Decimal places of map coordinates in tile polygons (1 µm in metres, ~0.1 m in degrees).
COORD_DECIMALS = 6


@dataclass(frozen=True)
class RasterInfo:
    """A raster's header: size, bands and georeferencing (``crs`` empty when it has none)."""

    width: int
    height: int
    count: int
    crs: str
    transform: tuple[float, ...]

    @property
    def georeferenced(self) -> bool:
        return bool(self.crs)


@dataclass
class PreparedWindow(PreparedImage):
    """The model inputs of one window: ``boxes`` are in raster pixels; ``tile_ids`` number them in the raster."""

    window: list[int] = field(default_factory=list)
    tile_ids: list[int] = field(default_factory=list)
    polygons: list[list[list[float]]] | None = None
    crs: str = ""
    skipped: int = 0  # tiles of the window left out as nodata / transparent


def is_raster_name(path: str) -> bool:
    return path.lower().endswith(RASTER_EXTENSIONS)


@contextlib.contextmanager
def open_raster(path: str):
    """``rasterio.open`` for a local path or an ``s3://`` URL (range reads through s3fs, same credentials)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    # A raster without georeferencing is expected (pixel boxes): no warning per window on stderr.
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
    # GDAL's block cache defaults to 5 % of RAM per process; a window needs far less (memory stays bounded).
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR", GDAL_CACHEMAX=GDAL_CACHE_MB):
        try:
            if storage.is_remote(path):
                target = storage.parse(path)
                fs = storage.filesystem()
                try:  # a clear reason (no such key, access denied, unreachable) before GDAL hides it
                    fs.info(target.fs_path)
                except Exception as exc:  # noqa: BLE001
                    raise storage.reason_for(exc, path) from None
                dataset = rasterio.open(target.fs_path, opener=fs)
            else:
                dataset = rasterio.open(path)
        except RasterioIOError as exc:
            raise ImageError(f"corrupt or unreadable raster: {str(exc)[:120]}") from None
        with dataset:
            yield dataset


def opened_path(handle, path: str) -> str:
    """What GDAL should open for a window: the worker's already opened and checked file, not the path again.

    ``/proc/self/fd/N`` names the file the worker opened under its data roots, so a symlink swapped in
    after the check cannot redirect the read; s3:// URLs (no handle) and systems without /proc use ``path``.
    """
    if handle is None or not hasattr(handle, "fileno"):
        return path
    fd_path = f"/proc/self/fd/{handle.fileno()}"
    return fd_path if os.path.exists(fd_path) else path


def read_info(path: str) -> RasterInfo:
    with open_raster(path) as ds:
        return info_of(ds)


def info_of(ds) -> RasterInfo:
    crs = ds.crs.to_string() if ds.crs else ""
    return RasterInfo(ds.width, ds.height, ds.count, crs, tuple(ds.transform)[:6])


def plan_windows(width: int, height: int, tile: int, overlap: int, window: int) -> list[list[int]]:
    """Windows ``[x, y, w, h]`` that group whole tiles of ``tile_grid(width, height, tile, overlap)``.

    About ``window`` px a side (at least one tile), in row-major order; the
    union of the windows' own tile grids is exactly the raster's tile grid,
    so splitting changes nothing in the results.
    """
    xs = [b.x for b in tile_grid(width, 1, tile, overlap)]
    ys = [b.x for b in tile_grid(height, 1, tile, overlap)]
    tw, th = min(tile, width), min(tile, height)
    k = max(1, (window - overlap) // max(1, tile - overlap))
    out = []
    for r in range(0, len(ys), k):
        y0, y1 = ys[r], ys[min(r + k, len(ys)) - 1] + th
        for c in range(0, len(xs), k):
            x0, x1 = xs[c], xs[min(c + k, len(xs)) - 1] + tw
            out.append([x0, y0, x1 - x0, y1 - y0])
    return out


def window_tiles(width: int, height: int, window: list[int], tile: int, overlap: int) -> list[tuple[int, Box]]:
    """``(tile id in the raster, box in raster pixels)`` for each tile of ``window``."""
    x, y, w, h = window
    xs = [b.x for b in tile_grid(width, 1, tile, overlap)]
    col = {v: i for i, v in enumerate(xs)}
    row = {v: i for i, v in enumerate(b.x for b in tile_grid(height, 1, tile, overlap))}
    out = []
    for b in tile_grid(w, h, tile, overlap):
        gx, gy = x + b.x, y + b.y
        out.append((row[gy] * len(xs) + col[gx], Box(gx, gy, b.w, b.h)))
    return out


def prepare_window(path: str, window: list[int], *, size: int = INPUT_SIZE, tile: int = default("tile_size"), overlap: int = 0,
                   max_pixels: int = default("max_pixels")) -> PreparedWindow:
    """Read one window of a raster and make model inputs of its valid tiles."""
    x, y, w, h = (int(v) for v in window)
    if w < 1 or h < 1 or w * h > max_pixels:
        raise ImageError(f"bad raster window {window}")
    from rasterio.errors import RasterioError
    from rasterio.windows import Window

    with open_raster(path) as ds:
        info = info_of(ds)
        if x < 0 or y < 0 or x + w > info.width or y + h > info.height:
            raise ImageError(f"window {window} outside the raster ({info.width}x{info.height})")
        try:
            rgb = to_rgb8(ds.read(indexes=_rgb_bands(ds), window=Window(x, y, w, h)))
            valid = ds.dataset_mask(window=Window(x, y, w, h)) > 0
        except (RasterioError, ValueError) as exc:
            detail = exc.__cause__ or exc  # rasterio chains GDAL's own message
            raise ImageError(f"corrupt raster data: {str(detail)[:120]}") from None
    tiles = window_tiles(info.width, info.height, [x, y, w, h], tile, overlap)
    kept = [(tid, b) for tid, b in tiles if valid[b.y - y:b.y - y + b.h, b.x - x:b.x - x + b.w].mean()
            >= MIN_VALID_SHARE]
    local = [Box(b.x - x, b.y - y, b.w, b.h) for _, b in kept]
    if local:
        inputs = tiles_to_inputs(Image.fromarray(rgb, "RGB"), local, (w, h), tile, size)
    else:
        inputs = np.zeros((0, size, size, 3), np.uint8)
    boxes = [b for _, b in kept]
    polygons = [pixel_polygon(info.transform, b) for b in boxes] if info.georeferenced else None
    return PreparedWindow(inputs, boxes, info.width, info.height, window=[x, y, w, h],
                          tile_ids=[tid for tid, _ in kept], polygons=polygons, crs=info.crs,
                          skipped=len(tiles) - len(kept))


def read_reduced(path: str, size: tuple[int, int]) -> Image.Image:
    """The whole raster shrunk to ``size`` (GDAL uses overviews when the file has them): for crack maps."""
    from rasterio.enums import Resampling

    with open_raster(path) as ds:
        bands = ds.read(indexes=_rgb_bands(ds), out_shape=(3, size[1], size[0]), resampling=Resampling.average)
    return Image.fromarray(to_rgb8(bands), "RGB")


def _rgb_bands(ds) -> list[int]:
    """Bands 1-3 (RGB) when there are three or more colour bands, else band 1 shown as grey."""
    from rasterio.enums import ColorInterp

    colour = [i + 1 for i, c in enumerate(ds.colorinterp) if c != ColorInterp.alpha]
    return colour[:3] if len(colour) >= 3 else [colour[0] if colour else 1] * 3


def to_rgb8(bands: np.ndarray) -> np.ndarray:
    """(3, h, w) of any dtype -> (h, w, 3) uint8, scaled as :func:`shared.preprocessing.to_rgb` scales photos."""
    if bands.dtype != np.uint8:
        arr = bands.astype(np.float32)
        if np.issubdtype(bands.dtype, np.integer):
            scale = 255.0 / (65535.0 if arr.max(initial=0) > 255 else 255.0)
        else:
            scale = 255.0 / max(float(arr.max(initial=0)), 1e-12) if arr.max(initial=0) > 255 else 1.0
        bands = np.clip(arr * scale, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(bands, 0, -1))


def pixel_polygon(transform, box: Box) -> list[list[float]]:
    """The tile's closed ring in map coordinates (corners through the affine geotransform)."""
    a, b, c, d, e, f = transform[:6]
    ring = []
    for px, py in ((box.x, box.y), (box.x + box.w, box.y), (box.x + box.w, box.y + box.h), (box.x, box.y + box.h),
                   (box.x, box.y)):
        ring.append([round(a * px + b * py + c, COORD_DECIMALS), round(d * px + e * py + f, COORD_DECIMALS)])
    return ring


# -- the records of one window -----------------------------------------------------------------------
def window_fields(prep: PreparedWindow, part: list[int] | None) -> dict:
    """Fields a window's partial record adds; the producer merges the parts of a raster into one record."""
    return {"crs": prep.crs, "window": prep.window, "raster": _ints(part, 2), "skipped_tiles": prep.skipped}


def finish_window(prep: PreparedWindow, record: dict, tiles: list[dict], per_tile: bool,
                  part: list[int] | None) -> tuple[dict, list[dict]]:
    """Raster tile ids and polygons on the tile records; only crack tiles unless ``per_tile``."""
    record.update(window_fields(prep, part))
    for i, t in enumerate(tiles):
        t["tile"] = prep.tile_ids[i]
        if prep.polygons is not None:
            t["polygon"] = prep.polygons[i]
    if not per_tile:
        tiles = [t for t in tiles if t["label"] == "crack"]
    return record, tiles


def item_fields(item: dict) -> dict:
    """``window`` and ``raster`` of a window item (so even its error record is merged into its raster's)."""
    if "window" not in item:
        return {}
    return {"window": _ints(item["window"], 4), "raster": _ints(item.get("raster"), 2)}


def _ints(value, n: int) -> list[int] | None:
    """``value`` as a list of ``n`` ints, or None: message fields copied into results are never arbitrary JSON."""
    try:
        out = [int(v) for v in value]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def empty_window_record(path: str, prep: PreparedWindow, part, **context) -> dict:
    """A window with no valid tile (all nodata): nothing to classify, not an error."""
    from shared.contract import result_record

    return result_record(path, width=prep.width, height=prep.height, tiles=0, crack_tiles=0, crack_fraction=0.0,
                         max_crack_probability=None, in_domain=None, domain_score=None,
                         **window_fields(prep, part), **context)


def expected_inputs(item: dict, tile: int, overlap: int) -> int:
    """Model inputs a window item gives at most (its tile count), without reading anything."""
    _, _, w, h = item["window"]
    step = max(1, tile - overlap)
    return max(1, math.ceil(max(1, w - overlap) / step) * math.ceil(max(1, h - overlap) / step))
