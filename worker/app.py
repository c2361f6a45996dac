"""The worker's Celery app: ``celery -A worker.app worker`` and ``crackq worker`` both start it.

Configuration comes from :mod:`shared.queue` (JSON only, late acks, ...) with
settings from the ``CRACKQ_*`` environment; the task lives in
:mod:`worker.tasks`, and the heavy model state in :mod:`worker.state`.
"""

from __future__ import annotations

from shared.config import Settings
from shared.queue import make_celery

settings = Settings.load()
app = make_celery(settings, name="crackq-worker")
# Only well-formed crackq tasks get in (worker/consumer.py); leases bring back chunks of lost workers.
app.conf.update(include=["worker.tasks"], worker_consumer="worker.consumer:SafeConsumer")

import worker.state  # noqa: E402,F401  - registers the per-process start-up hooks
import worker.tasks  # noqa: E402,F401  - registers crackq.classify_chunk
from shared.transport import REFUSAL_HOOKS  # noqa: E402
from worker import metrics  # noqa: E402
from worker.leases import LeaseKeeper  # noqa: E402

app.steps["consumer"].add(LeaseKeeper)
REFUSAL_HOOKS.append(metrics.observe_refused)
