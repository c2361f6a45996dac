"""Nothing lost, nothing doubled: workers killed, stopped and cut off, Redis restarted, retries exhausted.

Every test runs real ``crackq worker`` processes against a real redis-server
and real concrete patches; the faults are real too (SIGKILL, SIGTERM, a
crashed and restarted Redis, a TCP link that drops connections).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import psutil
import pytest

from benchmarks.common import REPO
from benchmarks.common.service import RedisServer, wait_until
from producer.api import Client
from shared.config import Settings
from shared.connections import ride_over_retry
from tests.faults import FlakyLink, in_flight, mixed_paths, results_written, task_events, waiting

#: A chunk whose worker vanished is delivered again after 15 s (kombu checks every 10 s), not after an hour.
FAST_REDELIVERY = {"CRACKQ_VISIBILITY_TIMEOUT": "15", "CRACKQ_TASK_TIME_LIMIT": "12"}
CHUNK = 16


def _client(url: str, queue: str, **overrides) -> Client:
    return Client(Settings.load(redis_url=url, queue=queue, chunk_size=CHUNK, **overrides))


def _finished_results(client: Client, job_id: str, paths: list[str], timeout: float) -> dict[str, dict]:
    """Wait for the job; check it is done with exactly one classified record per image, in order."""
    status = client.wait(job_id, timeout=timeout)
    records = list(client.results(job_id))
    assert status.state == "done", status
    assert [r["path"] for r in records] == paths  # one record per image index, none missing, none extra
    assert [r for r in records if r["error"]] == []
    return {r["path"]: r for r in records}


def _next_chunk_taken(worker, timeout: float = 120) -> None:
    """Return as soon as the worker logs taking a new chunk: it is then busy with it for a while."""
    seen = len(task_events(worker.log(), "received"))
    wait_until(lambda: len(task_events(worker.log(), "received")) > seen, timeout, 0.02,
               "the worker to take a new chunk")


def _holding(worker) -> set[str]:
    """Chunks the worker has taken and not finished (from its log)."""
    log = worker.log()
    return set(task_events(log, "received")) - set(task_events(log, "succeeded"))


@pytest.mark.slow
def test_kill9_workers_repeatedly_every_image_gets_exactly_one_result(concrete_dir, redis_server, queue_name,
                                                                      start_worker):
    """Two workers; three times one of them loses its whole process group mid-chunk and is restarted."""
    paths = mixed_paths(concrete_dir, 1200)
    client = _client(redis_server.url, queue_name, visibility_timeout=15, task_time_limit=12)

    def worker(wait: bool):
        return start_worker(env=FAST_REDELIVERY, data_roots=[str(concrete_dir)], wait=wait)

    slots = [worker(False), worker(False)]
    everyone = list(slots)
    for w in slots:
        w.wait_ready()
    undisturbed = _finished_results(client, client.submit(paths), paths, timeout=300)

    job_id = client.submit(paths)
    killed = []
    for round_, fraction in enumerate((0.1, 0.35, 0.6)):
        slot = round_ % 2
        victim = slots[slot].wait_ready()
        wait_until(lambda: client.status(job_id).done >= fraction * len(paths), 240, 0.05, f"{fraction:.0%} done")
        _next_chunk_taken(victim)
        victim.kill9()
        assert not client.status(job_id).finished
        killed.append(_holding(victim))  # from its final log: taken, never finished
        slots[slot] = worker(False)
        everyone.append(slots[slot])

    disturbed = _finished_results(client, job_id, paths, timeout=300)

    # The chunks the killed workers held were delivered again and finished elsewhere.
    lost_in_kills = set().union(*killed)
    assert lost_in_kills
    finished_elsewhere = set().union(*(task_events(w.log(), "succeeded") for w in everyone))
    assert lost_in_kills <= finished_elsewhere
    # ... and the results are the undisturbed run's.
    for path in paths:
        assert disturbed[path]["label"] == undisturbed[path]["label"]
        assert math.isclose(disturbed[path]["crack_probability"], undisturbed[path]["crack_probability"],
                            abs_tol=1e-5)


def test_killing_a_pool_child_requeues_its_chunk_at_once(concrete_dir, service_env, start_worker):
    """Only the pool process dies (OOM killer): task_reject_on_worker_lost puts its chunk back at once.

    The visibility timeout is the default hour, so the job can only finish
    within the deadline if the chunk was requeued rather than abandoned.
    """
    worker = start_worker(data_roots=[str(concrete_dir)])
    client = Client.from_settings(chunk_size=CHUNK)
    assert client.settings.visibility_timeout >= 3600
    paths = mixed_paths(concrete_dir, 320, offset=2000)
    job_id = client.submit(paths)
    wait_until(lambda: client.status(job_id).done >= 2 * CHUNK, 120, 0.05, "the job to be under way")
    _next_chunk_taken(worker)
    children = psutil.Process(worker.proc.pid).children()
    assert len(children) == 1
    children[0].send_signal(signal.SIGKILL)

    _finished_results(client, job_id, paths, timeout=240)
    log = worker.log()
    assert "WorkerLostError" in log
    received = task_events(log, "received")
    assert [t for t in set(received) if received.count(t) > 1]  # the lost chunk came back to this worker
    assert worker.proc.poll() is None


@pytest.mark.parametrize("target", ["main process", "process group"])
def test_warm_shutdown_requeues_every_unfinished_chunk_at_once(concrete_dir, service_env, redis_server, queue_name,
                                                               start_worker, target):
    """SIGTERM: nothing is abandoned and nothing waits for the (one hour) visibility timeout.

    To the main process (docker stop, Kubernetes): the chunk in hand is
    finished first (one delivered just as the shutdown began is put back
    unstarted).  To the whole group (systemd's default KillMode, Ctrl-C in a
    terminal): the pool child dies at once and its chunk is requeued.
    """
    first = start_worker(data_roots=[str(concrete_dir)])
    client = Client.from_settings(chunk_size=CHUNK)
    paths = mixed_paths(concrete_dir, 320, offset=2400 if target == "main process" else 6000)
    job_id = client.submit(paths)
    wait_until(lambda: client.status(job_id).done >= 2 * CHUNK, 120, 0.05, "the job to be under way")
    _next_chunk_taken(first)
    if target == "main process":
        first.proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(first.proc.pid, signal.SIGTERM)
    assert first.proc.wait(timeout=120) == 0

    r = redis_server.client()
    log = first.log()
    finished = set(task_events(log, "succeeded"))
    unfinished = set(task_events(log, "received")) - finished
    if target == "main process":
        assert "WorkerLostError" not in log  # the chunk in hand was finished, not killed
        # A chunk delivered just as the shutdown began is not started but put back.
        assert not unfinished or (len(unfinished) == 1 and "Restoring 1 unacknowledged message(s)" in log)
    else:  # the pool child got SIGTERM too: its chunk was lost with it and requeued, or put back unstarted
        assert len(unfinished) <= 1
        assert "WorkerLostError" in log or "Restoring 1 unacknowledged message(s)" in log or not unfinished
    assert in_flight(r, queue_name) == 0  # nothing left unacknowledged, waiting for the visibility timeout
    # Every chunk not finished is back on the queue.  (At most one finished chunk may be there too: one whose
    # acknowledgement was still pending when the consumer stopped is restored with the unacknowledged ones;
    # at least once means a duplicate, never a loss.)
    expected = math.ceil(len(paths) / CHUNK) - len(finished)
    assert expected <= waiting(r, queue_name) <= expected + 1
    # (A chunk killed after its write but before its acknowledgement is requeued all the same: at least once.)
    assert len(finished) * CHUNK <= results_written(r, job_id) <= len(finished | unfinished) * CHUNK < len(paths)

    start_worker(data_roots=[str(concrete_dir)])
    _finished_results(client, job_id, paths, timeout=240)


def test_a_chunk_over_its_time_limit_gets_error_records_and_fails_the_job(concrete_dir, service_env, start_worker):
    """The soft limit (90% of CRACKQ_TASK_TIME_LIMIT) stops a chunk; its images get a record, it is not retried."""
    worker = start_worker(env={"CRACKQ_TASK_TIME_LIMIT": "2"}, data_roots=[str(concrete_dir)])  # soft limit 1 s
    client = Client.from_settings()
    paths = mixed_paths(concrete_dir, 800, offset=6400)  # one chunk: seconds of work on any CPU thread
    job_id = client.submit(paths, chunk_size=len(paths))
    status = client.wait(job_id, timeout=120)
    assert status.state == "failed" and status.failed_chunks == 1 and status.failed == len(paths)
    records = list(client.results(job_id))
    assert [r["path"] for r in records] == paths and {r["error"] for r in records} == {"chunk timed out"}
    log = worker.log()
    assert "Soft time limit (1s) exceeded" in log and task_events(log, "retry") == []
    assert worker.proc.poll() is None


@pytest.mark.slow
def test_redis_crash_and_restart_with_aof_mid_job_loses_nothing(concrete_dir, tmp_path, queue_name, start_worker):
    """Redis is SIGKILLed mid-job and restarted from its AOF on the same port; workers and producer ride over it."""
    server = RedisServer(tmp_path / "redis-aof", appendonly=True).start()
    worker = None
    try:
        worker = start_worker(redis_url=server.url, data_roots=[str(concrete_dir)])
        client = _client(server.url, queue_name)
        paths = mixed_paths(concrete_dir, 480, offset=2800)
        job_id = client.submit(paths)
        # A second producer, the CLI, follows the job across the restart.
        waiter = subprocess.Popen([sys.executable, "-m", "producer.cli", "wait", job_id, "--timeout", "240"],
                                  cwd=REPO, env={**os.environ, "CRACKQ_REDIS_URL": server.url},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: client.status(job_id).done >= 6 * CHUNK, 120, 0.05, "the job to be under way")
        server.stop(signal.SIGKILL)
        server.start()

        _finished_results(client, job_id, paths, timeout=240)
        out, err = waiter.communicate(timeout=240)
        assert waiter.returncode == 0, err
        assert f"job {job_id} done" in err
        log = worker.log()
        assert "Connection to broker lost" in log and log.count("Connected to redis://") >= 2
        assert any((tmp_path / "redis-aof").rglob("*.aof"))
    finally:
        if worker:
            worker.stop()
        server.stop()


def test_redis_outage_longer_than_the_ride_over_requeues_the_chunk_instead_of_dropping_it(
        concrete_dir, tmp_path, queue_name, start_worker):
    """The result write outlives redis-py's retries and Celery cannot even queue a retry: the chunk stays.

    (Celery's own answer, ``Reject(requeue=False)``, acknowledged the
    message and lost the chunk; ``ChunkTask.retry`` requeues it instead.)
    """
    server = RedisServer(tmp_path / "redis-aof", appendonly=True).start()
    worker = None
    try:
        env = {**FAST_REDELIVERY, "CRACKQ_REDIS_RETRY_SECONDS": "1"}
        worker = start_worker(redis_url=server.url, env=env, data_roots=[str(concrete_dir)])
        client = _client(server.url, queue_name, visibility_timeout=15, task_time_limit=12)
        paths = mixed_paths(concrete_dir, 160, offset=3400)
        job_id = client.submit(paths)
        wait_until(lambda: client.status(job_id).done >= CHUNK, 120, 0.05, "the job to be under way")
        _next_chunk_taken(worker)
        server.stop(signal.SIGKILL)
        wait_until(lambda: "reject requeue=" in worker.log(), 60, 0.1, "the chunk's retry to fail for want of Redis")
        server.start()

        _finished_results(client, job_id, paths, timeout=120)
        assert "reject requeue=True" in worker.log()
    finally:
        if worker:
            worker.stop()
        server.stop()


def test_transient_write_failures_are_retried_and_exhausted_retries_fail_the_job(concrete_dir, redis_server,
                                                                                queue_name, start_worker):
    """The worker's link to Redis drops its result writes: retried with backoff, then the job ends ``failed``."""
    link = FlakyLink(redis_server.port)
    try:
        env = {"CRACKQ_MAX_RETRIES": "2", "CRACKQ_REDIS_RETRY_SECONDS": "1"}
        worker = start_worker(redis_url=link.url(redis_server.url), env=env, data_roots=[str(concrete_dir)])
        client = _client(redis_server.url, queue_name)
        writes_per_attempt = 1 + ride_over_retry(1).get_retries()  # redis-py retries the write itself first

        recovers = mixed_paths(concrete_dir, 8, offset=3200)
        gives_up = mixed_paths(concrete_dir, 8, offset=3210)
        link.cut_writes(recovers[0], writes_per_attempt)  # the first attempt fails, the Celery retry succeeds
        link.cut_writes(gives_up[0], math.inf)
        job_ok = client.submit(recovers)
        job_bad = client.submit(gives_up)

        ok = _finished_results(client, job_ok, recovers, timeout=120)
        assert {r["label"] for r in ok.values()} <= {"crack", "no_crack"}

        states = []  # every state a poller sees: never `done` on the way to `failed` (one-step failure)
        bad = client.wait(job_bad, timeout=120, on_progress=lambda st: states.append(st.state))
        assert bad.state == "failed" and bad.failed_chunks == 1 and bad.failed == bad.total == len(gives_up)
        assert "done" not in states
        records = list(client.results(job_bad))
        assert [r["path"] for r in records] == gives_up
        assert all(r["error"].startswith("chunk failed after 2 retries: ConnectionError") for r in records)
        assert link.cut_count[recovers[0]] == writes_per_attempt
        assert link.cut_count[gives_up[0]] == 3 * writes_per_attempt  # first attempt + 2 retries

        retries = task_events(worker.log(), "retry")
        assert len(retries) == 1 + 2  # one for the job that recovered, two for the one that gave up
    finally:
        link.close()
