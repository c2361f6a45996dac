"""The producer's Python API: submit, status, wait, results, cancel.

The CLI is a thin layer over this, and so can any script::

    from producer.api import Client
    client = Client.from_settings()
    job = client.submit(["/data/survey-7"])
    client.wait(job)
    for record in client.results(job):
        ...

The producer never imports worker code: it sends ``crackq.classify_chunk``
by name with the arguments :mod:`shared.contract` defines.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, Iterator

from shared.config import Settings
from shared.connections import connect
from shared.contract import TASK_NAME, ChunkOptions, make_items
from shared.queue import make_celery
from shared.store import JobStatus, JobStore, new_job_id

#: A file this big counts as several images when chunks are planned (big drone photos are tiled).
BYTES_PER_UNIT = 256 * 1024


class Client:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.redis = connect(settings.effective_redis_url, retry_seconds=settings.redis_retry_seconds)
        self.store = JobStore(self.redis, settings.result_ttl)
        self._celery = None

    @classmethod
    def from_settings(cls, **overrides) -> "Client":
        return cls(Settings.load(**overrides))

    @property
    def celery(self):
        if self._celery is None:
            self._celery = make_celery(self.settings, name="crackq-producer")
        return self._celery

    def options(self, **changes) -> ChunkOptions:
        s = self.settings
        base = ChunkOptions(threshold=s.threshold, tile_size=s.tile_size, tile_overlap=s.tile_overlap,
                            scales=s.scales)
        return ChunkOptions(**{**base.to_dict(), **{k: v for k, v in changes.items() if v is not None}})

    def submit(self, paths: list[str], options: ChunkOptions | None = None, chunk_size: int | None = None) -> str:
        """Queue ``paths`` (absolute) as one job; returns its id."""
        if not paths:
            raise ValueError("no images to submit")
        options = options or self.options()
        chunks = plan_chunks(make_items(paths), chunk_size or self.settings.chunk_size)
        job_id = new_job_id()
        self.store.create(job_id, total=len(paths), chunks=len(chunks), options=options.to_dict(),
                          model=os.path.basename(self.settings.model))
        with self.celery.producer_or_acquire() as producer:
            for chunk in chunks:
                self.celery.send_task(TASK_NAME, args=[job_id, chunk, options.to_dict()],
                                      queue=self.settings.queue, producer=producer)
        return job_id

    def status(self, job_id: str) -> JobStatus:
        return self.store.status(job_id)

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.2,
             on_progress: Callable[[JobStatus], None] | None = None) -> JobStatus:
        """Poll until the job is finished (done, failed or cancelled) or ``timeout`` passes.

        The interval adapts (:func:`poll_interval`): a few milliseconds while a
        job is young or about to finish, up to ``poll`` seconds in between, so
        a one-image job returns within milliseconds of its result and a long
        job costs Redis a handful of cheap reads per second.
        """
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        while True:
            status = self.status(job_id)
            if on_progress:
                on_progress(status)
            if status.finished:
                return status
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout:g}s ({status.done}/{status.total})")
            pause = poll_interval(status.done, status.total, now - started, poll)
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - now)))

    def results(self, job_id: str, per_tile: bool = False) -> Iterator[dict]:
        return self.store.results(job_id, with_tiles=per_tile)

    def cancel(self, job_id: str) -> JobStatus:
        return self.store.cancel(job_id)


def poll_interval(done: int, total: int, elapsed: float, longest: float, shortest: float = 0.005) -> float:
    """Seconds until the next status read: a quarter of the time waited so far, or half the expected rest.

    Either way the delay a poll adds is a small fraction of the job's own run
    time (single images stay fast, long jobs finish on time), and Redis sees at
    most one read per ``shortest`` seconds.
    """
    pause = elapsed / 4
    if done:
        pause = min(pause, (total - done) * elapsed / done / 2)
    return min(longest, max(shortest, pause))


def plan_chunks(items: list[dict], chunk_size: int) -> list[list[dict]]:
    """Split items into chunks of about ``chunk_size`` image-equivalents.

    A small patch counts 1; a large file counts one per :data:`BYTES_PER_UNIT`
    (a 6 MB drone photo, ~200 tiles, counts 24), so a chunk of big photos
    stays short and the photos of a survey spread over all workers.
    """
    chunks, current, weight = [], [], 0
    for item in items:
        w = _weight(item["path"])
        if current and weight + w > chunk_size:
            chunks.append(current)
            current, weight = [], 0
        current.append(item)
        weight += w
    if current:
        chunks.append(current)
    return chunks


def _weight(path: str) -> int:
    try:
        return max(1, math.ceil(os.path.getsize(path) / BYTES_PER_UNIT))
    except OSError:
        return 1
