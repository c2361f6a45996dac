"""Per-process heavy state: the model is loaded once per worker process, after the fork.

A model loaded in the parent of a prefork pool hangs every child (TensorFlow's
thread pools do not survive ``fork``), so nothing heavy is imported at module
level; :func:`load` runs in ``worker_process_init`` (each prefork child) and,
as a fallback, on first use (solo/threads pools).
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from celery.signals import worker_process_init, worker_process_shutdown

from shared.config import Settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_state = {}


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def load(settings: Settings | None = None):
    """The process's :class:`worker.pipeline.ChunkRunner` and :class:`shared.store.JobStore`, built once."""
    with _lock:
        if "runner" not in _state or _state.get("pid") != os.getpid():
            settings = settings or Settings.load()
            from shared.domain import DomainScorer
            from worker import metrics
            from worker.inference import load_classifier
            from worker.pipeline import ChunkRunner

            classifier = load_classifier(settings)
            domain = DomainScorer.load(classifier.info.directory, classifier.served.precision)
            _state["runner"] = ChunkRunner(classifier, settings, worker_name(), domain)
            _state["settings"] = settings
            _state["pid"] = os.getpid()
            metrics.start(settings)
            log.info("worker process %s ready (model %s)", worker_name(), classifier.info.name)
        return _state["runner"], store(settings)


def store(settings: Settings | None = None):
    """The process's :class:`shared.store.JobStore`, without the model.

    ``on_failure`` also runs in the pool's parent (after a hard time limit),
    where loading a model would break the children forked later: it needs
    only this.
    """
    cached = _state.get("store")
    if cached is None or cached[0] != os.getpid():
        from shared.connections import connect
        from shared.store import JobStore

        settings = settings or Settings.load()
        client = connect(settings.effective_redis_url, check=False, retry_seconds=settings.redis_retry_seconds)
        _state["store"] = (os.getpid(), JobStore(client, settings.result_ttl))
        cached = _state["store"]
    return cached[1]


def pin_gpu(process_index: int, gpu_count: int) -> str | None:
    """GPU workers: process i uses GPU i (mod count), set before TensorFlow is imported."""
    if gpu_count <= 0:
        return None
    device = str(process_index % gpu_count)
    os.environ["CUDA_VISIBLE_DEVICES"] = device
    return device


@worker_process_init.connect
def _load_in_child(**_kwargs):
    try:
        settings = Settings.load()
        if settings.device == "gpu":
            from billiard.process import current_process

            pin_gpu(getattr(current_process(), "index", 0) or 0, int(os.environ.get("CRACKQ_GPU_COUNT", "0")))
        load(settings)
    except Exception:  # noqa: BLE001 - log it; the task will report the error per chunk
        log.exception("model loading failed in worker process")


@worker_process_shutdown.connect
def _close(**_kwargs):
    runner = _state.get("runner")
    if runner is not None:
        runner.close()
