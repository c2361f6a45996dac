"""The contract between producer and workers: what a task receives and what it returns.

A reader of ``worker/`` or ``producer/`` should find here everything that
crosses the queue, so neither side has to read the other.  Everything is plain
JSON (the Celery app accepts JSON only).

Task ``crackq.classify_chunk(job_id, items, options)``
    ``job_id``  str, the job the chunk belongs to.
    ``items``   list of ``{"index": int, "path": str}``: ``index`` is the
                image's position in the job (0..total-1), ``path`` an absolute
                path that the worker must be able to read under its data roots.
    ``options`` :class:`ChunkOptions` as a dict (threshold, tiling, per-tile records).

The task writes one :func:`result_record` per item into the job store (keyed
by ``index``, so a redelivered chunk overwrites) and returns a small summary
``{"job_id", "done", "errors"}``.
"""

from __future__ import annotations

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
)

#: Fields of one per-tile record (``--per-tile``).
#: ``scale`` is the tiling scale the tile was scored at (1: tile_size tiles, 2: half-size tiles, ...).
TILE_COLUMNS = ("path", "tile", "x", "y", "w", "h", "scale", "crack_probability", "label", "in_domain",
                "domain_score")


@dataclass(frozen=True)
class ChunkOptions:
    """Per-job options that travel with every chunk, so a task is self-contained."""

    threshold: float = 0.5
    tile_size: int = 227
    tile_overlap: int = 0
    per_tile: bool = False
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
        data = data or {}
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


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
    return record


def error_record(path: str, reason: str, **context) -> dict:
    return result_record(path, error=reason, **context)


def label_for(probability: float, threshold: float) -> str:
    return LABEL_CRACK if probability >= threshold else LABEL_NO_CRACK
