"""The worker's Celery app: ``celery -A worker.app worker`` and ``crackq worker`` both start it.

Configuration comes from :mod:`shared.celery_config` (JSON only, late acks, ...) with
the worker's settings (:func:`worker.context.settings`: loaded once); the task lives in
:mod:`worker.tasks`, and the per-process model state in :mod:`worker.context`.
"""

from __future__ import annotations

from celery.signals import worker_init

from shared.celery_config import make_celery
from shared.transport import REFUSAL_HOOKS
from worker import context, metrics
from worker import tasks  # noqa: F401 - registers crackq.classify_chunk (a shared task) on this app
from worker.leases import LeaseKeeper

settings = context.settings()
app = make_celery(settings, name="crackq-worker")
# Only well-formed crackq tasks get in (worker/consumer.py); leases bring back chunks of lost workers.
app.conf.update(include=["worker.tasks"], worker_consumer="worker.consumer:SafeConsumer")
app.steps["consumer"].add(LeaseKeeper)
REFUSAL_HOOKS.append(metrics.observe_refused)


@worker_init.connect
def _serve_metrics(**_kwargs):
    metrics.serve_in_main_process(settings)
