"""Range checks of the values a job and a worker accept: tiling, threshold, scales.

One module, below both :mod:`shared.config` (settings are refused at start-up)
and :mod:`shared.contract` (a hand-made chunk's options become error records),
so the two can never accept different ranges.
"""

from __future__ import annotations

import math
import numbers

#: Smallest tile side (px): smaller tiles upscale a photo many times over and multiply its tile count.
MIN_TILE_SIZE = 16
#: At most this many tiling scales per job, each a positive integer at most :data:`MAX_SCALE`.
MAX_SCALES = 4
MAX_SCALE = 16


class InvalidOptions(ValueError):
    """Chunk options (or settings) out of their range; ``str()`` is the reason shown to the user."""


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_threshold(threshold) -> None:
    if (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold)
            or not 0.0 <= threshold <= 1.0):
        raise InvalidOptions(f"threshold must be a number between 0 and 1, not {threshold!r}")


def check_tiling(tile_size, tile_overlap) -> None:
    """``tile_size`` 0 (no tiling) or at least :data:`MIN_TILE_SIZE`; ``0 <= tile_overlap < tile_size``."""
    if not is_int(tile_size) or (tile_size != 0 and tile_size < MIN_TILE_SIZE):
        raise InvalidOptions(f"tile_size must be 0 (no tiling) or an integer of at least {MIN_TILE_SIZE} px, "
                             f"not {tile_size!r}")
    if not is_int(tile_overlap) or tile_overlap < 0:
        raise InvalidOptions(f"tile_overlap must be an integer of at least 0 px, not {tile_overlap!r}")
    if tile_size and tile_overlap >= tile_size:
        raise InvalidOptions(f"tile_overlap ({tile_overlap}) must be smaller than tile_size ({tile_size})")


def check_scales(scales) -> None:
    if (not isinstance(scales, list) or not 1 <= len(scales) <= MAX_SCALES
            or not all(is_int(s) and 1 <= s <= MAX_SCALE for s in scales)):
        raise InvalidOptions(f"scales must be a list of 1 to {MAX_SCALES} integers from 1 to {MAX_SCALE}, "
                             f"not {scales!r}")
