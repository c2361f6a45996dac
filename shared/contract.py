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
from dataclasses import asdict, dataclass, field, fields

from shared.checks import (MAX_SCALE, MAX_SCALES, MIN_TILE_SIZE, InvalidOptions,  # noqa: F401 - re-exported
                           check_scales, check_threshold, check_tiling, is_int)
from shared.config import default, parse_scales

TASK_NAME = "crackq.classify_chunk"

LABEL_CRACK = "crack"
LABEL_NO_CRACK = "no_crack"

#: Field metadata of record fields that travel in JSON (results, JSON lines) but are no CSV column.
JSON_ONLY = {"column": False}


@dataclass(frozen=True)
class ResultRecord:
    """One image's (or raster window's) result: the schema every result record follows.

    Records travel as plain dicts (JSON through Redis); this class is their one
    definition: :func:`result_record` refuses a field that is not declared here
    (a misspelt field is an error, not a silently empty column), and
    :data:`RESULT_COLUMNS` (the CSV columns, in order) derive from it.  The first
    seven fields are the core every record has; the others are set where they
    apply (tiling, GPS, domain check, rasters) and are absent otherwise.
    """

    path: str
    label: str = ""
    crack_probability: float | None = None
    error: str = ""
    model: str = ""
    worker: str = ""
    elapsed_ms: float = 0.0
    width: int | None = None
    height: int | None = None
    tiles: int | None = None
    crack_tiles: int | None = None
    crack_fraction: float | None = None
    max_crack_probability: float | None = None
    in_domain: bool | None = None
    domain_score: float | None = None
    latitude: float | None = None
    longitude: float | None = None
    altitude: float | None = None
    captured_at: str | None = None
    crs: str | None = None  # issue 12: a georeferenced raster's CRS (its tiles' polygons are in it)
    # -- JSON only --
    tiles_scored: int | None = field(default=None, metadata=JSON_ONLY)  # model inputs, when several scales
    window: list | None = field(default=None, metadata=JSON_ONLY)  # issue 12: a raster window [x, y, w, h]
    raster: list | None = field(default=None, metadata=JSON_ONLY)  # issue 12: [part, parts] of its raster
    skipped_tiles: int | None = field(default=None, metadata=JSON_ONLY)  # issue 12: all-nodata tiles
    windows: int | None = field(default=None, metadata=JSON_ONLY)  # issue 12: a merged raster's windows
    windows_done: int | None = field(default=None, metadata=JSON_ONLY)


@dataclass(frozen=True)
class TileRecord:
    """One tile's result (``--per-tile``, and crack tiles of rasters); :data:`TILE_COLUMNS` derive from it."""

    path: str
    tile: int | str
    x: int
    y: int
    w: int
    h: int
    #: The tiling scale the tile was scored at (1: tile_size tiles, 2: half-size tiles, ...).
    scale: int
    crack_probability: float
    label: str
    in_domain: bool | None
    domain_score: float | None
    polygon: list | None = None  # issue 12: the tile's closed ring in the raster's CRS (georeferenced rasters)


def _columns(cls) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.metadata.get("column", True))


#: Columns of CSV results, in order.
RESULT_COLUMNS = _columns(ResultRecord)
#: Fields of one per-tile record (``--per-tile``).
TILE_COLUMNS = _columns(TileRecord)
_RESULT_FIELDS = frozenset(f.name for f in fields(ResultRecord))


@dataclass(frozen=True)
class ChunkOptions:
    """Per-job options that travel with every chunk, so a task is self-contained."""

    threshold: float = default("threshold")
    tile_size: int = default("tile_size")
    tile_overlap: int = default("tile_overlap")
    per_tile: bool = False
    #: issue 11: True when the job did not set a threshold: workers then use their model card's
    #: ``threshold`` (chosen by ``crackq adapt``), ``threshold`` being the fallback.  Workers that
    #: predate the field ignore it and use ``threshold``.
    model_threshold: bool = False
    #: Tiling scales of large photos; the default is the ``scales`` setting's (one source of truth).
    scales: tuple[int, ...] = field(default=default("scales"))

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
        if not isinstance(item, dict) or not is_int(item.get("index")) or item["index"] < 0:
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

    from shared.model_card import card_threshold

    return replace(options, threshold=card_threshold(card, options.threshold))


def make_items(paths: list[str], start: int = 0) -> list[dict]:
    """Task items for ``paths`` numbered from ``start``."""
    return [{"index": start + i, "path": p} for i, p in enumerate(paths)]


def result_record(path: str, *, label: str = "", crack_probability: float | None = None, error: str = "",
                  model: str = "", worker: str = "", elapsed_ms: float = 0.0, **extra) -> dict:
    """One image's result as a :class:`ResultRecord` dict; ``error`` is empty when the image was classified.

    Only the fields given (plus the core seven) are in the dict; a field that
    :class:`ResultRecord` does not declare raises ``TypeError``.
    """
    unknown = sorted(set(extra) - _RESULT_FIELDS)
    if unknown:
        raise TypeError(f"unknown result field(s) {', '.join(unknown)}: declare them in ResultRecord")
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


def tile_record(**values) -> dict:
    """One tile's result as a :class:`TileRecord` dict (a missing or unknown field raises ``TypeError``)."""
    record = asdict(TileRecord(**values))
    if record["polygon"] is None:  # only tiles of georeferenced rasters have one
        del record["polygon"]
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
