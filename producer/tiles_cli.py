"""``crackq tiles export`` and ``crackq tiles from-masks``: cut a sample of tiles out of survey photos, for labelling and fine-tuning.

Adapting the model to a new survey (docs/drone.md) starts here: the tiles are
cut exactly where the workers cut them (:func:`shared.preprocessing.tile_grid`
on the EXIF-oriented photo) and saved at full resolution, like the 227 px
training patches.  A person sorts them into ``Positive/`` and ``Negative/``,
and ``crackq train OUT --init-model ...`` fine-tunes on them.  A ``tiles.csv``
manifest records where each tile came from.

``crackq tiles from-masks`` labels tiles automatically from segmentation masks
(:mod:`shared.mask_tiles`), for surveys that come with crack masks.
"""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from pathlib import Path

import click
import numpy as np

from producer.candidates import plan  # noqa: F401  (moved there: no import cycle)
from producer.discover import discover
from shared import storage
from shared.config import Settings
from shared.mask_tiles import (DEFAULT_BORDER_FRACTION, DEFAULT_MIN_CRACK_FRACTION, POSITIVE, load_mask,
                               mask_tiles)
from shared.preprocessing import IMAGE_EXTENSIONS, Box, ImageError, check_file, load_rgb, oriented_size, tile_grid

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


# -- tiles from segmentation masks -------------------------------------------------
MASK_MANIFEST_FIELDS = ["file", "photo", "x", "y", "w", "h", "crack_fraction", "label"]


@tiles.command(name="from-masks")
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("masks_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder to write OUT/Positive and OUT/Negative into.")
@click.option("--size", required=True, type=click.IntRange(8), help="Tile size in px (source pixels).")
@click.option("--stride", type=click.IntRange(1), default=None, help="Step between tiles [default: --size].")
@click.option("--min-crack-fraction", type=click.FloatRange(0, 1, min_open=True),
              default=DEFAULT_MIN_CRACK_FRACTION, show_default=True,
              help="Share of crack pixels a Positive tile needs; tiles with fewer (but some) are left out.")
@click.option("--border-fraction", type=click.FloatRange(0, 0.5, max_open=True),
              default=DEFAULT_BORDER_FRACTION, show_default=True,
              help="Tiles whose crack pixels all lie in this edge band (share of the side) are left out.")
@click.option("--max-negatives-per-photo", type=click.IntRange(0), default=None,
              help="Keep at most N (seeded random) Negative tiles per photo.")
@click.option("--photos-list", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Only these photos: a text file of file stems (one a line) or a uav_split.json with --split.")
@click.option("--split", "split_name", type=click.Choice(["train", "val", "test"]), default=None,
              help="Which split of a --photos-list uav_split.json.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --max-negatives-per-photo.")
def from_masks(images_dir, masks_dir, out, size, stride, min_crack_fraction, border_fraction,
               max_negatives_per_photo, photos_list, split_name, seed):
    """Cut IMAGES_DIR photos into labelled tiles using the masks of the same file stem in MASKS_DIR.

    A tile with no crack pixel goes to OUT/Negative, one with at least
    --min-crack-fraction crack pixels reaching inside the tile to OUT/Positive;
    ambiguous tiles (a few crack pixels, or a crack grazing the edge) are left out.
    A tiles.csv manifest records each tile's photo, box, crack fraction and label.
    """
    if stride is not None and stride > size:
        raise click.BadParameter("must not exceed --size", param_hint="--stride")
    settings = Settings.load()
    pairs, unmatched = _mask_pairs(Path(images_dir), Path(masks_dir))
    if photos_list:
        wanted = _photo_list(Path(photos_list), split_name)
        pairs = {k: v for k, v in pairs.items() if k in wanted}
    if not pairs:
        raise click.ClickException(f"no photo in {images_dir} has a mask with the same file stem in {masks_dir}"
                                   + (" (within --photos-list)" if photos_list else ""))
    rng = np.random.default_rng(seed)
    out_path = Path(out)
    for label in ("Positive", "Negative"):
        (out_path / label).mkdir(parents=True, exist_ok=True)
    rows, failed, ambiguous = [], {}, 0
    for stem, (image_path, mask_path) in pairs.items():
        try:
            img = load_rgb(image_path, max_pixels=settings.max_pixels, max_file_bytes=settings.max_file_bytes)
            mask = load_mask(mask_path, img.size)
        except (ImageError, OSError) as exc:
            failed[image_path] = str(exc)
            continue
        labelled = mask_tiles(mask, min(size, *img.size), stride, min_crack_fraction, border_fraction)
        ambiguous += sum(t.label is None for t in labelled)
        chosen = _cap_negatives([t for t in labelled if t.label is not None], max_negatives_per_photo, rng)
        for t in chosen:
            folder = "Positive" if t.label == POSITIVE else "Negative"
            name = f"{folder}/{stem}_s{size}_x{t.box.x}_y{t.box.y}.png"
            img.crop((t.box.x, t.box.y, t.box.x + t.box.w, t.box.y + t.box.h)).save(out_path / name)
            rows.append({"file": name, "photo": image_path, **t.box.as_dict(),
                         "crack_fraction": round(t.crack_fraction, 6), "label": folder})
        img.close()
    _append_manifest(out_path / MANIFEST, rows)
    for path, reason in {**unmatched, **failed}.items():
        click.echo(f"skipped {path}: {reason}", err=True)
    n_pos = sum(r["label"] == "Positive" for r in rows)
    click.echo(f"wrote {n_pos} Positive and {len(rows) - n_pos} Negative tile(s) of {size} px from "
               f"{len(pairs) - len(failed)} photo(s) to {out}; left out {ambiguous} ambiguous tile(s)")
    if not rows:
        raise click.ClickException("no tiles written")


def _mask_pairs(images_dir: Path, masks_dir: Path) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """``stem -> (image, mask)``, and the images that have no mask."""
    masks = {p.stem: str(p) for p in masks_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    pairs, unmatched = {}, {}
    for p in sorted(images_dir.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if p.stem in masks:
            pairs[p.stem] = (str(p), masks[p.stem])
        else:
            unmatched[str(p)] = f"no mask named {p.stem}.* in {masks_dir}"
    return pairs, unmatched


def _photo_list(path: Path, split_name: str | None) -> set[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        import json

        doc = json.loads(text)
        if split_name is None:
            raise click.UsageError("--photos-list is a split file: give --split train|val|test")
        return set(doc["photos"][split_name])
    return {Path(line.strip()).stem for line in text.splitlines() if line.strip() and not line.startswith("#")}


def _cap_negatives(tiles_, cap: int | None, rng: np.random.Generator):
    negatives = [i for i, t in enumerate(tiles_) if t.label != POSITIVE]
    if cap is None or len(negatives) <= cap:
        return tiles_
    dropped = set(np.asarray(negatives)[rng.permutation(len(negatives))[cap:]].tolist())
    return [t for i, t in enumerate(tiles_) if i not in dropped]


def _append_manifest(path: Path, rows: list[dict]) -> None:
    with open(path, "a" if path.exists() else "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MASK_MANIFEST_FIELDS, lineterminator="\n")
        if fh.tell() == 0:
            writer.writeheader()
        writer.writerows(rows)
