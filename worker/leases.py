"""The worker's side of chunk leases (protocol in :mod:`shared.leases`): renew what it holds, recover orphans.

A consumer bootstep starts one daemon thread in the worker's *main* process,
which is where kombu keeps the delivered, unacknowledged messages (the pool
children only run them).  If the main process dies, the thread dies with it
and the leases run out: exactly the case the visibility timeout served badly.
If only a pool child dies, Celery already requeues its chunk at once
(``task_reject_on_worker_lost``).

The thread has its own Redis connection, so a busy event loop never delays a
renewal and the consumer's channel is never shared between threads.
"""

from __future__ import annotations

import logging
import threading
import time

from celery import bootsteps

from shared.leases import recover, renew
from worker import context

log = logging.getLogger(__name__)


def held_tags(consumer) -> list[str]:
    """Delivery tags of the messages this consumer holds and has not acknowledged yet."""
    task_consumer = getattr(consumer, "task_consumer", None)
    channel = getattr(task_consumer, "channel", None)
    qos = getattr(channel, "qos", None)
    if qos is None:
        return []
    delivered = getattr(qos, "_delivered", None) or {}
    dirty = getattr(qos, "_dirty", None) or set()
    for _ in range(5):  # the event loop thread may change them while we copy: copy again
        try:
            return [tag for tag in list(delivered) if tag not in set(dirty)]
        except RuntimeError:
            continue
    return []


class LeaseKeeper(bootsteps.StartStopStep):
    """Consumer step: renew this worker's leases every third of a lease; recover orphans every half lease."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent, **kwargs):
        super().__init__(parent, **kwargs)
        self.settings = context.settings()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, parent):
        if self.thread is not None and self.thread.is_alive():
            return  # the consumer restarts its steps on reconnection; one thread is enough
        self.stopped.clear()
        self.thread = threading.Thread(target=self._run, args=(parent,), name="crackq-leases", daemon=True)
        self.thread.start()

    def stop(self, parent):
        self.stopped.set()

    def shutdown(self, parent):
        self.stopped.set()

    def _run(self, consumer) -> None:
        lease = float(self.settings.lease_seconds)
        beat, recover_every = lease / 3.0, lease / 2.0
        holder = consumer.hostname
        connection = None
        next_recovery = time.monotonic() + recover_every
        while not self.stopped.is_set():
            try:
                if connection is None:
                    connection = consumer.app.connection_for_write()
                channel = connection.default_channel
                renew(channel.client, held_tags(consumer), holder, lease)
                if time.monotonic() >= next_recovery:
                    next_recovery = time.monotonic() + recover_every
                    recover(channel, self.settings.queue, lease)
            except Exception as exc:  # noqa: BLE001 - Redis away: try again at the next beat
                log.warning("lease heartbeat failed (%s: %s); retrying", type(exc).__name__, exc)
                if connection is not None:
                    try:
                        connection.release()
                    except Exception:  # noqa: BLE001
                        pass
                connection = None
            self.stopped.wait(beat)
        if connection is not None:
            try:
                connection.release()
            except Exception:  # noqa: BLE001
                pass
