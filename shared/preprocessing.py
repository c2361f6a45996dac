"""Image decoding, resizing and tiling: the one implementation used by training *and* serving.

A model is only as good as the agreement between the pixels it was trained on
and the pixels it is served.  Training (``training/``) and the workers
(``worker/``) therefore both call :func:`load_rgb` and :func:`resize_to_input`
(and serving cuts large photos with :func:`tile_grid`), so the resize filter,
the EXIF orientation handling and the RGB conversion can never drift apart.
"""

from __future__ import annotations

import errno
import functools
import io
import math
import os
import stat
from dataclasses import dataclass
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from shared.config import default
from shared.exif import photo_metadata
from shared.model_card import INPUT_SIZE  # noqa: F401 - the model's input side, used and re-exported here

#: Resize filter for every resize in training and serving (Pillow's antialiased bilinear).
RESAMPLE = Image.Resampling.BILINEAR
#: File extensions the producer treats as images.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"})

# A truncated file must be an error, not a silently grey half-image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Decompression bombs are refused by :func:`open_image` against the ``max_pixels`` setting, from the
# header, before anything is decoded.  Pillow's own process-wide limit is switched off: it would
# override the setting, and turning its warning into an error needs ``warnings.catch_warnings``,
# which is not thread-safe (the decode threads would see each other's filters).
Image.MAX_IMAGE_PIXELS = None

try:  # HEIC/HEIF photos (phones, some drones) when pillow-heif is installed.
    from pillow_heif import register_heif_opener

    register_heif_opener()
except ImportError:  # pragma: no cover - optional dependency
    pass


class ImageError(Exception):
    """An image that cannot be classified; ``str(err)`` is the short reason put in the result record."""


#: A file to decode: a path, or a binary file already opened (and checked) by :func:`open_checked`.
Source = Union[str, os.PathLike, BinaryIO]

OUTSIDE_ROOTS = "path outside the worker's data roots (CRACKQ_DATA_ROOTS)"
#: Bytes of memory one decoded pixel may cost at its peak on the way to 8-bit RGB, by Pillow mode
#: (the decoded image plus the conversions of :func:`to_rgb`: 16-bit and float images go through
#: float64 arrays, alpha images through RGBA composites).  Unknown modes count :data:`_DEFAULT_PEAK`.
_PEAK_BYTES = {"1": 4, "L": 4, "P": 4, "RGB": 3, "YCbCr": 6, "LAB": 6, "HSV": 6, "CMYK": 7,
               "RGBA": 15, "RGBa": 15, "RGBX": 7, "LA": 17, "La": 17, "PA": 17,
               "I;16": 26, "I;16L": 26, "I;16B": 26, "I;16N": 26, "I": 28, "F": 28}
_PEAK_WITH_TRANSPARENCY = 16  # a palette image with transparency is composited as RGBA
_DEFAULT_PEAK = 8


class _Borrowed:
    """An opened file lent to Pillow, which closes what it is given: here ``close`` is a no-op,
    because the caller (who opened and checked it once) still needs it for the next read."""

    def __init__(self, fh):
        self._fh = fh

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def close(self) -> None:
        pass


def _rewind(source: Source) -> Source:
    if hasattr(source, "seek"):
        source.seek(0)
        return source if isinstance(source, _Borrowed) else _Borrowed(source)
    return source


def open_checked(path: str, roots: tuple[str, ...], max_file_bytes: int) -> BinaryIO:
    """Open ``path`` for reading only if the file actually opened lies under ``roots``; one open per file.

    Checking a path and then opening it lets a symlink swapped in between
    (by anyone who can write under the roots) redirect the read anywhere.
    So the path is resolved once, the resolved path is opened without
    following a final symlink (``O_NOFOLLOW``), and the *opened* file (its
    ``/proc/self/fd`` link, where the kernel says what it is) is checked
    against the roots.  Every later read (header, pixels, EXIF) must use the
    returned file, never the path again.
    """
    real = os.path.realpath(path)
    if not _within(real, roots):
        raise ImageError(OUTSIDE_ROOTS)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the resolved path became a symlink after it was resolved
            raise ImageError(OUTSIDE_ROOTS) from None
        raise ImageError(f"cannot open file: {_short(exc)}") from None
    try:
        if not _within(_opened_path(fd, real), roots):
            raise ImageError(OUTSIDE_ROOTS)
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ImageError("is a directory, not an image")
        if not stat.S_ISREG(info.st_mode):
            raise ImageError("not a regular file")
        _check_size(info.st_size, max_file_bytes)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _opened_path(fd: int, fallback: str) -> str:
    """The path of the file behind ``fd`` as the kernel knows it (Linux), else the path that was opened."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return fallback


def _check_size(size: int, max_file_bytes: int) -> None:
    if size == 0:
        raise ImageError("empty file")
    if size > max_file_bytes:
        raise ImageError(f"file too large ({size} bytes > limit {max_file_bytes})")


@dataclass(frozen=True)
class Box:
    """A tile's pixel box in the (EXIF-oriented) original photo."""

    x: int
    y: int
    w: int
    h: int

    def as_dict(self) -> dict:
        return {"x": self.x, "y": self.y, "w": self.w, "h": self.h}


def check_file(path: Source, max_file_bytes: int) -> None:
    """Cheap checks before decoding, each with a reason a user understands."""
    if isinstance(path, io.BytesIO):  # bytes fetched from object storage by shared/storage.py (checked there)
        return
    if hasattr(path, "fileno"):  # an opened file (open_checked): check what was opened
        _check_size(os.fstat(path.fileno()).st_size, max_file_bytes)
        return
    if not os.path.exists(path):
        raise ImageError("file not found")
    if os.path.isdir(path):
        raise ImageError("is a directory, not an image")
    size = os.path.getsize(path)
    if size == 0:
        raise ImageError("empty file")
    if size > max_file_bytes:
        raise ImageError(f"file too large ({size} bytes > limit {max_file_bytes})")
    if not os.access(path, os.R_OK):
        raise ImageError("permission denied")


def open_image(path: Source, max_pixels: int) -> Image.Image:
    """Open (lazily) and check the pixel count and the decoding memory before anything is decoded."""
    try:
        img = Image.open(_rewind(path))
    except UnidentifiedImageError:
        raise ImageError("not an image or unsupported format") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large: {_short(exc)}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"corrupt or truncated image: {_short(exc)}") from None
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError("image has no pixels")
    if width * height > max_pixels:
        img.close()
        raise ImageError(f"image too large ({width}x{height} = {width * height} px > limit {max_pixels})")
    need = width * height * peak_bytes_per_pixel(img)
    if need > decode_budget(max_pixels):
        img.close()
        raise ImageError(f"image too large to decode ({width}x{height} {img.mode} needs ~{need >> 20} MB "
                         f"> budget {decode_budget(max_pixels) >> 20} MB = CRACKQ_MAX_PIXELS x 3 bytes)")
    return img


def peak_bytes_per_pixel(img: Image.Image) -> int:
    """Peak memory per pixel of decoding ``img`` (from its header) to 8-bit RGB."""
    if img.mode == "P" and "transparency" in img.info:
        return _PEAK_WITH_TRANSPARENCY
    return _PEAK_BYTES.get(img.mode, _DEFAULT_PEAK)


def decode_budget(max_pixels: int) -> int:
    """Bytes one image may take while decoding: an 8-bit RGB image at the pixel limit."""
    return 3 * max_pixels


def check_tiling_budget(width: int, height: int, tile: int, overlap: int, *, size: int = INPUT_SIZE,
                        max_pixels: int = default("max_pixels"), max_tiles: int = default("max_tiles")) -> None:
    """Refuse, from the header alone, a photo whose tiles would cost too much.

    Two costs grow with small tiles: the tile count (each tile is a model
    input of ``size``² × 3 bytes), and the photo resized so that a tile
    becomes ``size`` px (tiles smaller than ``size`` *upscale* it).
    """
    tiles = tile_count(width, height, tile, overlap)
    if tiles > max_tiles:
        raise ImageError(f"too many tiles ({tiles} > limit {max_tiles}, CRACKQ_MAX_TILES)")
    scaled = max(size, round(width * size / tile)) * max(size, round(height * size / tile))
    if 3 * scaled > decode_budget(max_pixels):
        raise ImageError(f"image too large to tile (tiles of {tile} px scaled to {size} px make a "
                         f"{scaled} px image > limit {max_pixels})")


def tile_count(width: int, height: int, tile: int, overlap: int = 0) -> int:
    """How many tiles :func:`tile_grid` makes (at most), computed without making them."""
    def along(length: int) -> int:
        return 1 if length <= tile else math.ceil((length - tile) / (tile - overlap)) + 1

    return along(width) * along(height)


@dataclass
class Header:
    """What a file's header says, read once (:func:`read_header`) and passed on to the decode.

    ``image`` is the file opened by Pillow, not decoded yet; ``width``/``height``
    are after EXIF orientation; ``meta`` is the photo's GPS position and capture
    time (:func:`shared.exif.photo_metadata`).  Size checks, tile count, pixel
    decode and EXIF all read this one opening.
    """

    image: Image.Image
    width: int
    height: int

    @functools.cached_property
    def meta(self) -> dict:
        return photo_metadata(self.image)

    def close(self) -> None:
        self.image.close()


def read_header(path: Source, max_pixels: int = default("max_pixels"),
                max_file_bytes: int = default("max_file_bytes")) -> Header:
    """The file checked (size, pixels, decode memory) and its header read, nothing decoded."""
    check_file(path, max_file_bytes)
    img = open_image(path, max_pixels)
    return Header(img, *_oriented(img))


def _oriented(img: Image.Image) -> tuple[int, int]:
    """``img``'s size after its EXIF orientation (from the header)."""
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block only loses the orientation
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def load_rgb(path: Source, *, max_pixels: int = default("max_pixels"), max_file_bytes: int = default("max_file_bytes"),
             draft_scale: float = 1.0, header: Header | None = None) -> Image.Image:
    """Decode ``path`` to an EXIF-oriented 8-bit RGB image (from ``header`` when its header was read).

    ``draft_scale`` < 1 lets JPEG decoding skip detail that a later downscale
    would throw away (Pillow's ``draft``: 1/2, 1/4 or 1/8 at decode time);
    the returned image is then smaller than the file's pixel size.
    """
    if header is None:
        check_file(path, max_file_bytes)
        img = open_image(path, max_pixels)
    else:
        img = header.image
    try:
        if draft_scale < 0.5 and img.format == "JPEG":
            w, h = img.size
            img.draft("RGB", (max(1, math.ceil(w * draft_scale)), max(1, math.ceil(h * draft_scale))))
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"corrupt or truncated image: {_short(exc)}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: alpha over white, 16-bit and float scaled, CMYK/palette/grey converted."""
    if img.mode == "RGB":
        return img
    if img.mode in {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}:
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0.0
        scale = 255.0 / (65535.0 if hi > 255 else 255.0) if img.mode != "F" else 255.0 / max(hi, 1e-12)
        grey = np.clip(arr * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in {"RGBA", "LA", "PA", "RGBa", "La"}:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def resize_to_input(img: Image.Image, size: int = INPUT_SIZE) -> np.ndarray:
    """The model input: ``size``×``size``×3 uint8 (the whole image, no crop, as in training)."""
    if img.size != (size, size):
        img = img.resize((size, size), RESAMPLE)
    return np.asarray(img, dtype=np.uint8)


def load_input(path: str, size: int = INPUT_SIZE, **limits) -> np.ndarray:
    """Decode one file straight to a model input array (training and small-image serving)."""
    return resize_to_input(load_rgb(path, **limits), size)


def tile_grid(width: int, height: int, tile: int, overlap: int = 0) -> list[Box]:
    """Cover a ``width``×``height`` image with ``tile``-px squares.

    Steps are ``tile - overlap``; the last row/column is shifted back so it
    ends at the image edge (tiles never stretch or pad).  A side shorter than
    a tile gets one tile of that side's length.
    """
    def starts(length: int) -> list[int]:
        if length <= tile:
            return [0]
        step = tile - overlap
        n = math.ceil((length - tile) / step) + 1
        out = [min(i * step, length - tile) for i in range(n)]
        return sorted(set(out))

    tw, th = min(tile, width), min(tile, height)
    return [Box(x, y, tw, th) for y in starts(height) for x in starts(width)]


def needs_tiling(width: int, height: int, tile: int) -> bool:
    """Images larger than a tile in either direction are tiled; smaller ones are classified whole."""
    return bool(tile) and (width > tile or height > tile)


def tiles_to_inputs(img: Image.Image, boxes: list[Box], original_size: tuple[int, int], tile: int,
                    size: int = INPUT_SIZE) -> np.ndarray:
    """Model inputs for ``boxes`` (given in original-photo pixels) from a possibly draft-decoded ``img``.

    The photo is resized once so that a tile becomes ``size`` px, then each
    tile is a plain crop: one resize per photo instead of one per tile, and
    the same filter as :func:`resize_to_input`.
    """
    ow, oh = original_size
    scale = size / tile
    target = (max(size, round(ow * scale)), max(size, round(oh * scale)))
    if img.size != target:
        img = img.resize(target, RESAMPLE)
    arr = np.asarray(img, dtype=np.uint8)
    out = np.empty((len(boxes), size, size, 3), dtype=np.uint8)
    sx, sy = target[0] / ow, target[1] / oh
    for i, b in enumerate(boxes):
        x0 = min(round(b.x * sx), target[0] - 1)
        y0 = min(round(b.y * sy), target[1] - 1)
        w = max(1, round(b.w * sx))
        h = max(1, round(b.h * sy))
        crop = arr[y0:y0 + h, x0:x0 + w]
        if crop.shape[0] != size or crop.shape[1] != size:
            crop = np.asarray(Image.fromarray(crop).resize((size, size), RESAMPLE), dtype=np.uint8)
        out[i] = crop
    return out


def oriented_size(path: Source, max_pixels: int) -> tuple[int, int]:
    """Pixel size after EXIF orientation, read from the header only."""
    img = open_image(path, max_pixels)
    try:
        return _oriented(img)
    finally:
        img.close()


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text[:160]


@dataclass
class PreparedImage:
    """A decoded file ready for the model: one input (small image) or one per tile (large photo).

    ``scales[i]`` is the scale input ``i`` was cut at (1: tiles of the tile
    size; 2: of half of it ...); None for an image classified whole.
    """

    inputs: np.ndarray
    boxes: list[Box] | None
    width: int
    height: int
    scales: np.ndarray | None = None


# -- multi-scale tiling (issue 10) ------------------------------------------------
def scale_tile(tile: int, scale: int) -> int:
    """Tile side at ``scale``: the tile size divided by the scale (scale 2 of 227 px: 114 px tiles)."""
    return max(1, round(tile / scale))


def multiscale_grid(width: int, height: int, tile: int, overlap: int = 0,
                    scales: tuple[int, ...] = (1,)) -> tuple[list[Box], np.ndarray]:
    """Tiles of every scale (scale 1 first), and the scale of each: ``tile_grid`` at ``tile / scale``."""
    boxes: list[Box] = []
    per_box: list[int] = []
    for s in sorted(set(scales)):
        grid = tile_grid(width, height, scale_tile(tile, s), overlap // s)
        boxes += grid
        per_box += [s] * len(grid)
    return boxes, np.array(per_box, dtype=np.int64)


def region_probabilities(boxes: list[Box], scales: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Crack probability of each coarsest-scale region, combining the finer tiles centred in it.

    A region keeps its own tile's probability, raised half-way towards the
    highest finer tile when that one is higher.  Measured on the uav-concrete
    VALIDATION photos (``benchmarks/scales.py``, docs/drone.md), taking the plain
    max over scales ranks regions as well but labels many more of them crack
    at threshold 0.5 (region accuracy 81-87 % against 92-90 % for this rule).
    """
    scales = np.asarray(scales)
    probs = np.asarray(probs, dtype=np.float64)
    coarse = np.flatnonzero(scales == scales.min())
    out = probs[coarse].copy()
    fine = np.flatnonzero(scales != scales.min())
    if not len(fine):
        return out
    cx = np.array([boxes[i].x + boxes[i].w / 2 for i in fine])
    cy = np.array([boxes[i].y + boxes[i].h / 2 for i in fine])
    for j, i in enumerate(coarse):
        b = boxes[i]
        inside = (cx >= b.x) & (cx < b.x + b.w) & (cy >= b.y) & (cy < b.y + b.h)
        if inside.any():
            out[j] = (out[j] + max(out[j], float(probs[fine[inside]].max()))) / 2
    return out


def prepare_image(path: Source, *, size: int = INPUT_SIZE, tile: int = default("tile_size"), overlap: int = 0,
                  max_pixels: int = default("max_pixels"), max_file_bytes: int = default("max_file_bytes"),
                  max_tiles: int = default("max_tiles"), scales: tuple[int, ...] = default("scales"),
                  header: Header | None = None) -> PreparedImage:
    """Decode ``path`` (or a file from :func:`open_checked`) into model inputs: whole if it fits in a
    tile, else as a grid of tiles per scale.

    The header is read first so that a JPEG that will be shrunk by more than
    half is decoded at reduced size (``draft``, sized for the finest scale),
    which keeps big photos cheap, and so that a photo whose decoding or tiles
    would exceed the memory budget is refused before anything is decoded.
    ``header`` is the file's :func:`read_header` when the caller read it already (it is not read twice).
    """
    header = header or read_header(path, max_pixels, max_file_bytes)
    width, height = header.width, header.height
    tiled = needs_tiling(width, height, tile)
    finest = max(scales) if tiled else 1
    if tiled:  # the finest scale has the most tiles and the largest upscaling: the budget's worst case
        check_tiling_budget(width, height, scale_tile(tile, finest), overlap // finest, size=size,
                            max_pixels=max_pixels, max_tiles=max_tiles)
    scale = size / scale_tile(tile, finest) if tiled else max(size / width, size / height)
    img = load_rgb(path, draft_scale=scale, header=header)
    if not tiled:
        return PreparedImage(resize_to_input(img, size)[None], None, width, height)
    boxes, per_box = multiscale_grid(width, height, tile, overlap, scales)
    parts = []
    for s in sorted(set(scales)):
        chosen = [b for b, bs in zip(boxes, per_box) if bs == s]
        parts.append(tiles_to_inputs(img, chosen, (width, height), scale_tile(tile, s), size))
    return PreparedImage(np.concatenate(parts), boxes, width, height, per_box)


def is_under_roots(path: str, roots: tuple[str, ...]) -> bool:
    """True when ``path``, with every symlink resolved, lies inside one of ``roots``.

    A check of a *path* only: a reader must use :func:`open_checked`, which
    checks the file it actually opened.
    """
    return _within(os.path.realpath(path), roots)


def _within(real: str, roots: tuple[str, ...]) -> bool:
    for root in roots:
        root_real = _real_root(root)
        if real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep):
            return True
    return False


@functools.lru_cache(maxsize=256)
def _real_root(root: str) -> str:
    # Roots are few and fixed per worker: resolve each once, not for every image.
    return os.path.realpath(root)
