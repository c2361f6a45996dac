"""Large photos as tiles: the grid, the tile inputs, EXIF orientation, reduced JPEG decoding, the pixel
limit, and a real worker finding the crack tiles of mosaic photos whose layout is known."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from shared.preprocessing import (ImageError, load_input, load_rgb, needs_tiling, prepare_image, tile_grid,
                                  tiles_to_inputs)
from benchmarks.common.imagery import PATCH, gps_exif, held_out_patches, layout, mosaic_photo


# ---- the grid -------------------------------------------------------------------------------------
@pytest.mark.parametrize("width,height,tile,overlap", [
    (1816, 1362, 227, 0), (4000, 3000, 227, 0), (4000, 3000, 227, 30), (500, 300, 227, 0),
    (227, 1000, 227, 0), (100, 3000, 227, 50), (1000, 228, 227, 0),
])
def test_tile_grid_covers_the_image_with_undistorted_tiles(width, height, tile, overlap):
    boxes = tile_grid(width, height, tile, overlap)
    covered = np.zeros((height, width), bool)
    for b in boxes:
        assert (b.w, b.h) == (min(tile, width), min(tile, height))  # every tile the same size: no stretching
        assert 0 <= b.x and b.x + b.w <= width and 0 <= b.y and b.y + b.h <= height
        covered[b.y:b.y + b.h, b.x:b.x + b.w] = True
    assert covered.all()
    assert len({(b.x, b.y) for b in boxes}) == len(boxes)
    xs, ys = sorted({b.x for b in boxes}), sorted({b.y for b in boxes})
    assert all(0 < b - a <= tile - overlap for a, b in zip(xs, xs[1:]))
    assert all(0 < b - a <= tile - overlap for a, b in zip(ys, ys[1:]))
    assert xs[-1] + min(tile, width) == width and ys[-1] + min(tile, height) == height  # edge tile flush


def test_grid_of_a_patch_mosaic_is_the_patch_grid():
    boxes = tile_grid(8 * PATCH, 6 * PATCH, PATCH)
    assert [(b.x, b.y, b.w, b.h) for b in boxes] == [(c * PATCH, r * PATCH, PATCH, PATCH)
                                                     for r in range(6) for c in range(8)]


def test_only_images_larger_than_a_tile_are_tiled():
    assert not needs_tiling(227, 227, 227)
    assert needs_tiling(228, 227, 227) and needs_tiling(227, 228, 227)
    assert not needs_tiling(4000, 3000, 0)


# ---- tile inputs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_mosaic(concrete_dir):
    """A 3×2 mosaic of held-out patches and the patch of each cell."""
    grid = layout(3, 2, seed=11, crack_share=0.5)
    return mosaic_photo(held_out_patches(concrete_dir), grid, seed=11)


def _expected_inputs(patches):
    return np.stack([load_input(str(p)) for p in patches]).astype(np.int16)


def test_tile_inputs_equal_the_patches_resized_alone(small_mosaic):
    """One resize of the whole photo then crops gives each tile what training gave each patch."""
    photo, used = small_mosaic
    inputs = tiles_to_inputs(photo, tile_grid(*photo.size, PATCH), photo.size, PATCH)
    diff = np.abs(inputs.astype(np.int16) - _expected_inputs(used))
    assert diff[:, 2:-2, 2:-2].max() <= 1           # identical but for rounding away from tile borders
    assert diff.mean() < 1.0                        # borders: the filter sees a little of the neighbour


@pytest.mark.parametrize("orientation,stored_as", [
    (3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270),
])
def test_exif_orientation_is_honoured_for_big_photos(small_mosaic, tmp_path, orientation, stored_as):
    photo, used = small_mosaic
    path = tmp_path / "turned.jpg"
    photo.transpose(stored_as).save(path, quality=97, exif=gps_exif(orientation=orientation))
    prepared = prepare_image(str(path))
    assert (prepared.width, prepared.height) == photo.size  # as displayed, not as stored
    assert [b.as_dict() for b in prepared.boxes] == [b.as_dict() for b in tile_grid(*photo.size, PATCH)]
    diff = np.abs(prepared.inputs.astype(np.int16) - _expected_inputs(used))
    assert diff.mean() < 3.0  # the same cells in the same order (JPEG re-encoding aside)


def test_big_jpeg_is_decoded_at_reduced_size_when_tiles_are_shrunk_anyway(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (120, 120, 120)).save(path, quality=80)
    assert load_rgb(str(path), draft_scale=0.2).size == (1000, 750)  # Pillow draft: 1/4 still >= 800×600
    requested = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size, *args, **kwargs):
        requested.append(size)
        return original(self, mode, size, *args, **kwargs)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    prepared = prepare_image(str(path), tile=4 * PATCH)  # tiles of 908 px become 160 px: scale 0.18
    assert requested and requested[0][0] < 4000
    assert prepared.inputs.shape[1:] == (160, 160, 3) and len(prepared.boxes) == 5 * 4


def test_photo_over_the_pixel_limit_is_refused_before_decoding(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (1000, 800), (120, 120, 120)).save(path)
    with pytest.raises(ImageError, match="too large"):
        prepare_image(str(path), max_pixels=799_999)
    assert prepare_image(str(path), max_pixels=800_000).width == 1000


# ---- a real worker on a survey folder --------------------------------------------------------------
@pytest.fixture(scope="module")
def patch_probabilities(survey_job, shipped_model):
    """Crack probability of every mosaic patch classified alone, in-process with the shipped model."""
    from shared.config import Settings
    from shared.inference import load_classifier

    classifier = load_classifier(Settings.load(model=str(shipped_model), backend="onnx", batch_size=16))
    out = {}
    for path, exp in survey_job.expected["photos"].items():
        out[path] = classifier.predict(_expected_inputs(exp["patches"]).astype(np.uint8))[0]
    return out


def test_crack_tiles_found_match_the_mosaic_layout(survey_job, patch_probabilities):
    correct = total = 0
    for path, exp in survey_job.expected["photos"].items():
        grid = exp["grid"]
        tiles = survey_job.tiles(path)
        rows, cols = grid.shape
        assert [(t["x"], t["y"], t["w"], t["h"]) for t in tiles] == [
            (c * PATCH, r * PATCH, PATCH, PATCH) for r in range(rows) for c in range(cols)]
        found = np.array([t["label"] == "crack" for t in tiles]).reshape(rows, cols)
        correct += int((found == grid).sum())
        total += grid.size
        probs = np.array([t["crack_probability"] for t in tiles])
        alone = patch_probabilities[path]
        # Tiling changes nothing the model sees: each tile scores like its patch on its own.
        assert np.mean(np.abs(probs - alone) < 0.05) >= 0.95, np.round(np.c_[probs, alone], 3)
    accuracy = correct / total
    print(f"tile-level accuracy on the mosaics: {correct}/{total} = {accuracy:.3f}")
    assert accuracy >= 0.95


def test_per_photo_record_aggregates_its_tiles(survey_job):
    for path, exp in survey_job.expected["photos"].items():
        photo, tiles = survey_job.photo(path), survey_job.tiles(path)
        probs = [t["crack_probability"] for t in tiles]
        n_crack = sum(p >= 0.5 for p in probs)
        assert photo["error"] == ""
        assert (photo["width"], photo["height"]) == (exp["grid"].shape[1] * PATCH, exp["grid"].shape[0] * PATCH)
        assert photo["tiles"] == len(tiles) == exp["grid"].size
        assert photo["crack_tiles"] == n_crack
        assert photo["crack_fraction"] == pytest.approx(n_crack / len(tiles), abs=1e-6)
        assert photo["max_crack_probability"] == pytest.approx(max(probs), abs=1e-6)
        assert photo["crack_probability"] == pytest.approx(max(probs), abs=1e-6)
        assert photo["label"] == ("crack" if n_crack else "no_crack")
        assert n_crack > 0  # every mosaic has crack cells


def test_small_images_are_classified_whole(survey_job):
    patches = survey_job.expected["patches"]
    right = 0
    for path, label in patches.items():
        record = survey_job.photo(path)
        assert record["tiles"] == 1 and not survey_job.tiles(path)
        assert (record["width"], record["height"]) == (PATCH, PATCH)
        right += record["label"] == label
    assert right >= len(patches) - 1


def test_photo_over_the_workers_pixel_limit_gets_an_error_record(survey_job):
    record = survey_job.photo(survey_job.expected["huge"])
    assert "too large" in record["error"] and "3000000" in record["error"]
    assert record["label"] == "" and record["crack_probability"] is None
    others = [r for r in survey_job.records if "tile" not in r and r["path"] != survey_job.expected["huge"]]
    assert others and all(r["error"] == "" for r in others)  # one bad photo loses nothing else


def test_worker_holds_only_a_few_decoded_photos_at_once(shipped_model, tmp_path, monkeypatch):
    """A chunk of big photos must not be decoded all at once (each is ~250 tiles of model input)."""
    import threading
    import weakref

    import worker.pipeline as pipeline
    from shared.config import Settings
    from shared.contract import ChunkOptions
    from shared.inference import load_classifier

    paths = []
    for i in range(6):
        paths.append(tmp_path / f"p{i}.jpg")
        Image.effect_noise((2400, 1800), 30).convert("RGB").save(paths[-1], quality=80)
    alive, lock = {"now": 0, "peak": 0}, threading.Lock()

    def released():
        with lock:
            alive["now"] -= 1

    def counted(*args, **kwargs):
        prepared = prepare_image(*args, **kwargs)
        with lock:
            alive["now"] += 1
            alive["peak"] = max(alive["peak"], alive["now"])
        weakref.finalize(prepared, released)
        return prepared

    monkeypatch.setattr(pipeline, "prepare_image", counted)
    settings = Settings.load(model=str(shipped_model), data_roots=str(tmp_path), batch_size=16, decode_threads=2)
    runner = pipeline.ChunkRunner(load_classifier(settings), settings, "test")
    try:
        out = runner.run([{"index": i, "path": str(p)} for i, p in enumerate(paths)], ChunkOptions())
    finally:
        runner.close()
    assert [out.records[i]["tiles"] for i in range(6)] == [11 * 8] * 6
    assert alive["peak"] <= 3  # the photo in the model, the next one decoding, and one in hand-over
