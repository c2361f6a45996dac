"""Tiles offered for labelling: cut from photos (or read from a finished job), scored, and picked.

Both ``crackq label`` and ``crackq tiles export --strategy uncertain`` start
here.  Tiles are cut where workers cut them (:func:`shared.preprocessing.tile_grid`
on the EXIF-oriented photo); their model inputs are made by
:func:`shared.preprocessing.tiles_to_inputs` (the worker's code) and scored by
the model's ONNX export (:mod:`shared.onnx_model`), so a probability shown
to a labeller is the one a worker serves.  For a finished job submitted with
``--per-tile`` the probabilities come from the job itself and only the
candidates the picking keeps are run through the model (for their features).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from shared.config import Settings
from shared.picking import POOL_FACTOR, pick_random, pick_uncertain, uncertainty
from shared import storage
from shared.preprocessing import (INPUT_SIZE, Box, ImageError, check_file, load_rgb, oriented_size, tile_grid,
                                 tiles_to_inputs)


@dataclass
class Tile:
    """One tile of one photo; ``probability`` is the model's crack probability once scored."""

    photo: str
    box: Box
    probability: float | None = None

    @property
    def key(self) -> tuple:
        return (self.photo, self.box.x, self.box.y, self.box.w, self.box.h)


@dataclass
class Candidates:
    tiles: list[Tile]
    tile_size: int
    threshold: float
    failed: dict[str, str]


def from_photos(paths: list[str], settings: Settings, size: int | None = None) -> Candidates:
    """Every tile of ``paths`` (headers only; nothing decoded yet)."""
    size = size or settings.tile_size
    grid, failed = plan(paths, size, settings.max_pixels, settings.max_file_bytes)
    return Candidates([Tile(p, b) for p, b in grid], size, settings.threshold, failed)


def from_job(job_id: str, settings: Settings) -> Candidates:
    """The tile records of a finished job submitted with ``--per-tile`` (probabilities included)."""
    from producer.api import Client

    client = Client(settings)
    status = client.status(job_id)
    if not status.finished:
        raise ValueError(f"job {job_id} is {status.state} ({status.done}/{status.total}): wait for it first")
    options = client.store.options(job_id)
    tiles = [Tile(r["path"], Box(int(r["x"]), int(r["y"]), int(r["w"]), int(r["h"])),
                  None if r.get("crack_probability") is None else float(r["crack_probability"]))
             for r in client.results(job_id, per_tile=True) if "tile" in r]
    if not tiles:
        raise ValueError(f"job {job_id} has no tile records: submit it with --per-tile")
    return Candidates(tiles, int(options.get("tile_size") or settings.tile_size),
                      float(options.get("threshold", settings.threshold)), {})


def score(model, tiles: list[Tile], size: int, settings: Settings,
          progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Probabilities and pooled features of ``tiles`` (each photo decoded once).

    Returns ``(probs, features, ok)``: rows for the readable tiles, ``ok``
    their indices in ``tiles``; a photo that cannot be decoded is left out.
    """
    by_photo: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(tiles):
        by_photo[t.photo].append(i)
    probs, feats, ok = [], [], []
    for photo, index in by_photo.items():
        try:
            inputs = photo_inputs(photo, [tiles[i].box for i in index], size, settings)
        except ImageError:
            continue
        p, f = model.predict(inputs)
        probs.append(p)
        feats.append(f)
        ok += index
        if progress:
            progress(len(index))
    if not ok:
        return np.zeros(0), np.zeros((0, 0)), []
    return np.concatenate(probs), np.concatenate(feats), ok


def photo_inputs(photo: str, boxes: list[Box], size: int, settings: Settings) -> np.ndarray:
    """Model inputs of ``boxes`` of one photo, decoded exactly as a worker decodes a tiled photo."""
    width, height = oriented_size(photo, settings.max_pixels)
    img = load_rgb(photo, max_pixels=settings.max_pixels, max_file_bytes=settings.max_file_bytes,
                   draft_scale=INPUT_SIZE / size)
    try:
        return tiles_to_inputs(img, boxes, (width, height), size)
    finally:
        img.close()


def choose(cands: Candidates, n: int, strategy: str, model=None, settings: Settings | None = None,
           seed: int = 0, exclude: set | None = None, progress=None) -> list[Tile]:
    """``n`` tiles to label, best first, skipping the keys in ``exclude`` (tiles labelled before).

    ``uncertain`` needs ``model`` (an :class:`shared.onnx_model.OnnxModel`);
    tiles it scores get their ``probability`` filled in.
    """
    settings = settings or Settings.load()
    tiles = [t for t in cands.tiles if not exclude or t.key not in exclude]
    if strategy == "random":
        return [tiles[i] for i in pick_random(len(tiles), n, seed)]
    if all(t.probability is not None for t in tiles):
        # Probabilities known (a job): run the model only on the most uncertain candidates, for features.
        unc = uncertainty(np.array([t.probability for t in tiles]), cands.threshold)
        tiles = [tiles[i] for i in np.argsort(-unc, kind="stable")[:n * POOL_FACTOR]]
    probs, feats, ok = score(model, tiles, cands.tile_size, settings, progress)
    scored = [tiles[i] for i in ok]
    for t, p in zip(scored, probs):
        t.probability = float(p) if t.probability is None else t.probability
    known = np.array([t.probability for t in scored])
    picked = pick_uncertain(known, feats, [t.photo for t in scored], n, cands.threshold)
    return [scored[i] for i in picked]


def plan(paths: list[str], size: int, max_pixels: int,
         max_file_bytes: int) -> tuple[list[tuple[str, Box]], dict[str, str]]:
    """Every ``(photo, tile box)`` of ``paths`` (headers only, nothing decoded) and the unreadable photos."""
    grid: list[tuple[str, Box]] = []
    failed: dict[str, str] = {}
    for path in paths:
        try:
            source = storage.source(path, max_file_bytes)  # issue 12: s3:// objects fetched
            check_file(source, max_file_bytes)
            width, height = oriented_size(source, max_pixels)
        except ImageError as exc:
            failed[path] = str(exc)
            continue
        grid.extend((path, box) for box in tile_grid(width, height, size))
    return grid, failed
