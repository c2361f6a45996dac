"""Classify one chunk: decode in threads while the model runs, then build one record per image.

Decoding (Pillow, which releases the GIL) runs in a small thread pool a few
images ahead of inference, so the cores stay busy; at most ``lookahead``
decoded images are held at once, which bounds memory with large photos.
Images are grouped until they fill a batch, so a chunk of small patches and a
tiled 12-megapixel photo both run through full batches.

Per-image problems never escape: each becomes an error record and the rest of
the chunk is classified.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

from shared.config import Settings
from shared.contract import ChunkOptions, error_record, label_for, result_record
from shared.exif import photo_metadata
from shared.preprocessing import ImageError, PreparedImage, is_under_roots, prepare_image


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
        self.pool = ThreadPoolExecutor(max(1, settings.decode_threads), thread_name_prefix="decode")

    def run(self, items: list[dict], options: ChunkOptions,
            should_stop: Callable[[], bool] = lambda: False) -> ChunkOutput:
        out = ChunkOutput({}, {})
        group: list[_Decoded] = []
        n_inputs = 0
        for decoded in self._decode_ahead(items, options):
            if decoded.error:
                out.records[decoded.item["index"]] = self._error(decoded)
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
        and inference overlap instead of taking turns.  Decoded inputs waiting
        to be consumed are capped at two batches, so a run of big tiled photos
        cannot pile up in memory.
        """
        lookahead = self.classifier.batch_size + max(1, self.settings.decode_threads)
        input_cap = 2 * self.classifier.batch_size
        pending: deque = deque()
        queue = iter(items)
        while True:
            while len(pending) < lookahead and _ready_inputs(pending) < input_cap:
                item = next(queue, None)
                if item is None:
                    break
                pending.append(self.pool.submit(self._decode, item, options))
            if not pending:
                return
            yield pending.popleft().result()

    def _decode(self, item: dict, options: ChunkOptions) -> _Decoded:
        start = time.perf_counter()
        decoded = _Decoded(item)
        path = item["path"]
        try:
            if not is_under_roots(path, self.roots):
                raise ImageError("path outside the worker's data roots (CRACKQ_DATA_ROOTS)")
            decoded.prepared = prepare_image(
                path, size=self.classifier.info.input_size, tile=options.tile_size, overlap=options.tile_overlap,
                max_pixels=self.settings.max_pixels, max_file_bytes=self.settings.max_file_bytes)
            decoded.meta = _metadata(path)
        except ImageError as exc:
            decoded.error = str(exc)
        except MemoryError:
            decoded.error = "out of memory while decoding"
        except Exception as exc:  # noqa: BLE001 - a bad file must not take the chunk down
            decoded.error = f"cannot decode image: {type(exc).__name__}: {str(exc)[:120]}"
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
        prep = d.prepared
        n_crack = int((probs >= options.threshold).sum())
        top = float(probs.max())
        record = result_record(
            d.item["path"], label=label_for(top, options.threshold), crack_probability=top,
            model=self.classifier.info.name, worker=self.worker_name, elapsed_ms=elapsed_ms,
            width=prep.width, height=prep.height, tiles=len(probs), crack_tiles=n_crack,
            crack_fraction=round(n_crack / len(probs), 6), max_crack_probability=round(top, 6),
            **_domain_fields(scores, familiar), **d.meta)
        if prep.boxes is None or not options.per_tile:
            return record, None
        tiles = [
            {"path": d.item["path"], "tile": i, **box.as_dict(), "crack_probability": round(float(p), 6),
             "label": label_for(float(p), options.threshold),
             "in_domain": None if fam is None else bool(fam),
             "domain_score": None if np.isnan(s) else round(float(s), 4)}
            for i, (box, p, s, fam) in enumerate(zip(prep.boxes, probs, scores, familiar))
        ]
        return record, tiles

    def _error(self, d: _Decoded) -> dict:
        return error_record(d.item["path"], d.error, model=self.classifier.info.name, worker=self.worker_name,
                            elapsed_ms=d.decode_ms)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _ready_inputs(pending: deque) -> int:
    """Model inputs already decoded among ``pending`` futures (a tiled photo counts its tiles)."""
    total = 0
    for future in pending:
        if future.done() and not future.exception():
            prepared = future.result().prepared
            total += len(prepared.inputs) if prepared is not None else 0
    return total


def _domain_fields(scores: np.ndarray, familiar: np.ndarray) -> dict:
    """A photo is in-domain when most of its tiles are; its score is the median tile score."""
    if len(familiar) == 0 or familiar[0] is None:
        return {"in_domain": None, "domain_score": None}
    share = float(np.mean(familiar.astype(bool)))
    return {"in_domain": share >= 0.5, "domain_score": round(float(np.median(scores)), 4)}


def _metadata(path: str) -> dict:
    try:
        with Image.open(path) as img:
            return photo_metadata(img)
    except Exception:  # noqa: BLE001 - metadata is optional
        return {}
