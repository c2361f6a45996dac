"""S3 inputs against a real S3 server (SeaweedFS) and real workers: listing (prefix, glob, single key,
profiles), reading, the S3 form of the data roots, per-image errors with clear reasons, `crackq run`,
crack maps and tile export from a bucket, and no credentials anywhere in results or logs."""

from __future__ import annotations

import csv
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.common.imagery import PATCH, held_out_patches, layout, mosaic_photo
from benchmarks.common.s3server import BUCKET, LOCKED_BUCKET, OTHER_BUCKET, credentials_free, upload
from benchmarks.common.service import WorkerProcess, crackq_cli, per_tile_job
from producer.discover import discover
from shared import storage
from shared.config import Settings
from shared.storage import StorageError, is_under_roots


# ---- URLs and data roots (no server) ---------------------------------------------------------------
def test_data_roots_accept_s3_urls_beside_folders(monkeypatch):
    monkeypatch.setenv("CRACKQ_DATA_ROOTS", "/data,s3://survey-bucket/")
    assert Settings.load().data_roots == ("/data", "s3://survey-bucket/")
    monkeypatch.setenv("CRACKQ_DATA_ROOTS", "/data:/more:s3://b/flights")
    assert Settings.load().data_roots == ("/data", "/more", "s3://b/flights")


@pytest.mark.parametrize("url,allowed", [
    ("s3://survey-bucket/a/b.jpg", True), ("s3://survey-bucket/b.jpg", True),
    ("s3://survey-bucket2/b.jpg", False),                 # another bucket sharing the name's start
    ("s3://b/flights/1/x.jpg", True), ("s3://b/flights-old/x.jpg", False), ("s3://b/x.jpg", False),
    ("s3://b/flights/../secret/x.jpg", False),            # no climbing out of a prefix
    ("s3://key:secret@survey-bucket/x.jpg", False),       # credentials never in URLs
    ("/data/x.jpg", True), ("/etc/passwd", False),
])
def test_workers_read_only_under_their_buckets_and_prefixes(url, allowed):
    assert is_under_roots(url, ("/data", "s3://survey-bucket/", "s3://b/flights")) is allowed


def test_bad_urls_get_clear_reasons():
    with pytest.raises(StorageError, match="credentials never go in the URL"):
        storage.parse("s3://AKIA:secret@bucket/key.jpg")
    with pytest.raises(StorageError, match="not allowed"):
        storage.parse("s3://bucket/a/../b.jpg")


# ---- a job from a bucket ---------------------------------------------------------------------------
@dataclass
class BucketJob:
    records: list
    urls: dict
    expected: dict
    worker_log: str
    results_text: str


def _use(monkeypatch, env: dict) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    storage.reset()


@pytest.fixture(scope="module")
def bucket_images(s3_server, concrete_dir):
    """Held-out patches, a non-image and a 4×3 mosaic photo in ``survey``; one object in each other bucket."""
    patches = held_out_patches(concrete_dir)
    fs = s3_server.filesystem()
    prefix = f"{BUCKET}/job-{uuid.uuid4().hex[:6]}"
    expected, files = {}, {}
    for cls, label in (("Positive", "crack"), ("Negative", "no_crack")):
        for i, path in enumerate(patches[cls][:4]):
            key = f"{prefix}/patches/{cls.lower()}-{i}.jpg"
            files[key] = path
            expected["s3://" + key] = label
    files[f"{prefix}/patches/notes.txt"] = b"flight notes"
    photo, _ = mosaic_photo(patches, layout(4, 3, seed=5, crack_share=0.5), seed=5)
    local = Path(s3_server.workdir) / "mosaic.jpg"
    photo.save(local, quality=95)
    files[f"{prefix}/photos/mosaic.jpg"] = local
    files[f"{LOCKED_BUCKET}/x.jpg"] = patches["Positive"][10]
    files[f"{OTHER_BUCKET}/x.jpg"] = patches["Positive"][11]
    upload(fs, files)
    return {"prefix": "s3://" + prefix, "expected": expected, "mosaic": f"s3://{prefix}/photos/mosaic.jpg",
            "locked": f"s3://{LOCKED_BUCKET}/x.jpg", "other": f"s3://{OTHER_BUCKET}/x.jpg",
            "missing": f"s3://{prefix}/patches/missing.jpg"}


@pytest.fixture(scope="module")
def bucket_job(s3_server, bucket_images, redis_server, shipped_model, tmp_path_factory) -> BucketJob:
    """One job, submitted with `crackq submit` on S3 URLs, classified by a real worker with read-only S3 keys."""
    tmp = tmp_path_factory.mktemp("bucket-job")
    queue = f"test-s3-{uuid.uuid4().hex[:8]}"
    env = {"CRACKQ_REDIS_URL": redis_server.url, "CRACKQ_QUEUE": queue, **s3_server.env()}
    roots = f"s3://{BUCKET}/,s3://{LOCKED_BUCKET}/"  # not `elsewhere`
    worker = WorkerProcess(redis_server.url, queue, tmp / "worker.log", model=shipped_model,
                           env={**s3_server.env(), "CRACKQ_DATA_ROOTS": roots})
    out = tmp / "results.jsonl"
    images = bucket_images
    _, records, submitted = per_tile_job(worker, images["prefix"] + "/", images["missing"], images["locked"],
                                         images["other"], "--json", env=env, out=out)
    text = out.read_text() + submitted.stdout + submitted.stderr
    return BucketJob(records, images, images["expected"], worker.log(), text)


def _photos(job: BucketJob) -> dict:
    return {r["path"]: r for r in job.records if "tile" not in r}


def test_a_prefix_is_listed_and_its_images_classified_from_the_bucket(bucket_job):
    photos = _photos(bucket_job)
    for url, label in bucket_job.expected.items():
        assert photos[url]["error"] == "" and photos[url]["label"] == label, photos[url]
    assert not any(p.endswith("notes.txt") for p in photos)  # non-images skipped while listing
    mosaic = photos[bucket_job.urls["mosaic"]]
    assert (mosaic["width"], mosaic["height"], mosaic["tiles"]) == (4 * PATCH, 3 * PATCH, 12)
    tiles = [r for r in bucket_job.records if "tile" in r and r["path"] == bucket_job.urls["mosaic"]]
    assert len(tiles) == 12


def test_bad_objects_are_error_records_with_clear_reasons(bucket_job):
    photos = _photos(bucket_job)
    assert photos[bucket_job.urls["missing"]]["error"] == "no such key"
    assert photos[bucket_job.urls["locked"]]["error"].startswith("access denied")
    assert "outside the worker's data roots" in photos[bucket_job.urls["other"]]["error"]
    assert len(photos) == len(bucket_job.expected) + 4  # every input has exactly one record


def test_no_credentials_in_results_logs_or_messages(bucket_job, s3_server):
    assert credentials_free(bucket_job.results_text, s3_server)
    assert credentials_free(bucket_job.worker_log, s3_server)


# ---- listing -------------------------------------------------------------------------------------------
def test_globs_single_keys_and_profiles_are_listed(s3_server, bucket_images, monkeypatch, tmp_path):
    _use(monkeypatch, s3_server.env())
    prefix = bucket_images["prefix"]
    found = discover([f"{prefix}/patches/positive-*.jpg", bucket_images["mosaic"]])
    assert found.paths == [f"{prefix}/patches/positive-{i}.jpg" for i in range(4)] + [bucket_images["mosaic"]]
    flat = discover([f"{prefix}/"], recursive=False)
    assert flat.paths == [] and flat.unmatched == [f"{prefix}/"]  # the images sit one level down
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[surveyors]\naws_access_key_id = {s3_server.reader[0]}\n"
                           f"aws_secret_access_key = {s3_server.reader[1]}\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    _use(monkeypatch, {"AWS_SHARED_CREDENTIALS_FILE": str(credentials), "AWS_PROFILE": "surveyors"})
    assert len(discover([f"{prefix}/patches/"]).paths) == 8
    storage.reset()


def test_unreachable_endpoint_and_denied_listing_are_clear_cli_errors(s3_server, bucket_images, redis_server):
    from producer.embedded import free_port

    env = {"CRACKQ_REDIS_URL": redis_server.url, **s3_server.env()}
    wrong = crackq_cli("submit", bucket_images["prefix"] + "/", check=False,
                       env={**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"})
    assert wrong.returncode == 2 and "storage endpoint unreachable" in wrong.stderr
    denied = crackq_cli("submit", f"s3://{LOCKED_BUCKET}/", check=False, env=env)
    assert denied.returncode == 2 and "access denied" in denied.stderr
    assert credentials_free(wrong.stderr + denied.stderr, s3_server)


def test_reads_from_an_unreachable_endpoint_are_retried_then_reported(s3_server, bucket_images, monkeypatch):
    from producer.embedded import free_port

    _use(monkeypatch, {**s3_server.env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"})
    monkeypatch.setattr(storage, "RETRY_DELAY", 0.01)
    with pytest.raises(StorageError) as caught:
        storage.fetch(bucket_images["mosaic"], 10_000_000)
    assert caught.value.transient and str(caught.value).startswith("storage endpoint unreachable (http://127.0.0.1:")
    storage.reset()


# ---- crackq run, crack maps and tile export straight from the bucket ----------------------------------------
def test_crackq_run_on_a_bucket_with_crack_maps(s3_server, bucket_images, tmp_path, shipped_model):
    out = tmp_path / "run.csv"
    env = {**s3_server.env(), "CRACKQ_MODEL": str(shipped_model), "CRACKQ_THREADS": "1"}
    env.pop("CRACKQ_REDIS_URL", None)
    crackq_cli("run", bucket_images["mosaic"], f"{bucket_images['prefix']}/patches/negative-*.jpg", "--out",
               str(out), "--workers", "1", "--overlays", str(tmp_path / "maps"), env={**env, "CRACKQ_REDIS_URL": ""})
    rows = {r["path"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {bucket_images["mosaic"]} | {f"{bucket_images['prefix']}/patches/negative-{i}.jpg"
                                                     for i in range(4)}
    assert all(r["error"] == "" for r in rows.values())
    assert (tmp_path / "maps" / "mosaic.jpg").stat().st_size > 10_000


def test_tiles_export_reads_photos_from_the_bucket(s3_server, bucket_images, tmp_path):
    out = tmp_path / "tiles"
    crackq_cli("tiles", "export", bucket_images["mosaic"], "--out", str(out), "--sample", "3",
               env=s3_server.env())
    rows = list(csv.DictReader((out / "tiles.csv").open()))
    assert len(rows) == 3 and {r["photo"] for r in rows} == {bucket_images["mosaic"]}
    assert all((out / r["file"]).stat().st_size > 1000 for r in rows)
