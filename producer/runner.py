"""``crackq run``: submit, follow and collect one job, on the embedded default or a given Redis."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from collections import Counter

from producer.api import Client
from producer.embedded import data_roots_for, local_workers, private_redis
from producer.formats import MAP_FORMATS, PER_TILE_COLUMNS, open_results_file, write
from shared.config import Settings, default_concurrency
from shared.contract import RESULT_COLUMNS
from shared.storage import roots_for


def run_job(images: list[str], settings: Settings, *, out: str, fmt: str = "csv", workers: int | None = None,
            per_tile: bool = False, timeout: float | None = None, overlays: str | None = None,
            progress=None, worker_env: dict | None = None, on_created=None) -> dict:
    """Run one job to completion and write its results; returns a summary dict.

    Without ``settings.redis_url`` a private Redis and ``workers`` local
    worker processes are started and always stopped again (Ctrl-C, SIGTERM and
    errors included).  With it, the job goes to that Redis and whatever
    workers serve it (plus local ones if ``workers`` is given).
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(_sigterm_as_interrupt())
        if not settings.redis_url:
            settings = settings.replace(redis_url=stack.enter_context(private_redis()))
            workers = workers or default_local_workers(settings)
        client = Client(settings)
        if workers:
            log = os.path.join(tempfile.gettempdir(), f"crackq-run-workers-{os.getpid()}.log")
            stack.enter_context(local_workers(settings.redis_url, workers, data_roots_for(images) + roots_for(images),
                                              env=worker_env, log_path=log))
        start = time.monotonic()
        options = client.options(per_tile=per_tile or bool(overlays) or None)
        job_id = client.submit(images, options, on_created=on_created)
        status = progress(client, job_id, timeout) if progress else client.wait(job_id, timeout=timeout)
        seconds = time.monotonic() - start
        on_map = fmt in MAP_FORMATS  # issue 12: tile polygons of georeferenced rasters
        records = list(client.results(job_id, per_tile=per_tile or bool(overlays) or on_map))
        _write_file(out, fmt, records if per_tile or on_map else [r for r in records if "tile" not in r], per_tile)
        photos = [r for r in records if "tile" not in r]
        if overlays:
            from producer.overlays import write_overlays

            write_overlays(records, overlays, threshold=options.threshold)
        return _summary(job_id, status.state, photos, seconds, out)


def default_local_workers(settings: Settings) -> int:
    """Local worker processes by default: one per core on CPU, as ``crackq worker`` (docs/performance.md)."""
    return default_concurrency(settings)


def _write_file(out: str, fmt: str, records: list[dict], per_tile: bool) -> None:
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    if fmt == "gpkg":  # issue 12
        from producer.mapping import write_gpkg

        if os.path.exists(out):
            os.remove(out)
        write_gpkg(records, out, all_tiles=per_tile)
        return
    with open_results_file(out) as fh:
        write(records, fh, fmt, PER_TILE_COLUMNS if per_tile else RESULT_COLUMNS, all_tiles=per_tile)


def _summary(job_id: str, state: str, photos: list[dict], seconds: float, out: str) -> dict:
    labels = Counter(r["label"] for r in photos if not r.get("error"))
    reasons = Counter(r["error"] for r in photos if r.get("error"))
    return {"job_id": job_id, "state": state, "images": len(photos), "seconds": seconds,
            "images_per_second": len(photos) / max(seconds, 1e-9), "labels": labels,
            "errors": sum(reasons.values()), "error_reasons": reasons, "out": out,
            "out_of_domain": sum(1 for r in photos if r.get("in_domain") is False)}


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (e.g. from a CI runner) cleans up like Ctrl-C does."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
