"""The one task: ``crackq.classify_chunk(job_id, items, options)`` (contract in :mod:`shared.contract`).

Delivery is at-least-once (late acks, requeue on a lost worker), so the task
is idempotent: results are written by image index in one atomic step at the
end.  Transient failures (Redis unreachable) are retried with backoff by
Celery; a bad image is never an exception here, it is an error record; a chunk
that exhausts its retries or its time limit gets an error record for each of
its images not yet written, and marks the job ``failed``.
"""

from __future__ import annotations

import logging
import time

import redis
from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded, TimeLimitExceeded

from shared.contract import TASK_NAME, ChunkOptions, error_record
from shared.store import JOB_CANCELLED, JOB_MISSING
from worker import metrics, state
from worker.app import app, settings

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
            store = state.store()
            written = store.client.hmget(f"crackq:job:{job_id}:results", [str(i["index"]) for i in items])
            missing = {i["index"]: error_record(i["path"], reason, worker=state.worker_name())
                       for i, have in zip(items, written) if have is None}
            if missing:
                store.write_results(job_id, missing)
            store.mark_chunk_failed(job_id, task_id)
        except Exception:  # noqa: BLE001 - nothing more we can do; the job stays incomplete
            log.exception("could not record the failure of chunk %s", task_id)


@app.task(name=TASK_NAME, base=ChunkTask, bind=True, acks_late=True, reject_on_worker_lost=True,
          autoretry_for=TRANSIENT_ERRORS, retry_backoff=2, retry_backoff_max=60, retry_jitter=True,
          max_retries=settings.max_retries)
def classify_chunk(self, job_id: str, items: list[dict], options: dict | None = None) -> dict:
    runner, store = state.load()
    if store.is_cancelled(job_id):
        return {"job_id": job_id, "done": 0, "errors": 0, "dropped": True}
    start = time.perf_counter()
    output = runner.run(items, ChunkOptions.from_dict(options), should_stop=lambda: store.is_cancelled(job_id))
    if output.cancelled:
        return {"job_id": job_id, "done": 0, "errors": 0, "dropped": True}
    done = store.write_results(job_id, output.records, output.tiles)
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
