"""Producer side of rasters read by windows: plan window items at submit, merge their records at read.

A GeoTIFF (or any TIFF larger than one window) becomes one task item per
window (:func:`shared.raster.plan_windows`), so the windows of one orthomosaic
are classified by all workers at once; every other file stays one item.  Each
window counts as one item of the job (``crackq status`` counts windows).
:func:`assemble` turns the window records of a raster back into one record per
raster, followed by its tile records, so results, CSV and maps look the same
as for a photo.
"""

from __future__ import annotations

import logging
import statistics
from typing import Iterable, Iterator

from shared import raster
from shared.config import default
from shared.contract import ChunkOptions
from shared.preprocessing import ImageError

log = logging.getLogger(__name__)


def plan_items(paths: list[str], options: ChunkOptions, window: int) -> list[dict]:
    """Task items for ``paths``: one per file, or one per window for rasters (numbered in order)."""
    items: list[dict] = []
    for path in paths:
        windows = _windows_of(path, options, window)
        if not windows:
            items.append({"index": len(items), "path": path})
            continue
        for part, box in enumerate(windows):
            items.append({"index": len(items), "path": path, "window": box, "raster": [part, len(windows)]})
    return items


def _windows_of(path: str, options: ChunkOptions, window: int) -> list[list[int]] | None:
    """The windows of ``path`` if it is read by windows: a georeferenced raster, or one larger than a window."""
    if not options.tile_size or not raster.is_raster_name(path):
        return None
    try:
        info = raster.read_info(path)
    except (ImageError, OSError) as exc:
        # Unreadable here (corrupt, or only the workers can see it): one item; its worker says what is wrong.
        log.info("%s is planned as one image: %s", path, exc)
        return None
    if not info.georeferenced and info.width * info.height <= window * window:
        return None
    return raster.plan_windows(info.width, info.height, options.tile_size, options.tile_overlap, window)


def item_weight(item: dict, tile: int = default("tile_size")) -> int | None:
    """Chunk-planning weight of a window item (its tile count: each window of a big raster is a chunk)."""
    if "window" not in item:
        return None
    return raster.expected_inputs(item, tile or 227, 0)


# -- reading results ---------------------------------------------------------------------------------
def assemble(records: Iterable[dict]) -> Iterator[dict]:
    """One record per raster (its windows merged), then its tile records; other records pass unchanged.

    Records come in item order, and the windows of one raster are consecutive
    items, so a raster is the run of consecutive records with its path of which
    at least one is a window record (a window whose chunk failed gets a plain
    error record from the worker; it still belongs to its raster).
    """
    group: list[tuple[dict, list[dict]]] = []
    for record in records:
        if "tile" in record:
            if group:
                group[-1][1].append(record)
            else:
                yield record
            continue
        if group and record.get("path") != group[0][0].get("path"):
            yield from _flush(group)
            group = []
        group.append((record, []))
    if group:
        yield from _flush(group)


def _flush(group: list[tuple[dict, list[dict]]]) -> Iterator[dict]:
    if not any("window" in r for r, _ in group):
        for record, tiles in group:
            yield record
            yield from tiles
        return
    yield merge([r for r, _ in group])
    yield from sorted((t for _, tiles in group for t in tiles), key=lambda t: t.get("tile", 0))


def merge(parts: list[dict]) -> dict:
    """The record of a whole raster from its window records."""
    ok = [p for p in parts if not p.get("error")]
    failed = [p for p in parts if p.get("error")]
    n_parts = max([len(parts)] + [(p.get("raster") or [0, 0])[1] for p in parts])
    first = next((p for p in parts if "window" in p), parts[0])
    tiles = sum(int(p.get("tiles") or 0) for p in ok)
    crack = sum(int(p.get("crack_tiles") or 0) for p in ok)
    probs = [p["max_crack_probability"] for p in ok if p.get("max_crack_probability") is not None]
    top = max(probs) if probs else None
    label = "" if top is None else ("crack" if any(p.get("label") == "crack" for p in ok) else "no_crack")
    error = ""
    if failed:
        error = failed[0]["error"] if not ok else f"{len(failed)} of {n_parts} windows failed: {failed[0]['error']}"
    record = {k: v for k, v in first.items() if k not in ("window", "raster")}
    record.update({
        "label": label, "crack_probability": top, "error": error,
        "worker": ",".join(sorted({p.get("worker") for p in parts if p.get("worker")})),
        "elapsed_ms": round(sum(float(p.get("elapsed_ms") or 0) for p in parts), 2),
        "tiles": tiles, "crack_tiles": crack, "crack_fraction": round(crack / tiles, 6) if tiles else 0.0,
        "max_crack_probability": top, "windows": n_parts, "windows_done": len(parts),
        "skipped_tiles": sum(int(p.get("skipped_tiles") or 0) for p in ok),
        **_domain(ok),
    })
    return record


def _domain(parts: list[dict]) -> dict:
    """In domain when most tiles are (each window votes with its tile count); score: median of window medians."""
    known = [p for p in parts if p.get("in_domain") is not None and p.get("tiles")]
    if not known:
        return {"in_domain": None, "domain_score": None}
    familiar = sum(p["tiles"] for p in known if p["in_domain"])
    scores = [p["domain_score"] for p in known if p.get("domain_score") is not None]
    return {"in_domain": familiar * 2 >= sum(p["tiles"] for p in known),
            "domain_score": round(statistics.median(scores), 4) if scores else None}
