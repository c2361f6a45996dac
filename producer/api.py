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

import json
import logging
import math
import os
import time
import uuid
from typing import Callable, Iterator

from shared.config import Settings
from shared.connections import connect, is_busy
from shared.contract import TASK_NAME, ChunkOptions
from shared.leases import recover_with
from shared.celery_config import make_celery
from shared.store import JobStatus, JobStore, new_job_id

# ---- issue 12: rasters read by windows, objects in S3 (producer/rasters.py, shared/storage.py)
from producer.rasters import assemble, item_weight, plan_items
from shared.storage import size_hint
# ---- end issue 12

log = logging.getLogger(__name__)

#: Backoff (s) between tries of a chunk that Redis refused for a while (out of memory, read-only, MISCONF).
PUBLISH_BACKOFF = (0.5, 1, 2, 4, 8, 15, 30)

#: A file this big counts as several images when chunks are planned (big drone photos are tiled).
BYTES_PER_UNIT = 256 * 1024


class Client:
    def __init__(self, settings: Settings, model_threshold: bool | None = None):
        self.settings = settings
        # issue 11: a job that sets no threshold lets each worker use its model card's (crackq adapt).
        self.model_threshold = (_threshold_unset(settings) if model_threshold is None else model_threshold)
        self.redis = connect(settings.effective_redis_url, retry_seconds=settings.redis_retry_seconds)
        self.store = JobStore(self.redis, settings.result_ttl)
        self._celery = None

    @classmethod
    def from_settings(cls, **overrides) -> "Client":
        return cls(Settings.load(**overrides),
                   model_threshold=overrides.get("threshold") is None and not os.environ.get("CRACKQ_THRESHOLD"))

    @property
    def celery(self):
        if self._celery is None:
            self._celery = make_celery(self.settings, name="crackq-producer")
        return self._celery

    def options(self, **changes) -> ChunkOptions:
        """The job's options from the settings and ``changes``, checked (:class:`InvalidOptions`)."""
        s = self.settings
        base = ChunkOptions(threshold=s.threshold, tile_size=s.tile_size, tile_overlap=s.tile_overlap,
                            model_threshold=self.model_threshold and changes.get("threshold") is None,
                            scales=s.scales)
        merged = {**base.to_dict(), **{k: v for k, v in changes.items() if v is not None}}
        return ChunkOptions.from_dict(merged)

    def submit(self, paths: list[str], options: ChunkOptions | None = None, chunk_size: int | None = None,
               on_created: Callable[[str, int], None] | None = None) -> str:
        """Queue ``paths`` (absolute) as one job; returns its id.

        The job is visible as ``submitting`` until its last chunk is queued
        (``on_created(job_id, chunks)`` is called as soon as it exists, so a
        caller can show the id first).  If queueing is interrupted (Ctrl-C,
        Redis gone for good), the job is removed: workers drop the chunks
        already queued, and no ``queued`` job is left that could never finish.
        """
        if not paths:
            raise ValueError("no images to submit")
        options = options or self.options()
        items = plan_items(paths, options, self.settings.raster_window)  # issue 12: one item per raster window
        chunks = plan_chunks(items, chunk_size or self.settings.chunk_size)
        job_id = new_job_id()
        self._retry_busy(lambda: self.store.create(
            job_id, total=len(items), chunks=len(chunks), options=options.to_dict(),
            model=os.path.basename(self.settings.model), state="submitting"))
        ids = [str(uuid.uuid4()) for _ in chunks]
        try:
            if on_created:
                on_created(job_id, len(chunks))
            self._retry_busy(lambda: self.store.remember_chunks(job_id, dict(zip(ids, chunks))))
            with self.celery.producer_or_acquire() as producer:
                for chunk_id, chunk in zip(ids, chunks):
                    self._retry_busy(lambda: self.celery.send_task(
                        TASK_NAME, args=[job_id, chunk, options.to_dict()], queue=self.settings.queue,
                        producer=producer, task_id=chunk_id))
            self._retry_busy(lambda: self.store.mark_queued(job_id))
        except BaseException:
            self._remove_unfinished(job_id)
            raise
        return job_id

    def _remove_unfinished(self, job_id: str) -> None:
        try:
            self.store.delete(job_id)
        except Exception as exc:  # noqa: BLE001 - Redis gone: the job stays 'submitting' and expires
            log.warning("could not remove the unfinished job %s: %s", job_id, exc)

    @staticmethod
    def _retry_busy(call):
        """``call()``, retried with backoff while Redis refuses writes for a while (OOM, READONLY, MISCONF)."""
        for pause in (*PUBLISH_BACKOFF, None):
            try:
                return call()
            except Exception as exc:  # redis-py's ResponseError, or kombu's OperationalError around it
                if pause is None or not is_busy(exc):
                    raise
                log.warning("Redis refused a write (%s); retrying in %gs", exc, pause)
                time.sleep(pause)

    def status(self, job_id: str, recover: bool = False) -> JobStatus:
        """The job's status; with ``recover``, lost chunks are put back first (:meth:`recover`)."""
        if recover:
            self.recover(job_id)
        return self.store.status(job_id)

    def recover(self, job_id: str | None = None) -> list[str]:
        """Put back on the queue the chunks whose worker stopped renewing its lease (:mod:`shared.leases`),
        and, for ``job_id``, chunks that Redis itself lost (:meth:`requeue_lost_chunks`).

        Never fails: recovery is a help, the job's status must be readable without it.
        """
        try:
            restored = recover_with(self.celery, self.settings.queue, self.settings.lease_seconds)
            if job_id:
                restored += self.requeue_lost_chunks(job_id)
            return restored
        except Exception as exc:  # noqa: BLE001
            log.warning("recovery skipped: %s: %s", type(exc).__name__, exc)
            return []

    def requeue_lost_chunks(self, job_id: str) -> list[str]:
        """Queue again the chunks of an unfinished job that are nowhere: not queued, not held by a worker.

        kombu's Redis transport takes a message with ``BRPOP`` and writes its
        unacknowledged copy in a second command; a Redis crash between the two
        loses that message (the pop is in the AOF, the copy is not).  The job
        keeps the items of every chunk not written yet, so when its queue is
        empty and nothing of it is unacknowledged, whatever is still
        outstanding was lost and is queued again (same chunk id; a duplicate
        run only overwrites).
        """
        status = self.store.status(job_id)
        if status.finished or status.state == "submitting" or queue_busy(self.redis, self.settings.queue):
            return []
        outstanding = self.store.outstanding_chunks(job_id)
        if not outstanding:
            return []
        options = self.store.options(job_id)
        for chunk_id, items in outstanding.items():
            self.celery.send_task(TASK_NAME, args=[job_id, items, options], queue=self.settings.queue,
                                  task_id=chunk_id)
        log.warning("job %s: queued again %d chunk(s) that were neither queued nor held by a worker",
                    job_id, len(outstanding))
        return list(outstanding)

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
        next_recovery = started + self.settings.lease_seconds / 2
        while True:
            if time.monotonic() >= next_recovery:  # a job must not wait on a dead worker, idle workers or not
                self.recover(job_id)
                next_recovery = time.monotonic() + self.settings.lease_seconds / 2
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
        # issue 12: the window records of a raster come back as one record per raster
        return assemble(self.store.results(job_id, with_tiles=per_tile))

    def cancel(self, job_id: str) -> JobStatus:
        return self.store.cancel(job_id)


def _threshold_unset(settings: Settings) -> bool:
    """No CRACKQ_THRESHOLD and the default value (a Settings built in code with --threshold 0.5 counts as unset)."""
    default = Settings.__dataclass_fields__["threshold"].default
    return not os.environ.get("CRACKQ_THRESHOLD") and settings.threshold == default


def queue_busy(client, queue: str) -> bool:
    """True while ``queue`` has chunks waiting (any priority) or delivered and not acknowledged."""
    from kombu.transport.redis import Channel

    keys = [queue] + [f"{queue}{Channel.sep}{p}" for p in Channel.priority_steps if p]
    if any(client.llen(key) for key in keys):
        return True
    for raw in client.hvals(Channel.unacked_key):
        try:
            if json.loads(raw)[2] == queue:
                return True
        except (ValueError, IndexError, TypeError):
            continue
    return False


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
        w = item_weight(item) or _weight(item["path"])
        if current and weight + w > chunk_size:
            chunks.append(current)
            current, weight = [], 0
        current.append(item)
        weight += w
    if current:
        chunks.append(current)
    return chunks


def _weight(path: str) -> int:
    size = size_hint(path)  # issue 12: sizes of s3:// objects come from their listing
    return 1 if size is None else max(1, math.ceil(size / BYTES_PER_UNIT))
