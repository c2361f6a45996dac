"""The Celery configuration both sides use: JSON only, late acks, one visibility timeout.

The producer only *sends* tasks by name (:data:`shared.contract.TASK_NAME`)
and never imports worker code; the worker adds the task to the same app
configuration.  Keeping the configuration here means a producer and a worker
can never disagree about serialization or routing.
"""

from __future__ import annotations

from celery import Celery

from shared.config import Settings
from shared.connections import ssl_options, strip_ssl_query
from shared.transport import register as register_transport


def celery_config(settings: Settings) -> dict:
    url = settings.effective_redis_url
    transport = {
        # A chunk whose worker vanished (kill -9, lost machine) is delivered again after this.
        "visibility_timeout": settings.visibility_timeout,
        # ... checked every 10 s (kombu's default scans only every 10th check, i.e. every 100 s).
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": 10,
        "socket_timeout": 60,
        "retry_on_timeout": True,
        "health_check_interval": 30,
    }
    config = {
        "broker_url": strip_ssl_query(url),
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        # Security: JSON only. A pickled message is refused, never executed.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        # Results go to the job store (shared.store), not Celery's result backend.
        "task_ignore_result": True,
        "result_backend": None,
        # At-least-once: acknowledge after the chunk's results are written; requeue if the process dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.task_time_limit,
        "task_soft_time_limit": settings.soft_time_limit,
        # Loading TensorFlow/ONNX models in a fresh process takes a while on small machines.
        "worker_proc_alive_timeout": 120,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_default_queue": settings.queue,
        "task_routes": {"crackq.*": {"queue": settings.queue}},
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "broker_channel_error_retry": True,
    }
    ssl = ssl_options(url)
    if ssl:
        config["broker_use_ssl"] = ssl
    return config


def make_celery(settings: Settings, name: str = "crackq") -> Celery:
    # kombu's Redis transport, except that no queue entry can stop a worker (shared/transport.py).
    register_transport()
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app
