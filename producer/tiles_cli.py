"""``crackq tiles export``: cut a sample of tiles out of survey photos, for labelling and fine-tuning.

Adapting the model to a new survey (docs/drone.md) starts here: the tiles are
cut exactly where the workers cut them (:func:`shared.preprocessing.tile_grid`
on the EXIF-oriented photo) and saved at full resolution, like the 227 px
training patches.  A person sorts them into ``Positive/`` and ``Negative/``,
and ``crackq train OUT --init-model ...`` fine-tunes on them.  A ``tiles.csv``
manifest records where each tile came from.
"""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from pathlib import Path

import click
import numpy as np

from producer.discover import discover
from shared import storage
from shared.config import Settings
from shared.preprocessing import Box, ImageError, check_file, load_rgb, oriented_size, tile_grid

MANIFEST = "tiles.csv"


@click.group()
def tiles():
    """Tiles of large photos (for adapting the model to a new survey)."""


@tiles.command()
@click.argument("photos", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the tiles into.")
@click.option("--size", type=click.IntRange(1), default=None,
              help="Tile size in px [default: setting tile_size, 227].")
@click.option("--sample", type=click.IntRange(1), default=None,
              help="Export N tiles drawn at random from all photos (default: every tile).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --sample.")
@click.option("--strategy", type=click.Choice(["random", "uncertain"]), default="random", show_default=True,
              help="How --sample picks: random, or uncertain (tiles the model is unsure about, spread over photos "
                   "and looks, most useful first; runs the model CRACKQ_MODEL on every tile).")
@click.option("--no-recursive", is_flag=True, help="Do not search folders recursively.")
def export(photos, out, size, sample, seed, strategy, no_recursive):
    """Write the tiles of PHOTOS (files, folders, globs) as JPEGs into OUT, with a tiles.csv manifest."""
    settings = Settings.load()
    size = size or settings.tile_size
    if not size:
        raise click.UsageError("tiling is off (CRACKQ_TILE_SIZE=0): give --size")
    try:
        found = discover(list(photos), recursive=not no_recursive)
    except storage.StorageError as exc:  # issue 12: an s3:// listing failed
        raise click.ClickException(str(exc)) from None
    if not found.paths:
        raise click.ClickException("no images found in " + " ".join(photos))
    grid, failed = plan(found.paths, size, settings.max_pixels, settings.max_file_bytes)
    if strategy == "uncertain" and sample is not None and sample < len(grid):
        chosen = choose_uncertain(grid, size, sample, settings)
    else:
        chosen = choose(grid, sample, seed)
    written = write_tiles(chosen, Path(out), settings.max_pixels, settings.max_file_bytes, failed)
    for path, reason in failed.items():
        click.echo(f"skipped {path}: {reason}", err=True)
    if not written:
        raise click.ClickException("no tiles written")
    click.echo(f"wrote {written} tile(s) of {size} px from {len(found.paths) - len(failed)} photo(s) to {out}; "
               f"sort them into {Path(out) / 'Positive'} and {Path(out) / 'Negative'}, then "
               f"`crackq train {out} --init-model MODEL --out NEW_MODEL_DIR`")


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


def choose(grid: list[tuple[str, Box]], sample: int | None, seed: int) -> dict[str, list[Box]]:
    """The tiles to export, grouped by photo so each photo is decoded once."""
    picked = grid
    if sample is not None and sample < len(grid):
        index = np.random.default_rng(seed).choice(len(grid), size=sample, replace=False)
        picked = [grid[i] for i in sorted(index)]
    by_photo: dict[str, list[Box]] = defaultdict(list)
    for path, box in picked:
        by_photo[path].append(box)
    return by_photo


def choose_uncertain(grid: list[tuple[str, Box]], size: int, sample: int, settings: Settings) -> dict[str, list[Box]]:
    """The ``sample`` tiles :mod:`shared.picking` rates most worth labelling (``--strategy uncertain``)."""
    from producer.candidates import Candidates, Tile, choose as pick
    from shared.onnx_model import OnnxModel

    try:
        model = OnnxModel.load(settings.model)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    cands = Candidates([Tile(p, b) for p, b in grid], size, model.threshold(settings.threshold), {})
    by_photo: dict[str, list[Box]] = defaultdict(list)
    for tile in pick(cands, sample, "uncertain", model, settings):
        by_photo[tile.photo].append(tile.box)
    return by_photo


def write_tiles(by_photo: dict[str, list[Box]], out: Path, max_pixels: int, max_file_bytes: int,
                failed: dict[str, str]) -> int:
    """Decode each photo once (EXIF-oriented), save its chosen tiles, and write the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    stems: dict[str, str] = {}
    rows = []
    for path, boxes in by_photo.items():
        try:
            img = load_rgb(storage.source(path, max_file_bytes), max_pixels=max_pixels, max_file_bytes=max_file_bytes)
        except ImageError as exc:
            failed[path] = str(exc)
            continue
        stem = _stem(path, stems)
        for box in boxes:
            name = f"{stem}_x{box.x}_y{box.y}.jpg"
            img.crop((box.x, box.y, box.x + box.w, box.y + box.h)).save(out / name, quality=95)
            rows.append({"file": name, "photo": path, **box.as_dict()})
        img.close()
    with open(out / MANIFEST, "a" if (out / MANIFEST).exists() else "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "photo", "x", "y", "w", "h"], lineterminator="\n")
        if fh.tell() == 0:
            writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def _stem(path: str, stems: dict[str, str]) -> str:
    """The photo's file stem, made unique with a hash of its path when two photos share a name."""
    stem = Path(path).stem
    if stem in stems.values():
        stem = f"{stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    stems[path] = stem
    return stem
