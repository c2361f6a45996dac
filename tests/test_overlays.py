"""Crack maps (`--overlays DIR`): a downsized photo with its crack tiles shaded, drawn from result records;
and `crackq run` end to end on a folder mixing a large photo and small patches."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from benchmarks.common.imagery import PATCH, gps_exif, held_out_patches, layout, mosaic_photo
from benchmarks.common.service import crackq_cli
from producer.overlays import CAPTION, MAX_SIDE, photos_with_tiles, write_overlays


def _records(path, grid, probs, width, height, **photo):
    rows, cols = grid.shape
    tiles = [{"path": str(path), "tile": i, "x": (i % cols) * PATCH, "y": (i // cols) * PATCH, "w": PATCH,
              "h": PATCH, "crack_probability": float(p)} for i, p in enumerate(probs)]
    return [{"path": str(path), "error": "", "width": width, "height": height,
             "max_crack_probability": max(probs), **photo}] + tiles


@pytest.fixture
def grey_photo(tmp_path):
    """A flat grey 8×6-tile photo: any colour in the map comes from the shading."""
    path = tmp_path / "flat.jpg"
    Image.new("RGB", (8 * PATCH, 6 * PATCH), (128, 128, 128)).save(path, quality=95)
    return path


def test_crack_tiles_are_shaded_by_probability_and_others_left_alone(grey_photo, tmp_path):
    grid = np.zeros((6, 8), bool)
    probs = np.zeros(48)
    probs[[1, 10, 20]] = [0.55, 0.8, 0.99]
    records = _records(grey_photo, grid, probs, 8 * PATCH, 6 * PATCH)
    [written] = write_overlays(records, tmp_path / "maps", threshold=0.5)
    img = np.asarray(Image.open(written).convert("RGB"), np.int16)
    scale = MAX_SIDE / (8 * PATCH)
    assert img.shape == (round(6 * PATCH * scale) + CAPTION, MAX_SIDE, 3)

    def centre(i):
        x, y = ((i % 8) + 0.5) * PATCH * scale, ((i // 8) + 0.5) * PATCH * scale
        return img[int(y), int(x)]

    plain = centre(0)
    assert np.abs(plain - 128).max() <= 3  # not a crack tile: the photo as it is
    low, mid, high = centre(1), centre(10), centre(20)
    for pixel in (low, mid, high):
        assert pixel[0] > pixel[2] + 40  # warm tint
    assert low[1] > mid[1] > high[1]  # yellow at the threshold -> red at probability 1
    tint = [np.abs(p - 128).sum() for p in (low, mid, high)]
    assert tint[0] < tint[1] < tint[2]  # and stronger with probability


def test_maps_only_for_tiled_photos_without_errors_and_unique_names(grey_photo, tmp_path):
    other = tmp_path / "b" / "flat.jpg"  # same file name, other folder
    other.parent.mkdir()
    shutil.copy(grey_photo, other)
    grid = np.zeros((6, 8), bool)
    records = (_records(grey_photo, grid, np.full(48, 0.9), 8 * PATCH, 6 * PATCH)
               + [{"path": "/x/small.jpg", "error": "", "width": 227, "height": 227, "tiles": 1}]
               + [{"path": "/x/broken.jpg", "error": "corrupt", "width": None, "height": None}]
               + _records(other, grid, np.full(48, 0.1), 8 * PATCH, 6 * PATCH)
               + _records(tmp_path / "missing.jpg", grid, np.full(48, 0.9), 8 * PATCH, 6 * PATCH))
    assert [len(t) for _, t in photos_with_tiles(records)] == [48, 0, 0, 48, 48]
    written = write_overlays(records, tmp_path / "maps", threshold=0.5)
    assert len(written) == 2 and written[0].name == "flat.jpg"  # the missing photo is skipped
    assert written[1].name.startswith("flat-") and written[1].suffix == ".jpg"


def test_crackq_run_classifies_a_mixed_folder_and_draws_crack_maps(concrete_dir, tmp_path):
    """The embedded default end to end: private Redis + a local worker on the shipped model."""
    held = held_out_patches(concrete_dir)
    folder = tmp_path / "survey"
    folder.mkdir()
    grid = layout(8, 6, seed=21)
    photo, _ = mosaic_photo(held, grid, seed=21)
    photo.save(folder / "deck_0001.jpg", quality=93, exif=gps_exif(47.3769, 8.5417, 430.0, "2024:06:01 12:00:00"))
    shutil.copy(held["Positive"][0], folder / "patch_crack.jpg")
    shutil.copy(held["Negative"][0], folder / "patch_plain.jpg")
    out, maps = tmp_path / "results.csv", tmp_path / "maps"
    crackq_cli("run", str(folder), "--out", str(out), "--overlays", str(maps), env={"CRACKQ_REDIS_URL": ""})
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"deck_0001.jpg", "patch_crack.jpg", "patch_plain.jpg"}
    assert rows["deck_0001.jpg"]["tiles"] == "48" and int(rows["deck_0001.jpg"]["crack_tiles"]) == grid.sum()
    assert rows["deck_0001.jpg"]["latitude"] == "47.3769"
    assert rows["patch_crack.jpg"]["label"] == "crack" and rows["patch_plain.jpg"]["label"] == "no_crack"
    assert sorted(p.name for p in maps.iterdir()) == ["deck_0001.jpg"]
    with Image.open(maps / "deck_0001.jpg") as crack_map:
        assert crack_map.size == (MAX_SIDE, round(6 * PATCH * MAX_SIDE / (8 * PATCH)) + CAPTION)


def test_results_of_a_submitted_job_can_draw_crack_maps_too(survey_job, tmp_path):
    maps = tmp_path / "maps"
    out = tmp_path / "r.csv"
    done = crackq_cli("results", survey_job.job_id, "--overlays", str(maps), "--output", str(out),
                      env=survey_job.env)
    assert "wrote 3 crack map(s)" in done.stderr
    assert sorted(p.name for p in maps.iterdir()) == ["mosaic_gps.jpg", "mosaic_rotated.jpg", "no_gps.jpg"]
    with Image.open(maps / "mosaic_rotated.jpg") as upright:
        assert upright.width > upright.height  # drawn on the photo as displayed (EXIF orientation)
    assert "tile" not in out.read_text().splitlines()[0].split(",")  # photo rows only without --per-tile
