"""Crack / no-crack labels for tiles of a photo, from its segmentation mask.

Used by ``crackq tiles from-masks`` (labelled tile folders for training) and by
``crackq train --uav-images/--uav-masks`` (tiles cut in memory), so both label
a tile the same way:

* **Negative**: no crack pixel in the tile;
* **Positive**: at least ``min_crack_fraction`` of the tile's pixels are crack,
  and some of them lie inside the tile's interior (away from a ``border`` band
  of ``border_fraction`` × size on each side);
* **ambiguous** (left out): anything else, i.e. a few crack pixels only, or a
  crack that only grazes the tile's edge.  Such a tile is neither a clean
  "crack" nor a clean "no crack" example, and a model asked to call it either
  way learns noise.

Tiles are laid out by :func:`shared.preprocessing.tile_grid`, the grid the
workers cut photos with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from shared.preprocessing import Box, tile_grid

#: 0.5 % of the tile's pixels: a 4-px-wide crack crossing a quarter of a 224-px tile (measured: the 10th
#: percentile of non-empty 224-px uav-concrete tiles is 0.66 %, of 64-px tiles 0.9 %).
DEFAULT_MIN_CRACK_FRACTION = 0.005
#: A crack must reach inside the central part of the tile (an eighth of the side in from each edge).
DEFAULT_BORDER_FRACTION = 0.125
#: Mask pixels above this value are crack (masks are 0/255; resampled ones have grey edges).
MASK_LEVEL = 127

POSITIVE, NEGATIVE = 1, 0


@dataclass(frozen=True)
class MaskTile:
    """One tile of a photo: its box, its crack fraction and its label (None = ambiguous)."""

    box: Box
    crack_fraction: float
    label: int | None


def load_mask(path: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """A boolean crack mask; resized (nearest) to ``size`` (width, height) when the photo differs."""
    with Image.open(path) as img:
        img = img.convert("L")
        if size is not None and img.size != tuple(size):
            img = img.resize(tuple(size), Image.Resampling.NEAREST)
        return np.asarray(img) > MASK_LEVEL


def label_tile(mask_tile: np.ndarray, min_crack_fraction: float = DEFAULT_MIN_CRACK_FRACTION,
               border_fraction: float = DEFAULT_BORDER_FRACTION) -> tuple[float, int | None]:
    """``(crack_fraction, label)`` of one boolean mask crop; label None means ambiguous."""
    fraction = float(mask_tile.mean()) if mask_tile.size else 0.0
    if fraction == 0.0:
        return 0.0, NEGATIVE
    if fraction < min_crack_fraction:
        return fraction, None
    h, w = mask_tile.shape
    by, bx = int(h * border_fraction), int(w * border_fraction)
    interior = mask_tile[by:h - by, bx:w - bx]
    return fraction, (POSITIVE if interior.any() else None)


def mask_tiles(mask: np.ndarray, size: int, stride: int | None = None,
               min_crack_fraction: float = DEFAULT_MIN_CRACK_FRACTION,
               border_fraction: float = DEFAULT_BORDER_FRACTION) -> list[MaskTile]:
    """Every tile of the ``tile_grid`` of ``mask`` (``stride`` defaults to ``size``: no overlap), labelled."""
    height, width = mask.shape
    stride = stride or size
    if not 0 < stride <= size:
        raise ValueError(f"stride must be between 1 and the tile size {size}")
    out = []
    for box in tile_grid(width, height, size, overlap=size - stride):
        fraction, label = label_tile(mask[box.y:box.y + box.h, box.x:box.x + box.w],
                                     min_crack_fraction, border_fraction)
        out.append(MaskTile(box, fraction, label))
    return out
