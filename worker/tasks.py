"""The one task: ``crackq.classify_chunk(job_id, items, options)`` (contract in :mod:`shared.contract`).

Delivery is at-least-once (late acks, requeue on a lost worker, leases), so
the task is idempotent: results are written by image index in one atomic step
at the end.  Transient failures (Redis unreachable, out of memory, read-only,
MISCONF) are retried with backoff by Celery; a bad image is never an exception
here, it is an error record; so are bad options and bad items of a hand-made
message.  A chunk that exhausts its retries, its time limit or its deliveries
(``CRACKQ_MAX_DELIVERIES``: it keeps dying with its worker) gets an error
record for each of its images not yet written and marks the job ``failed``,
in one step.
"""

from __future__ import annotations

import logging
import time

import redis
from celery import Task, shared_task
from celery.exceptions import Reject, SoftTimeLimitExceeded, TimeLimitExceeded

from shared.connections import RedisBusy, is_busy
from shared.contract import TASK_NAME, ChunkOptions, InvalidOptions, check_items, error_record
from shared.store import JOB_CANCELLED, JOB_MISSING
from worker import context, metrics

log = logging.getLogger(__name__)

TRANSIENT_ERRORS = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)


class ChunkTask(Task):
    """Adds the "retries exhausted" handling to Celery's retry machinery."""

    def retry(self, *args, **kwargs):
        """Celery's retry, except that a retry that cannot be queued puts the chunk back instead of dropping it.

        Celery answers a failed retry publish (the broker is down: the usual
        cause of the very error being retried) with ``Reject(requeue=False)``,
        which acknowledges the message and loses the chunk.  Requeueing keeps
        it: kombu puts it back on the queue, or, if Redis is still away, it
        stays unacknowledged and comes back after the visibility timeout.
        """
        try:
            return super().retry(*args, **kwargs)
        except Reject as exc:
            if exc.requeue:
                raise
            log.warning("could not queue the retry of chunk %s (%s): requeueing it", self.request.id, exc.reason)
            raise Reject(exc.reason, requeue=True) from None

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        job_id, items = _job_and_items(args, kwargs)
        reason = ("chunk timed out" if isinstance(exc, (SoftTimeLimitExceeded, TimeLimitExceeded))
                  else f"chunk failed after {self.request.retries} retries: {type(exc).__name__}: {str(exc)[:120]}")
        log.error("job %s chunk %s failed: %s", job_id, task_id, reason)
        metrics.observe_failure()
        try:
            fail_chunk(context.store(), job_id, task_id, items, reason)
        except Exception:  # noqa: BLE001 - nothing more we can do; the job stays incomplete
            log.exception("could not record the failure of chunk %s", task_id)


def fail_chunk(store, job_id: str, chunk_id: str, items: list[dict], reason: str) -> None:
    """Error records for the chunk's images without a record, and the chunk ``failed``: one Redis step."""
    usable, unusable = check_items(items)
    records = {i["index"]: error_record(i["path"], reason, worker=context.worker_name()) for i in usable + unusable}
    store.fail_chunk(job_id, chunk_id, records)


# A shared task: registered on the worker's app (worker/app.py) without this module importing it.
@shared_task(name=TASK_NAME, base=ChunkTask, bind=True, acks_late=True, reject_on_worker_lost=True,
             autoretry_for=TRANSIENT_ERRORS, retry_backoff=2, retry_backoff_max=60, retry_jitter=True,
             max_retries=context.settings().max_retries)
def classify_chunk(self, job_id: str, items: list[dict], options: dict | None = None) -> dict:
    try:
        return _classify_chunk(self, job_id, items, options)
    except redis.ResponseError as exc:
        if is_busy(exc):  # out of memory, read-only replica, MISCONF: retried like a lost connection
            raise RedisBusy(str(exc)) from exc
        raise


def _classify_chunk(task, job_id: str, items: list[dict], options: dict | None) -> dict:
    ctx = context.current()
    runner, store, settings = ctx.runner, ctx.store, ctx.settings
    if store.is_cancelled(job_id):
        return {"job_id": job_id, "done": 0, "errors": 0, "dropped": True}
    request = task.request
    starts = store.count_delivery(job_id, f"{request.id}:{request.retries}")
    if starts > settings.max_deliveries:
        reason = (f"chunk started {starts - 1} times without finishing (its worker died each time; "
                  f"CRACKQ_MAX_DELIVERIES={settings.max_deliveries})")
        log.error("job %s chunk %s: %s", job_id, request.id, reason)
        metrics.observe_failure()
        fail_chunk(store, job_id, request.id, items, reason)
        return {"job_id": job_id, "done": 0, "errors": len(items), "failed": True}
    usable, unusable = check_items(items)
    if len(usable) + len(unusable) < len(items):
        log.error("job %s chunk %s: %d item(s) without an integer index dropped",
                  job_id, request.id, len(items) - len(usable) - len(unusable))
    try:
        chunk_options = ChunkOptions.from_dict(options)
    except (InvalidOptions, TypeError) as exc:
        log.error("job %s chunk %s: bad options: %s", job_id, request.id, exc)
        bad = {i["index"]: error_record(i["path"], f"bad options: {exc}", worker=context.worker_name())
               for i in usable + unusable}
        store.write_results(job_id, bad, chunk=request.id)
        return {"job_id": job_id, "done": len(bad), "errors": len(bad)}
    start = time.perf_counter()
    output = runner.run(usable, chunk_options, should_stop=lambda: store.is_cancelled(job_id))
    for item in unusable:
        output.records[item["index"]] = error_record(item["path"], "item has no path (a string)",
                                                     worker=ctx.name)
    if output.cancelled:
        return {"job_id": job_id, "done": 0, "errors": 0, "dropped": True}
    done = store.write_results(job_id, output.records, output.tiles, chunk=task.request.id)
    errors = sum(1 for r in output.records.values() if r.get("error"))
    metrics.observe_chunk(output.records.values(), time.perf_counter() - start)
    if done in (JOB_MISSING, JOB_CANCELLED):
        return {"job_id": job_id, "done": 0, "errors": 0, "dropped": True}
    return {"job_id": job_id, "done": len(output.records), "errors": errors}


def _job_and_items(args, kwargs) -> tuple[str, list[dict]]:
    args = list(args or ())
    job_id = kwargs.get("job_id", args[0] if args else "")
    items = kwargs.get("items", args[1] if len(args) > 1 else [])
    return job_id, items
