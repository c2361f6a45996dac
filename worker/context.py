"""A worker's context: its settings, loaded once, and per process its name, store and model runner.

In the spirit of arq's ``ctx``: everything a task needs is built once and
handed out from here, instead of each module reloading settings.

* **Settings** are loaded once per worker, in the main process, before the
  pool forks: ``crackq worker`` installs the ones its flags made
  (:func:`install`); ``celery -A worker.app worker`` loads them from the
  ``CRACKQ_*`` environment on first use.  Pool processes inherit them with
  the fork.
* **Per process** (:func:`current`): a model loaded in the parent of a
  prefork pool hangs every child (TensorFlow's thread pools do not survive
  ``fork``), so the runner is built in ``worker_process_init`` (each prefork
  child) and, as a fallback, on first use (solo/threads pools).  The store
  alone (:func:`store`) serves ``on_failure``, which also runs in the
  pool's parent, where loading a model would break the children forked later.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass

from celery.signals import worker_process_init, worker_process_shutdown

from shared.config import Settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_settings: list[Settings] = []
_per_process: dict[int, dict] = {}


@dataclass(frozen=True)
class WorkerContext:
    """What a task needs, built once per worker process."""

    settings: Settings
    name: str
    store: object  # shared.store.JobStore
    runner: object  # worker.pipeline.ChunkRunner


def install(settings: Settings) -> None:
    """The worker's settings (``crackq worker``, before the Celery app is built)."""
    _settings[:] = [settings]


def settings() -> Settings:
    """The worker's settings: installed by ``crackq worker``, else loaded from the environment once."""
    if not _settings:
        _settings.append(Settings.load())
    return _settings[0]


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _process() -> dict:
    return _per_process.setdefault(os.getpid(), {})


def store():
    """This process's :class:`shared.store.JobStore` (no model needed)."""
    state = _process()
    if "store" not in state:
        from shared.connections import connect
        from shared.store import JobStore

        s = settings()
        client = connect(s.effective_redis_url, check=False, retry_seconds=s.redis_retry_seconds)
        state["store"] = JobStore(client, s.result_ttl)
    return state["store"]


def current() -> WorkerContext:
    """This process's context, with the model loaded (once)."""
    with _lock:
        state = _process()
        if "context" not in state:
            state["context"] = _build()
        return state["context"]


def _build() -> WorkerContext:
    from shared.domain import DomainScorer
    from shared.inference import load_classifier
    from worker import metrics
    from worker.pipeline import ChunkRunner

    s = settings()
    name = worker_name()
    classifier = load_classifier(s, on_batch=metrics.observe_batch)
    domain = DomainScorer.load(classifier.info.directory, classifier.served.precision)
    runner = ChunkRunner(classifier, s, name, domain)
    metrics.start(s)
    log.info("worker process %s ready (model %s)", name, classifier.info.name)
    return WorkerContext(settings=s, name=name, store=store(), runner=runner)


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
        s = settings()
        if s.device == "gpu":
            from billiard.process import current_process

            pin_gpu(getattr(current_process(), "index", 0) or 0, s.gpu_count)
        current()
    except Exception:  # noqa: BLE001 - log it; the task will report the error per chunk
        log.exception("model loading failed in worker process")


@worker_process_shutdown.connect
def _close(**_kwargs):
    context = _process().get("context")
    if context is not None:
        context.runner.close()
