"""Small, fast checks of the shared pieces: settings, discovery, chunk planning, formats, job store."""

from __future__ import annotations

import io
import json
import os

import pytest

from producer.api import plan_chunks
from producer.discover import discover
from producer.formats import format_for, write_csv, write_geojson
from shared.config import Settings, describe
from shared.connections import connect, mask_url
from shared.contract import RESULT_COLUMNS, ChunkOptions, make_items, result_record
from shared.preprocessing import tile_grid
from shared.store import JOB_CANCELLED, JOB_MISSING, JobStore, UnknownJob, new_job_id


def test_settings_come_from_defaults_then_environment_then_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("CRACKQ_CHUNK_SIZE", "48")
    monkeypatch.setenv("CRACKQ_DATA_ROOTS", f"{tmp_path}{os.pathsep}/srv/images")
    monkeypatch.setenv("CRACKQ_THRESHOLD", "0.7")
    s = Settings.load(threshold=0.9)
    assert s.chunk_size == 48 and s.threshold == 0.9 and s.batch_size == Settings().batch_size
    assert s.data_roots == (str(tmp_path), "/srv/images")
    with pytest.raises(ValueError):
        Settings.load(backend="torch")
    with pytest.raises(ValueError):
        Settings.load(task_time_limit=100, visibility_timeout=50)
    documented = {row[0] for row in describe()}
    assert {"CRACKQ_REDIS_URL", "CRACKQ_MODEL", "CRACKQ_RESULT_TTL", "CRACKQ_DATA_ROOTS"} <= documented


def test_passwords_are_masked():
    assert mask_url("redis://:hunter2@host:6379/0") == "redis://:***@host:6379/0"
    assert mask_url("rediss://user:pw@h/1?ssl_cert_reqs=none").startswith("rediss://user:***@h/1")
    assert mask_url("redis://localhost:6379/0") == "redis://localhost:6379/0"


def test_discovery_walks_folders_filters_extensions_and_keeps_explicit_files(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/1.jpg", "a/2.PNG", "a/deep/3.tif", "a/readme.md", "b.webp"):
        (tmp_path / name).write_bytes(b"x")
    found = discover([str(tmp_path / "a"), str(tmp_path / "*.webp"), str(tmp_path / "missing.jpg")])
    names = [os.path.relpath(p, tmp_path) for p in found.paths]
    assert names == ["a/1.jpg", "a/2.PNG", "a/deep/3.tif", "b.webp", "missing.jpg"]
    assert found.skipped == 1 and all(os.path.isabs(p) for p in found.paths)
    shallow = discover([str(tmp_path / "a")], recursive=False)
    assert [os.path.basename(p) for p in shallow.paths] == ["1.jpg", "2.PNG"]
    assert discover([str(tmp_path / "nothing-*.jpg")]).unmatched == [str(tmp_path / "nothing-*.jpg")]


def test_chunks_hold_about_chunk_size_images_and_big_files_count_more(tmp_path):
    small = [tmp_path / f"s{i}.jpg" for i in range(10)]
    for p in small:
        p.write_bytes(b"x" * 1000)
    big = tmp_path / "big.jpg"
    big.write_bytes(b"x" * (3 * 1024 * 1024))
    items = make_items([str(p) for p in small[:5]] + [str(big)] + [str(p) for p in small[5:]])
    chunks = plan_chunks(items, 4)
    assert [i["index"] for c in chunks for i in c] == list(range(11))  # nothing lost, order kept
    assert [len(c) for c in chunks] == [4, 1, 1, 4, 1]


def test_tile_grid_covers_the_image_without_stretching():
    boxes = tile_grid(1000, 500, 227)
    assert {(b.w, b.h) for b in boxes} == {(227, 227)}
    assert max(b.x + b.w for b in boxes) == 1000 and max(b.y + b.h for b in boxes) == 500
    assert len(boxes) == 5 * 3
    assert len(tile_grid(227, 227, 227)) == 1
    overlapping = tile_grid(454, 227, 227, overlap=100)
    assert [b.x for b in overlapping] == [0, 127, 227]


def test_csv_and_geojson_writers():
    rec = result_record("/d/a.jpg", label="crack", crack_probability=0.91, model="m:1", worker="w",
                        elapsed_ms=3.2, latitude=39.9, longitude=32.8, altitude=900.0, in_domain=True)
    plain = result_record("/d/b.jpg", error="file not found")
    out = io.StringIO()
    assert write_csv([rec, plain], out) == 2
    lines = out.getvalue().splitlines()
    assert lines[0].split(",") == list(RESULT_COLUMNS)
    assert lines[1].startswith("/d/a.jpg,crack,0.91,,m:1,w,3.2")
    geo = io.StringIO()
    assert write_geojson([rec, plain], geo) == 1
    fc = json.loads(geo.getvalue())
    assert fc["type"] == "FeatureCollection"
    assert fc["features"][0]["geometry"] == {"type": "Point", "coordinates": [32.8, 39.9, 900.0]}
    assert fc["features"][0]["properties"]["label"] == "crack"
    assert format_for("x.geojson", None) == "geojson" and format_for("x.csv", None) == "csv"
    assert format_for(None, "jsonl") == "jsonl"


def test_job_store_is_idempotent_and_refuses_writes_after_cancel(redis_server):
    store = JobStore(connect(redis_server.url), ttl=60)
    job = new_job_id()
    store.create(job, total=3, chunks=1, options=ChunkOptions().to_dict())
    assert store.status(job).state == "queued"
    records = {0: result_record("/a", label="crack", crack_probability=0.9),
               1: result_record("/b", error="file not found")}
    assert store.write_results(job, records) == 2
    assert store.write_results(job, records) == 2  # a redelivered chunk overwrites
    st = store.status(job)
    assert (st.state, st.done, st.failed) == ("running", 2, 1)
    assert store.write_results(job, {1: result_record("/b", label="no_crack", crack_probability=0.1)}) == 2
    assert store.status(job).failed == 0  # the error was replaced by a result
    assert [r["path"] for r in store.results(job)] == ["/a", "/b"]
    assert 0 < store.client.ttl(f"crackq:job:{job}:results") <= 60
    store.cancel(job)
    assert store.write_results(job, {2: result_record("/c", label="crack")}) == JOB_CANCELLED
    assert store.status(job).state == "cancelled" and store.status(job).done == 2
    assert store.write_results(new_job_id(), records) == JOB_MISSING
    with pytest.raises(UnknownJob):
        store.status(new_job_id())


def test_job_ends_failed_when_a_chunk_exhausted_its_retries(redis_server):
    store = JobStore(connect(redis_server.url), ttl=60)
    job = new_job_id()
    store.create(job, total=2, chunks=2, options={})
    store.write_results(job, {0: result_record("/a", label="crack")})
    store.mark_chunk_failed(job, "task-1")
    assert store.status(job).state == "running"
    store.write_results(job, {1: result_record("/b", error="chunk failed after 3 retries: ConnectionError")})
    assert store.status(job).state == "failed"


def test_crackq_run_reads_only_the_folders_of_the_images_it_was_given(tmp_path):
    from producer.embedded import data_roots_for

    (tmp_path / "survey" / "day2").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    target = tmp_path / "elsewhere" / "linked.jpg"
    target.write_bytes(b"x")
    link = tmp_path / "survey" / "day2" / "link.jpg"
    link.symlink_to(target)
    roots = data_roots_for([str(tmp_path / "survey" / "a.jpg"), str(link)])
    assert roots == sorted([str(tmp_path / "elsewhere"), str(tmp_path / "survey")])


def test_records_are_typed():
    """Result and tile records follow their dataclasses: a misspelt field is an error, not a lost column."""
    import pytest

    from shared.contract import RESULT_COLUMNS, TILE_COLUMNS, ResultRecord, TileRecord, result_record, tile_record

    assert RESULT_COLUMNS[:7] == ("path", "label", "crack_probability", "error", "model", "worker", "elapsed_ms")
    assert "tiles_scored" not in RESULT_COLUMNS and "tiles_scored" in ResultRecord.__dataclass_fields__
    assert TILE_COLUMNS == tuple(TileRecord.__dataclass_fields__)
    assert result_record("a.jpg", tiles=3)["tiles"] == 3
    with pytest.raises(TypeError, match="crack_tile"):
        result_record("a.jpg", crack_tile=1)
    tile = tile_record(path="a.jpg", tile=0, x=0, y=0, w=1, h=1, scale=1, crack_probability=0.5, label="crack",
                       in_domain=None, domain_score=None)
    assert "polygon" not in tile and set(tile) < set(TILE_COLUMNS)
    with pytest.raises(TypeError):
        tile_record(path="a.jpg", tile=0)


def test_a_photo_is_opened_once(tmp_path, monkeypatch):
    """Header, tile count, pixels and EXIF come from one opening of the file (issue 14)."""
    import numpy as np
    from PIL import Image

    from shared import preprocessing

    path = tmp_path / "big.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the oriented size swaps width and height
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8)).save(
        path, exif=exif.tobytes())
    opens = []
    real_open = Image.open
    monkeypatch.setattr(preprocessing.Image, "open", lambda *a, **k: opens.append(1) or real_open(*a, **k))
    with open(path, "rb") as fh:
        header = preprocessing.read_header(fh)
        prepared = preprocessing.prepare_image(fh, tile=227, header=header)
        assert header.meta == {}
    assert (header.width, header.height) == (300, 500) and len(prepared.inputs) == 6
    assert len(opens) == 1
