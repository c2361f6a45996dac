"""Orthomosaics: GeoTIFFs written with rasterio from real patches (known CRS, transform and crack layout),
split into windows over the workers, transparent areas skipped, crack tiles on the map (GeoJSON in WGS84,
GeoPackage in the native CRS), from disk and from S3; rasters without a CRS and corrupt GeoTIFFs answered."""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common.imagery import PATCH, held_out_patches, layout, mosaic_photo
from benchmarks.common.s3server import BUCKET, upload
from benchmarks.common.service import WorkerProcess, crackq_cli, per_tile_job
from shared.preprocessing import tile_grid
from shared.raster import plan_windows, window_tiles

COLS, ROWS = 10, 8
CRS = "EPSG:32633"
GSD = 0.01                             # metres per pixel
ORIGIN = (500_000.0, 4_650_000.0)      # UTM 33N, top-left corner
TRANSPARENT = [(0, 0), (0, 1), (1, 0), (1, 1)]  # cells (row, col) outside the survey footprint (alpha 0)
WINDOW = 4 * PATCH                      # 3 × 2 windows of 4 × 4 tiles


# ---- planning (no worker) --------------------------------------------------------------------------
@pytest.mark.parametrize("width,height,overlap,window", [
    (COLS * PATCH, ROWS * PATCH, 0, WINDOW), (5000, 3001, 0, 1000), (5000, 3001, 30, 1000), (300, 2000, 0, 256),
    (20_000, 20_000, 0, 4096),
])
def test_windows_split_the_tile_grid_exactly(width, height, overlap, window):
    windows = plan_windows(width, height, PATCH, overlap, window)
    tiles = [t for w in windows for t in window_tiles(width, height, w, PATCH, overlap)]
    grid = tile_grid(width, height, PATCH, overlap)
    assert sorted((b.x, b.y) for _, b in tiles) == sorted((b.x, b.y) for b in grid)  # each tile once
    assert sorted(i for i, _ in tiles) == list(range(len(grid)))                     # ids number the grid
    by_id = {i: b for i, b in tiles}
    assert all(by_id[i] == b for i, b in enumerate(grid))                             # row-major like the grid
    assert all(w[2] <= max(window, PATCH) + PATCH and w[3] <= max(window, PATCH) + PATCH for w in windows)


def test_window_records_merge_into_one_record_per_raster_even_when_a_chunk_failed():
    from producer.rasters import assemble

    def part(i, tiles, crack, top, **extra):
        return {"path": "/o.tif", "label": "crack" if crack else "no_crack", "crack_probability": top,
                "error": "", "worker": f"w{i}", "elapsed_ms": 10.0, "width": 900, "height": 400,
                "tiles": tiles, "crack_tiles": crack, "max_crack_probability": top, "in_domain": True,
                "domain_score": 0.2, "crs": CRS, "window": [i * 300, 0, 300, 400], "raster": [i, 3], **extra}

    records = [{"path": "/a.jpg", "label": "no_crack", "error": ""},
               part(0, 2, 1, 0.9), {"path": "/o.tif", "tile": 1, "label": "crack"},
               {"path": "/o.tif", "label": "", "error": "chunk timed out"},  # on_failure writes no window fields
               part(2, 2, 0, 0.2), {"path": "/o.tif", "tile": 0, "label": "no_crack"},
               {"path": "/b.jpg", "label": "crack", "error": ""}]
    out = list(assemble(records))
    assert [r["path"] for r in out] == ["/a.jpg", "/o.tif", "/o.tif", "/o.tif", "/b.jpg"]
    merged = out[1]
    assert (merged["tiles"], merged["crack_tiles"], merged["max_crack_probability"]) == (4, 1, 0.9)
    assert merged["label"] == "crack" and merged["error"] == "1 of 3 windows failed: chunk timed out"
    assert merged["windows"] == merged["windows_done"] == 3 and merged["worker"] == "w0,w2"
    assert "window" not in merged and [t["tile"] for t in out[2:4]] == [0, 1]  # tiles in raster order


# ---- rasters from real patches ---------------------------------------------------------------------
def write_geotiff(path: Path, photo, crs: str | None, alpha_cells=(), damage: bool = False) -> None:
    import rasterio
    from rasterio.transform import from_origin

    rgb = np.moveaxis(np.array(photo, np.uint8), -1, 0).copy()
    alpha = np.full(rgb.shape[1:], 255, np.uint8)
    for r, c in alpha_cells:
        alpha[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = 0
        rgb[:, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = 0
    profile = {"driver": "GTiff", "width": rgb.shape[2], "height": rgb.shape[1], "count": 4, "dtype": "uint8",
               "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate", "photometric": "RGB",
               "alpha": "YES"}
    if crs:
        profile.update(crs=crs, transform=from_origin(ORIGIN[0], ORIGIN[1], GSD, GSD))
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(np.concatenate([rgb, alpha[None]]))
    if damage:  # the header and tile index survive; compressed pixels near the end (bottom rows) are noise
        data = bytearray(path.read_bytes())
        start, end = len(data) * 8 // 10, len(data) * 9 // 10
        data[start:end] = np.random.default_rng(0).integers(0, 256, end - start, dtype=np.uint8).tobytes()
        path.write_bytes(bytes(data))


@dataclass
class OrthoJob:
    records: list
    paths: dict
    grid: np.ndarray
    job_id: str
    env: dict

    def raster(self, name: str) -> dict:
        return next(r for r in self.records if r["path"] == self.paths[name] and "tile" not in r)

    def tiles(self, name: str) -> list:
        return [r for r in self.records if r["path"] == self.paths[name] and "tile" in r]


@pytest.fixture(scope="module")
def ortho_job(concrete_dir, s3_server, redis_server, shipped_model, tmp_path_factory) -> OrthoJob:
    """One job: a georeferenced orthomosaic (on disk and in S3), the same without CRS, two corrupt GeoTIFFs;
    windows of 4×4 tiles; one real worker; results with every tile."""
    folder = tmp_path_factory.mktemp("ortho")
    grid = layout(COLS, ROWS, seed=21, crack_share=0.35)
    photo, _ = mosaic_photo(held_out_patches(concrete_dir), grid, seed=21)
    paths = {"geo": folder / "ortho.tif", "plain": folder / "no-crs.tif", "damaged": folder / "damaged.tif",
             "garbage": folder / "garbage.tif"}
    write_geotiff(paths["geo"], photo, CRS, TRANSPARENT)
    write_geotiff(paths["plain"], photo, None)
    write_geotiff(paths["damaged"], photo, CRS, damage=True)
    paths["garbage"].write_bytes(b"II*\x00" + b"\x13" * 5000)
    key = f"{BUCKET}/ortho-{uuid.uuid4().hex[:6]}/ortho.tif"
    upload(s3_server.filesystem(), {key: paths["geo"]})
    paths = {k: str(v) for k, v in paths.items()} | {"s3": "s3://" + key}
    queue = f"test-ortho-{uuid.uuid4().hex[:8]}"
    env = {"CRACKQ_REDIS_URL": redis_server.url, "CRACKQ_QUEUE": queue, "CRACKQ_RASTER_WINDOW": str(WINDOW),
           **s3_server.env()}
    worker = WorkerProcess(redis_server.url, queue, folder / "worker.log", model=shipped_model,
                           env={**s3_server.env(), "CRACKQ_DATA_ROOTS": f"{folder},s3://{BUCKET}/"})
    job_id, records, _ = per_tile_job(worker, *paths.values(), env=env, out=folder / "results.jsonl")
    return OrthoJob(records, paths, grid, job_id, env)


def _cell_centre_lonlat(r: int, c: int) -> tuple[float, float]:
    """Where cell (r, c) really is, computed independently of crackq: the geotransform, then pyproj."""
    from pyproj import Transformer

    x = ORIGIN[0] + (c + 0.5) * PATCH * GSD
    y = ORIGIN[1] - (r + 0.5) * PATCH * GSD
    return Transformer.from_crs(CRS, "EPSG:4326", always_xy=True).transform(x, y)


def _metres(a: tuple[float, float], b: tuple[float, float]) -> float:
    from pyproj import Geod

    return Geod(ellps="WGS84").inv(a[0], a[1], b[0], b[1])[2]


@pytest.mark.parametrize("name", ["geo", "s3"])
def test_an_orthomosaic_is_read_by_windows_into_one_record(ortho_job, name):
    record = ortho_job.raster(name)
    opaque = COLS * ROWS - len(TRANSPARENT)
    assert record["error"] == "" and record["windows"] == record["windows_done"] == 6
    assert (record["width"], record["height"], record["crs"]) == (COLS * PATCH, ROWS * PATCH, CRS)
    assert record["tiles"] == opaque and record["skipped_tiles"] == len(TRANSPARENT)
    tiles = ortho_job.tiles(name)
    assert sorted(t["tile"] for t in tiles) == sorted(r * COLS + c for r in range(ROWS) for c in range(COLS)
                                                      if (r, c) not in TRANSPARENT)
    truth = {r * COLS + c: bool(ortho_job.grid[r, c]) for r in range(ROWS) for c in range(COLS)}
    correct = sum((t["label"] == "crack") == truth[t["tile"]] for t in tiles)
    assert correct >= 0.95 * len(tiles)
    assert record["crack_tiles"] == sum(t["label"] == "crack" for t in tiles)


def test_crack_tiles_land_on_the_map_where_the_cracks_are(ortho_job, tmp_path):
    out = tmp_path / "ortho.geojson"
    crackq_cli("results", ortho_job.job_id, "--format", "geojson", "--output", str(out), env=ortho_job.env)
    doc = json.loads(out.read_text())
    assert doc["type"] == "FeatureCollection" and "crs" not in doc
    features = doc["features"]
    by_raster: dict[str, list] = {}
    for f in features:
        by_raster.setdefault(f["properties"]["path"], []).append(f)
    # the raster without CRS has no polygons; the damaged one has those of its readable windows
    assert set(by_raster) == {ortho_job.paths[k] for k in ("geo", "s3", "damaged")}
    assert len(by_raster.pop(ortho_job.paths["damaged"])) == ortho_job.raster("damaged")["crack_tiles"]
    crack_cells = [(r, c) for r in range(ROWS) for c in range(COLS) if ortho_job.grid[r, c]]
    true_places = [_cell_centre_lonlat(r, c) for r, c in crack_cells]
    for path, feats in by_raster.items():
        assert len(feats) == ortho_job.raster("geo")["crack_tiles"] and feats  # crack tiles only
        for f in feats:
            ring = f["geometry"]["coordinates"][0]
            assert f["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 5
            assert all(-180 <= lon <= 180 and -90 <= lat <= 90 for lon, lat in ring)
            area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))
            assert area > 0  # counterclockwise exterior ring (RFC 7946 §3.1.6)
            centre = (sum(p[0] for p in ring[:4]) / 4, sum(p[1] for p in ring[:4]) / 4)
            nearest = min(_metres(centre, place) for place in true_places)
            assert nearest <= PATCH * GSD  # within one tile (2.27 m) of a real crack patch
            assert f["properties"]["crs"] == CRS and f["properties"]["label"] == "crack"
        found = {(f["properties"]["tile"] // COLS, f["properties"]["tile"] % COLS) for f in feats}
        assert len(found & set(crack_cells)) >= 0.9 * len(crack_cells)


def test_every_tile_with_per_tile_and_geopackage_keeps_the_native_crs(ortho_job, tmp_path):
    import pyogrio

    out = tmp_path / "all.geojson"
    crackq_cli("results", ortho_job.job_id, "--per-tile", "--format", "geojson", "--output", str(out),
               env=ortho_job.env)
    opaque = COLS * ROWS - len(TRANSPARENT)
    damaged = ortho_job.raster("damaged")
    assert len(json.loads(out.read_text())["features"]) == 2 * opaque + damaged["tiles"]
    gpkg = tmp_path / "cracks.gpkg"
    crackq_cli("results", ortho_job.job_id, "--output", str(gpkg), env=ortho_job.env)
    info = pyogrio.read_info(gpkg, layer="tiles")
    assert info["crs"] == CRS and info["geometry_type"] == "Polygon"
    assert info["features"] == 2 * ortho_job.raster("geo")["crack_tiles"] + damaged["crack_tiles"]
    xmin, ymin, xmax, ymax = info["total_bounds"]
    assert ORIGIN[0] <= xmin < xmax <= ORIGIN[0] + COLS * PATCH * GSD + 1e-6
    assert ORIGIN[1] - ROWS * PATCH * GSD - 1e-6 <= ymin < ymax <= ORIGIN[1]
    no_output = crackq_cli("results", ortho_job.job_id, "--format", "gpkg", check=False, env=ortho_job.env)
    assert no_output.returncode == 2 and "--output" in no_output.stderr


def test_a_raster_without_crs_keeps_pixel_boxes(ortho_job):
    record = ortho_job.raster("plain")
    assert record["error"] == "" and record["crs"] == "" and record["windows"] == 6
    assert record["tiles"] == COLS * ROWS  # its alpha is opaque everywhere
    tiles = ortho_job.tiles("plain")
    assert len(tiles) == COLS * ROWS and not any("polygon" in t for t in tiles)
    assert {(t["x"], t["y"], t["w"], t["h"]) for t in tiles} == {
        (c * PATCH, r * PATCH, PATCH, PATCH) for r in range(ROWS) for c in range(COLS)}


def test_corrupt_geotiffs_are_error_records_and_the_job_goes_on(ortho_job):
    damaged = ortho_job.raster("damaged")
    assert "windows failed: corrupt raster data" in damaged["error"] and damaged["windows"] == 6
    assert 0 < damaged["tiles"] < COLS * ROWS  # the windows that could be read were classified
    assert ortho_job.raster("garbage")["error"].startswith(("corrupt", "not an image"))
    assert ortho_job.raster("geo")["error"] == ""  # the rest of the job was classified
    assert math.isclose(len([r for r in ortho_job.records if "tile" not in r]), 5)


def test_crack_maps_of_rasters_come_from_a_reduced_read(ortho_job, tmp_path):
    from PIL import Image

    maps = tmp_path / "maps"
    crackq_cli("results", ortho_job.job_id, "--overlays", str(maps), "--output", str(tmp_path / "r.csv"),
               env=ortho_job.env)
    names = sorted(p.name for p in maps.iterdir())
    # the raster on disk and in S3 (same name: the second gets a hash) and the one without CRS; the damaged
    # raster cannot be read whole, even reduced: skipped with a warning, as an unreadable photo is
    assert len(names) == 3 and {"ortho.jpg", "no-crs.jpg"} < set(names)
    with Image.open(maps / "ortho.jpg") as img:
        assert img.width == 1600  # the 2270 px raster, shrunk to the map size
