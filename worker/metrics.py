"""Prometheus metrics of a worker: one ``/metrics`` endpoint per ``crackq worker``, summed over its pool.

Why this design: a prefork worker classifies in N pool processes, and Celery
replaces them when they die or recycle.  One port per process would make
Prometheus scrape N targets per machine and forget the counts of a replaced
process.  Instead ``prometheus_client``'s multiprocess mode is used: every
pool process writes its samples to memory-mapped files in
``PROMETHEUS_MULTIPROC_DIR``, and the worker's *main* process (which runs no
inference) serves their sum on ``CRACKQ_METRICS_PORT``.  Values that are not
per-process (queue depth, model) are read by the main process when scraped,
with a short Redis timeout, so a scrape never hangs on a slow Redis.

Life cycle:

* :func:`serve` runs in the main process on Celery's ``worker_init`` signal (``worker/app.py``),
  before the pool forks: it sets ``PROMETHEUS_MULTIPROC_DIR`` (a fresh
  temporary folder unless the operator set one) *before* ``prometheus_client``
  is imported, so every pool process inherits multiprocess mode.
* :func:`start` runs once per pool process (``worker.context.current``) and
  creates the metric objects there.
* :func:`observe_chunk`, :func:`observe_batch` and :func:`observe_failure`
  are called from the task and the pipeline; with metrics off they return at
  once.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from typing import Iterable

from celery.signals import worker_shutdown

from shared.config import Settings

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Seconds per chunk: from a chunk of small patches on a GPU to a chunk of drone photos on one core.
CHUNK_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
#: Seconds per forward pass of one batch.
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
#: Redis timeout of the scrape-time reads (queue depth): a scrape must answer even if Redis does not.
SCRAPE_TIMEOUT = 1.0

_metrics = None  # this process's metric objects (pool process, or the main process of a solo pool)
_server = {}  # main process: the HTTP server and the folder it created


# -- main process ------------------------------------------------------------------------------
def serve(settings: Settings) -> bool:
    """Start the ``/metrics`` HTTP server in the worker's main process; False when metrics are off."""
    if not settings.metrics_port:
        return False
    path = _prepare_multiproc_dir()
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    registry.register(ClusterCollector(settings))
    try:
        server, _thread = start_http_server(settings.metrics_port, registry=registry)
    except OSError as exc:  # port taken: the worker still classifies, only without metrics
        log.error("metrics: cannot listen on port %d (%s); metrics are off", settings.metrics_port, exc)
        return False
    _server["http"] = server
    log.info("metrics: serving /metrics on port %d (multiprocess dir %s)", settings.metrics_port, path)
    return True


def _prepare_multiproc_dir() -> str:
    """The multiprocess folder, set in the environment before ``prometheus_client`` is imported.

    A folder the operator chose is emptied (stale files of a previous run would
    be summed in); otherwise a private temporary one is made and removed at exit.
    """
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.remove(os.path.join(path, name))
    else:
        path = tempfile.mkdtemp(prefix="crackq-metrics-")
        os.environ[MULTIPROC_ENV] = path
        _server["tmpdir"] = path
    if "prometheus_client.values" in sys.modules:  # imported earlier: switch it to multiprocess values
        from prometheus_client import values

        values.ValueClass = values.get_value_class()
    return path


def stop() -> None:
    """Stop the HTTP server and remove the private multiprocess folder (main process, at shutdown)."""
    server = _server.pop("http", None)
    if server is not None:
        server.shutdown()
        server.server_close()
    tmpdir = _server.pop("tmpdir", None)
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)


class ClusterCollector:
    """Scrape-time gauges read by the main process: queue depth, unacknowledged chunks, Redis, model."""

    def __init__(self, settings: Settings):
        import redis
        from kombu.transport.redis import Channel
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        from shared.model_card import ModelInfo

        self.settings = settings
        self.model = ModelInfo.from_model_path(settings.model).name
        # One try with a short timeout: a scrape answers within seconds even if Redis hangs.
        self.redis = redis.Redis.from_url(settings.effective_redis_url, socket_connect_timeout=SCRAPE_TIMEOUT,
                                          socket_timeout=SCRAPE_TIMEOUT, retry=Retry(NoBackoff(), 0))
        # The lists kombu keeps for one queue: the queue itself plus one per priority step.
        self.queue_keys = [settings.queue] + [f"{settings.queue}{Channel.sep}{p}" for p in Channel.priority_steps if p]
        self.unacked_key = Channel.unacked_key

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

        yield InfoMetricFamily("crackq_model", "Model this worker serves, its backend and device.", value={
            "model": self.model, "backend": self.settings.backend, "device": self.settings.device,
            "queue": self.settings.queue})
        up = GaugeMetricFamily("crackq_redis_up", "1 if the worker's main process could read Redis at this scrape.")
        try:
            pipe = self.redis.pipeline(transaction=False)
            for key in self.queue_keys:
                pipe.llen(key)
            pipe.hlen(self.unacked_key)
            *lengths, unacked = pipe.execute()
        except Exception as exc:  # noqa: BLE001 - a scrape reports Redis down instead of failing
            log.warning("metrics: cannot read queue depth: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily("crackq_queue_depth", "Chunks waiting in the queue (not yet delivered).",
                                  labels=["queue"])
        depth.add_metric([self.settings.queue], sum(lengths))
        yield depth
        yield GaugeMetricFamily("crackq_unacked_chunks",
                                "Chunks delivered to workers and not yet acknowledged (all queues on this Redis).",
                                value=unacked)


# -- pool processes ----------------------------------------------------------------------------
class _Metrics:
    """The metric objects of one process (created after the fork, in multiprocess mode)."""

    def __init__(self):
        from prometheus_client import Counter, Histogram

        self.images = Counter("crackq_images_classified", "Images classified, by label.", ["label"])
        self.errors = Counter("crackq_image_errors", "Images that got an error record (unreadable, refused...).")
        self.chunks = Counter("crackq_chunks", "Chunks processed (results written).")
        self.failed = Counter("crackq_chunks_failed", "Chunks that failed after their retries or time limit.")
        self.inputs = Counter("crackq_model_inputs", "Model inputs (images or tiles) run through the model.")
        self.chunk_seconds = Histogram("crackq_chunk_seconds", "Time to process one chunk (decode, infer, write).",
                                       buckets=CHUNK_BUCKETS)
        self.batch_seconds = Histogram("crackq_batch_seconds", "Time of one forward pass of a batch.",
                                       buckets=BATCH_BUCKETS)


def start(settings: Settings) -> None:
    """Create this process's metrics (once per pool process); nothing when metrics are off."""
    global _metrics
    if _metrics is None and settings.metrics_port and os.environ.get(MULTIPROC_ENV):
        _metrics = _Metrics()


def observe_chunk(records: Iterable[dict], seconds: float) -> None:
    """Count a processed chunk's images by label and its errors, and its duration."""
    if _metrics is None:
        return
    labels: dict[str, int] = {}
    errors = 0
    for record in records:
        if record.get("error"):
            errors += 1
        else:
            labels[record.get("label", "")] = labels.get(record.get("label", ""), 0) + 1
    for label, count in labels.items():
        _metrics.images.labels(label=label).inc(count)
    if errors:
        _metrics.errors.inc(errors)
    _metrics.chunks.inc()
    _metrics.chunk_seconds.observe(seconds)


def observe_batch(inputs: int, seconds: float) -> None:
    """One forward pass over ``inputs`` images or tiles."""
    if _metrics is None:
        return
    _metrics.inputs.inc(inputs)
    _metrics.batch_seconds.observe(seconds)


def observe_failure() -> None:
    """A chunk that exhausted its retries or hit its time limit."""
    if _metrics is not None:
        _metrics.failed.inc()


_refused = {}  # the main process's counter of refused messages, made on first use


def observe_refused(reason: str) -> None:
    """A message refused by the consumer (undecodable, malformed, not a crackq task), by reason kind.

    Refusals happen in the worker's main process (the consumer), which has no
    :class:`_Metrics`; its counter is made on first use, in multiprocess mode
    like the pool's, so the endpoint sums it in.
    """
    if not os.environ.get(MULTIPROC_ENV):
        return
    counter = _refused.get(os.getpid())
    if counter is None:
        from prometheus_client import Counter

        counter = Counter("crackq_messages_refused", "Queue messages refused and parked in the dead-letter list "
                          "(undecodable, malformed, refused task).", ["reason"])
        _refused.clear()
        _refused[os.getpid()] = counter
    counter.labels(reason=reason).inc()


def serve_in_main_process(settings: Settings) -> None:
    """:func:`serve`, never raising (connected to ``worker_init`` by ``worker/app.py``)."""
    try:
        serve(settings)
    except Exception:  # noqa: BLE001 - metrics must never keep a worker from classifying
        log.exception("metrics: could not start the /metrics endpoint")


@worker_shutdown.connect
def _stop_in_main_process(**_kwargs):
    stop()
