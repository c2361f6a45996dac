"""The contract between producer and workers: what a task receives and what it returns.

A reader of ``worker/`` or ``producer/`` should find here everything that
crosses the queue, so neither side has to read the other.  Everything is plain
JSON (the Celery app accepts JSON only).

Task ``crackq.classify_chunk(job_id, items, options)``
    ``job_id``  str, the job the chunk belongs to.
    ``items``   list of ``{"index": int, "path": str}``: ``index`` is the
                image's position in the job (0..total-1), ``path`` an absolute
                path or an ``s3://bucket/key`` URL that the worker must be able
                to read under its data roots.  A raster read by windows is one
                item per window, with ``"window": [x, y, w, h]`` (raster pixels)
                and ``"raster": [part, parts]`` (:mod:`shared.raster`).
    ``options`` :class:`ChunkOptions` as a dict (threshold, tiling, per-tile records).

The task writes one :func:`result_record` per item into the job store (keyed
by ``index``, so a redelivered chunk overwrites) and returns a small summary
``{"job_id", "done", "errors"}``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field

from shared.config import Settings, parse_scales

TASK_NAME = "crackq.classify_chunk"

LABEL_CRACK = "crack"
LABEL_NO_CRACK = "no_crack"

#: Columns of CSV results, in order.  The first seven are the core record every
#: result has; the rest are filled where they apply (tiling, GPS, domain check).
RESULT_COLUMNS = (
    "path", "label", "crack_probability", "error", "model", "worker", "elapsed_ms",
    "width", "height", "tiles", "crack_tiles", "crack_fraction", "max_crack_probability",
    "in_domain", "domain_score",
    "latitude", "longitude", "altitude", "captured_at",
    "crs",  # issue 12: a georeferenced raster's CRS (its tiles' polygons are in it)
)

#: Fields of one per-tile record (``--per-tile``).
#: ``scale`` is the tiling scale the tile was scored at (1: tile_size tiles, 2: half-size tiles, ...).
TILE_COLUMNS = ("path", "tile", "x", "y", "w", "h", "scale", "crack_probability", "label", "in_domain",
                "domain_score",
                "polygon")  # issue 12: the tile's closed ring in the raster's CRS (georeferenced rasters)


@dataclass(frozen=True)
class ChunkOptions:
    """Per-job options that travel with every chunk, so a task is self-contained."""

    threshold: float = 0.5
    tile_size: int = 227
    tile_overlap: int = 0
    per_tile: bool = False
    #: issue 11: True when the job did not set a threshold: workers then use their model card's
    #: ``threshold`` (chosen by ``crackq adapt``), ``threshold`` being the fallback.  Workers that
    #: predate the field ignore it and use ``threshold``.
    model_threshold: bool = False
    #: Tiling scales of large photos; the default is the ``scales`` setting's (one source of truth).
    scales: tuple[int, ...] = field(default=Settings.__dataclass_fields__["scales"].default)

    def __post_init__(self):
        object.__setattr__(self, "scales", parse_scales(self.scales))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scales"] = list(self.scales)
        return d

    @classmethod
    def from_dict(cls, data: dict | None) -> "ChunkOptions":
        """The options of a message, checked: :class:`InvalidOptions` says what is wrong.

        Messages can be hand-made, so nothing is trusted: a string threshold or
        an overlap as big as a tile must become error records, not a crash or
        a chunk that skips most of a photo.
        """
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise InvalidOptions(f"options must be an object, not {type(data).__name__}")
        if "scales" in data:
            check_scales(data["scales"])
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        options = cls(**known)
        check_threshold(options.threshold)
        check_tiling(options.tile_size, options.tile_overlap)
        if not isinstance(options.per_tile, bool):
            raise InvalidOptions("per_tile must be true or false")
        if not isinstance(options.model_threshold, bool):
            raise InvalidOptions("model_threshold must be true or false")
        return options


#: Smallest tile side (px): smaller tiles upscale a photo many times over and multiply its tile count.
MIN_TILE_SIZE = 16
#: At most this many tiling scales per job, each a positive integer at most :data:`MAX_SCALE`.
MAX_SCALES = 4
MAX_SCALE = 16


class InvalidOptions(ValueError):
    """Chunk options (or settings) out of their range; ``str()`` is the reason shown to the user."""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_threshold(threshold) -> None:
    if (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold)
            or not 0.0 <= threshold <= 1.0):
        raise InvalidOptions(f"threshold must be a number between 0 and 1, not {threshold!r}")


def check_tiling(tile_size, tile_overlap) -> None:
    """``tile_size`` 0 (no tiling) or at least :data:`MIN_TILE_SIZE`; ``0 <= tile_overlap < tile_size``."""
    if not _is_int(tile_size) or (tile_size != 0 and tile_size < MIN_TILE_SIZE):
        raise InvalidOptions(f"tile_size must be 0 (no tiling) or an integer of at least {MIN_TILE_SIZE} px, "
                             f"not {tile_size!r}")
    if not _is_int(tile_overlap) or tile_overlap < 0:
        raise InvalidOptions(f"tile_overlap must be an integer of at least 0 px, not {tile_overlap!r}")
    if tile_size and tile_overlap >= tile_size:
        raise InvalidOptions(f"tile_overlap ({tile_overlap}) must be smaller than tile_size ({tile_size})")


def check_scales(scales) -> None:
    if (not isinstance(scales, list) or not 1 <= len(scales) <= MAX_SCALES
            or not all(_is_int(s) and 1 <= s <= MAX_SCALE for s in scales)):
        raise InvalidOptions(f"scales must be a list of 1 to {MAX_SCALES} integers from 1 to {MAX_SCALE}, "
                             f"not {scales!r}")


def check_items(items) -> tuple[list[dict], list[dict]]:
    """Split a message's items into ``(usable, unusable)``.

    Usable items have an integer ``index`` >= 0 and a string ``path``.  An
    item with a valid index but no usable path is returned in ``unusable``
    (it gets an error record); one without a valid index cannot be recorded
    anywhere and is left out of both (the caller logs it).
    """
    if not isinstance(items, list):
        return [], []
    usable, unusable = [], []
    for item in items:
        if not isinstance(item, dict) or not _is_int(item.get("index")) or item["index"] < 0:
            continue
        if isinstance(item.get("path"), str) and item["path"]:
            usable.append(item)
        else:
            unusable.append({"index": int(item["index"]), "path": item.get("path") if isinstance(
                item.get("path"), str) else ""})
    return usable, unusable


def resolve_threshold(options: ChunkOptions, card: dict) -> ChunkOptions:
    """The options a worker applies: the model card's threshold when the job left it to the model (issue 11)."""
    if not options.model_threshold:
        return options
    from dataclasses import replace

    from shared.onnx_model import card_threshold

    return replace(options, threshold=card_threshold(card, options.threshold))


def make_items(paths: list[str], start: int = 0) -> list[dict]:
    """Task items for ``paths`` numbered from ``start``."""
    return [{"index": start + i, "path": p} for i, p in enumerate(paths)]


def chunked(items: list[dict], size: int) -> list[list[dict]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def result_record(path: str, *, label: str = "", crack_probability: float | None = None, error: str = "",
                  model: str = "", worker: str = "", elapsed_ms: float = 0.0, **extra) -> dict:
    """One image's result.  ``error`` is empty when the image was classified."""
    record = {
        "path": path,
        "label": label,
        "crack_probability": None if crack_probability is None else round(float(crack_probability), 6),
        "error": error,
        "model": model,
        "worker": worker,
        "elapsed_ms": round(float(elapsed_ms), 2),
    }
    record.update(extra)
    return finite(record)


def finite(value):
    """``value`` with every NaN/inf float replaced by None (recursively): JSON has no such numbers.

    A GPS altitude with a zero denominator, or a score of an empty input, would
    otherwise write ``NaN`` into JSON lines and GeoJSON, which JSON parsers refuse.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def error_record(path: str, reason: str, **context) -> dict:
    return result_record(path, error=reason, **context)


def label_for(probability: float, threshold: float) -> str:
    return LABEL_CRACK if probability >= threshold else LABEL_NO_CRACK
