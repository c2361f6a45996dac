"""Classify one chunk: decode in threads while the model runs, then build one record per image.

Decoding (Pillow, which releases the GIL) runs in a small thread pool a batch
ahead of inference, so the next batch decodes while the current one is in the
model and the cores stay busy; decoded inputs waiting for the model are capped
at two batches, which bounds memory with large photos.  Images are grouped
until they fill a batch, so a chunk of small patches and a tiled 12-megapixel
photo both run through full batches.

Per-image problems never escape: each becomes an error record and the rest of
the chunk is classified.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from shared.config import Settings
from shared.contract import ChunkOptions, error_record, label_for, resolve_threshold, result_record, tile_record
from shared.preprocessing import (OUTSIDE_ROOTS, Header, ImageError, PreparedImage, multiscale_grid, needs_tiling,
                                  open_checked, prepare_image, read_header, region_probabilities)
# ---- object storage and rasters read by windows (issue 12): shared/storage.py, shared/raster.py
from shared import raster, storage
# ---- end issue 12

log = logging.getLogger(__name__)

#: Files this small are counted as one model input without reading their header (a 227 px JPEG is ~20 KB).
SMALL_FILE = 64 * 1024


@dataclass
class _Opened:
    """An item's file, opened once and checked against the data roots (or why it could not be)."""

    item: dict
    handle: object = None
    error: str = ""
    #: The file's header when it was read to count its tiles; the decode goes on from it.
    header: Header | None = None


@dataclass
class _Decoded:
    item: dict
    prepared: PreparedImage | None = None
    error: str = ""
    meta: dict = field(default_factory=dict)
    decode_ms: float = 0.0


@dataclass
class ChunkOutput:
    records: dict[int, dict]
    tiles: dict[int, list]
    cancelled: bool = False


class ChunkRunner:
    """Holds what a worker process needs for every chunk: classifier, domain scorer, settings."""

    def __init__(self, classifier, settings: Settings, worker_name: str, domain=None):
        self.classifier = classifier
        self.settings = settings
        self.worker_name = worker_name
        self.domain = domain
        self.roots = settings.effective_data_roots
        self.local_roots = tuple(r for r in self.roots if not storage.is_remote(r))  # issue 12
        self.pool = ThreadPoolExecutor(max(1, settings.decode_threads), thread_name_prefix="decode")
        limit_blas_threads()

    def run(self, items: list[dict], options: ChunkOptions,
            should_stop: Callable[[], bool] = lambda: False) -> ChunkOutput:
        options = resolve_threshold(options, self.classifier.info.card)  # issue 11: the card's threshold
        out = ChunkOutput({}, {})
        group: list[_Decoded] = []
        n_inputs = 0
        for decoded in self._decode_ahead(items, options):
            if decoded.error:
                out.records[decoded.item["index"]] = self._error(decoded)
                continue
            if not len(decoded.prepared.inputs):  # a raster window of nodata only (issue 12)
                out.records[decoded.item["index"]] = self._empty_window(decoded)
                continue
            group.append(decoded)
            n_inputs += len(decoded.prepared.inputs)
            if n_inputs >= self.classifier.batch_size:
                if should_stop():
                    out.cancelled = True
                    return out
                self._classify(group, options, out)
                group, n_inputs = [], 0
        if group:
            self._classify(group, options, out)
        return out

    # -- decoding ------------------------------------------------------
    def _decode_ahead(self, items: list[dict], options: ChunkOptions):
        """Yield decoded items in order while the pool keeps decoding the ones after them.

        A whole batch (plus one image per decode thread) is kept in flight, so
        the next batch decodes while the current one is in the model: decode
        and inference overlap instead of taking turns.  Inputs in flight are
        capped at two batches, counted from each file's header *before* it is
        submitted (a 4000×3000 photo is ~250 tiles), so a run of big photos
        holds the one in the model and the one decoding next, never a whole chunk.
        """
        lookahead = self.classifier.batch_size + max(1, self.settings.decode_threads)
        input_cap = 2 * self.classifier.batch_size
        pending: deque = deque()  # (future, expected model inputs)
        queue = iter(items)
        upcoming = [None]  # the next item and its expected inputs, read from its header once

        def refill():
            while len(pending) < lookahead:
                if upcoming[0] is None:
                    item = next(queue, None)
                    if item is None:
                        return
                    opened = self._open(item)
                    upcoming[0] = (opened, self._expected_inputs(opened, options))
                opened, cost = upcoming[0]
                if pending and sum(c for _, c in pending) + cost > input_cap:
                    return
                pending.append((self.pool.submit(self._decode, opened, options), cost))
                upcoming[0] = None

        while True:
            refill()
            if not pending:
                return
            decoded = pending.popleft()[0].result()
            refill()  # the next big photo starts decoding while this one is in the model
            yield decoded

    def _open(self, item: dict) -> _Opened:
        """The item's file, opened once (:func:`open_checked`): every later read uses this handle."""
        if storage.is_remote(item["path"]):  # issue 12: checked against the s3:// roots, fetched by _decode
            return _Opened(item) if storage.is_under_roots(item["path"], self.roots) else \
                _Opened(item, error=OUTSIDE_ROOTS)
        try:
            return _Opened(item, open_checked(item["path"], self.local_roots, self.settings.max_file_bytes))
        except ImageError as exc:
            return _Opened(item, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - a bad path must not take the chunk down
            return _Opened(item, error=f"cannot open file: {type(exc).__name__}: {str(exc)[:120]}")

    def _expected_inputs(self, opened: _Opened, options: ChunkOptions) -> int:
        """Model inputs the item will give (its tile count, from the header only); 1 when unknown.

        Files under :data:`SMALL_FILE` count 1 without reading their header: patches are
        the common case and the header read would cost the inference thread ~0.2 ms each.
        """
        if "window" in opened.item and not opened.error:  # a raster window (issue 12): its tile count
            return raster.expected_inputs(opened.item, options.tile_size, options.tile_overlap)
        if opened.handle is None or not options.tile_size:
            return 1
        try:
            if os.fstat(opened.handle.fileno()).st_size <= SMALL_FILE:
                return 1
            opened.header = read_header(opened.handle, self.settings.max_pixels, self.settings.max_file_bytes)
        except Exception:  # noqa: BLE001 - the decode reports what is wrong with the file
            return 1
        width, height = opened.header.width, opened.header.height
        if not needs_tiling(width, height, options.tile_size):
            return 1
        tiles = len(multiscale_grid(width, height, options.tile_size, options.tile_overlap, options.scales)[0])
        return 1 if tiles > self.settings.max_tiles * len(options.scales) else tiles  # refused by the decode

    def _decode(self, opened: _Opened, options: ChunkOptions) -> _Decoded:
        start = time.perf_counter()
        decoded = _Decoded(opened.item)
        handle = opened.handle
        try:
            if opened.error:
                raise ImageError(opened.error)
            if "window" in opened.item:  # issue 12: one window of a raster, read with rasterio
                decoded.prepared = raster.prepare_window(
                    raster.opened_path(handle, opened.item["path"]), opened.item["window"],
                    size=self.classifier.info.input_size, tile=options.tile_size or 227,
                    overlap=options.tile_overlap, max_pixels=self.settings.max_pixels)
            else:
                if handle is None:  # issue 12: an s3:// object, fetched whole in this decode thread
                    handle = storage.source(opened.item["path"], self.settings.max_file_bytes)
                header = opened.header = opened.header or read_header(
                    handle, self.settings.max_pixels, self.settings.max_file_bytes)
                decoded.prepared = prepare_image(
                    handle, size=self.classifier.info.input_size, tile=options.tile_size,
                    overlap=options.tile_overlap, max_pixels=self.settings.max_pixels,
                    max_file_bytes=self.settings.max_file_bytes, max_tiles=self.settings.max_tiles,
                    scales=options.scales, header=header)
                decoded.meta = _metadata(header)
        except ImageError as exc:
            decoded.error = str(exc)
        except MemoryError:
            decoded.error = "out of memory while decoding"
        except Exception as exc:  # noqa: BLE001 - a bad file must not take the chunk down
            decoded.error = f"cannot decode image: {type(exc).__name__}: {str(exc)[:120]}"
        finally:
            if opened.header is not None:
                opened.header.close()
            if handle is not None:
                handle.close()
        decoded.decode_ms = (time.perf_counter() - start) * 1000
        return decoded

    # -- inference and records -------------------------------------------
    def _classify(self, group: list[_Decoded], options: ChunkOptions, out: ChunkOutput) -> None:
        inputs = np.concatenate([d.prepared.inputs for d in group])
        start = time.perf_counter()
        probs, feats = self.classifier.predict(inputs)
        infer_ms = (time.perf_counter() - start) * 1000
        scores, familiar = self._domain(probs, feats)
        offset = 0
        for d in group:
            k = len(d.prepared.inputs)
            sl = slice(offset, offset + k)
            offset += k
            elapsed = d.decode_ms + infer_ms * k / len(inputs)
            record, tiles = self._records(d, probs[sl], scores[sl], familiar[sl], options, elapsed)
            out.records[d.item["index"]] = record
            if tiles is not None:
                out.tiles[d.item["index"]] = tiles

    def _domain(self, probs: np.ndarray, feats: np.ndarray):
        if self.domain is None:
            return np.full(len(probs), np.nan), np.full(len(probs), None, dtype=object)
        return self.domain.score(feats, probs)

    def _records(self, d: _Decoded, probs, scores, familiar, options: ChunkOptions, elapsed_ms: float):
        """The photo's record (and its per-tile records).

        With several scales, ``tiles``/``crack_tiles``/``crack_fraction`` count
        the scale-1 regions, each with the max probability over the scales that
        cover it (:func:`shared.preprocessing.region_probabilities`); ``tiles_scored``
        counts every model input.
        """
        prep = d.prepared
        prep_scales = getattr(prep, "scales", None)  # raster windows (issue 12) are scored at one scale
        regions = (probs if prep_scales is None or len(set(prep_scales.tolist())) == 1
                   else region_probabilities(prep.boxes, prep_scales, probs))
        n_crack = int((regions >= options.threshold).sum())
        top = float(regions.max())
        extra = {"tiles_scored": len(probs)} if len(regions) != len(probs) else {}
        record = result_record(
            d.item["path"], label=label_for(top, options.threshold), crack_probability=top,
            model=self.classifier.info.name, worker=self.worker_name, elapsed_ms=elapsed_ms,
            width=prep.width, height=prep.height, tiles=len(regions), crack_tiles=n_crack,
            crack_fraction=round(n_crack / len(regions), 6), max_crack_probability=round(top, 6),
            **_domain_fields(scores, familiar), **d.meta, **extra)
        windowed = isinstance(prep, raster.PreparedWindow)  # issue 12: crack tiles of rasters always kept
        if prep.boxes is None or not (options.per_tile or windowed):
            return record, None
        tile_scales = prep_scales if prep_scales is not None else np.ones(len(probs), np.int64)
        tiles = [
            tile_record(path=d.item["path"], tile=i, **box.as_dict(), scale=int(sc),
                        crack_probability=round(float(p), 6), label=label_for(float(p), options.threshold),
                        in_domain=None if fam is None else bool(fam),
                        domain_score=None if np.isnan(s) else round(float(s), 4))
            for i, (box, sc, p, s, fam) in enumerate(zip(prep.boxes, tile_scales, probs, scores, familiar))
        ]
        if windowed:  # issue 12: raster tile ids, polygons in map coordinates, window fields
            return raster.finish_window(prep, record, tiles, options.per_tile, d.item.get("raster"))
        return record, tiles

    def _error(self, d: _Decoded) -> dict:
        return error_record(d.item["path"], d.error, model=self.classifier.info.name, worker=self.worker_name,
                            elapsed_ms=d.decode_ms, **raster.item_fields(d.item))  # issue 12: window of a raster

    def _empty_window(self, d: _Decoded) -> dict:
        return raster.empty_window_record(d.item["path"], d.prepared, d.item.get("raster"),
                                          model=self.classifier.info.name, worker=self.worker_name,
                                          elapsed_ms=d.decode_ms)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def limit_blas_threads() -> None:
    """One BLAS thread in this (worker) process.

    The only BLAS work in a worker is the in-domain check: a few small matrix
    products per batch.  OpenBLAS would run each on one busy-waiting thread per
    core, in every worker process at once; measured on 2 cores, that made the
    check cost 4-6 ms of CPU per image (more than the model) instead of ~0.15 ms.
    Parallelism comes from worker processes, inference threads and decode
    threads instead.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        log.warning("threadpoolctl missing: BLAS uses its default thread count")
        return
    threadpool_limits(1, user_api="blas")


def _domain_fields(scores: np.ndarray, familiar: np.ndarray) -> dict:
    """A photo is in-domain when most of its tiles are; its score is the median tile score."""
    if len(familiar) == 0 or familiar[0] is None:
        return {"in_domain": None, "domain_score": None}
    share = float(np.mean(familiar.astype(bool)))
    return {"in_domain": share >= 0.5, "domain_score": round(float(np.median(scores)), 4)}


def _metadata(header) -> dict:
    try:
        return header.meta
    except Exception:  # noqa: BLE001 - metadata is optional
        return {}
