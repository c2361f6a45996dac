"""No job waits on a dead worker: chunk leases bring back the chunks of a worker lost whole.

The visibility timeout stays at its default hour in every test here, so a job
can only finish in time because a lease ran out and a live worker (or the
producer) put its chunk back (protocol in ``shared/leases.py``).
"""

from __future__ import annotations

import math
import signal
import time

import psutil

from benchmarks.common.service import crackq_cli, wait_until
from producer.api import Client
from shared.config import Settings
from shared.store import deliveries_key
from tests.faults import in_flight, mixed_paths, task_events, waiting

LEASE = {"CRACKQ_LEASE_SECONDS": "5"}
CHUNK = 16


def _client(url: str, queue: str, lease_seconds: int = 5) -> Client:
    return Client(Settings.load(redis_url=url, queue=queue, chunk_size=CHUNK, lease_seconds=lease_seconds))


def _records(client: Client, job_id: str) -> list[dict]:
    return list(client.results(job_id))


def _taken(worker) -> set[str]:
    log = worker.log()
    return set(task_events(log, "received")) - set(task_events(log, "succeeded"))


def test_a_worker_killed_whole_mid_job_is_replaced_by_the_survivor_long_before_the_visibility_timeout(
        concrete_dir, redis_server, queue_name, start_worker):
    """Two workers; one loses its whole process group (kill -9) mid-chunk and never comes back."""
    roots = [str(concrete_dir)]
    victim = start_worker(env=LEASE, data_roots=roots, wait=False)
    survivor = start_worker(env=LEASE, data_roots=roots, wait=False)
    victim.wait_ready()
    survivor.wait_ready()
    # The test's own client waits with a long lease, so the recovery seen here is the surviving worker's.
    client = _client(redis_server.url, queue_name, lease_seconds=600)
    assert client.settings.visibility_timeout >= 3600
    paths = mixed_paths(concrete_dir, 320, offset=7000)

    undisturbed = _records(client, client.wait(client.submit(paths), timeout=300).id)

    job_id = client.submit(paths)
    wait_until(lambda: client.status(job_id).done >= 0.2 * len(paths), 240, 0.05, "20% done")
    seen = len(task_events(victim.log(), "received"))
    wait_until(lambda: len(task_events(victim.log(), "received")) > seen, 120, 0.02, "the victim to take a chunk")
    victim.kill9()
    killed_at = time.monotonic()
    lost = _taken(victim)
    assert lost and not client.status(job_id).finished

    status = client.wait(job_id, timeout=180)
    recovered_after = time.monotonic() - killed_at
    disturbed = _records(client, job_id)
    assert status.state == "done" and status.done == status.total == len(paths)
    assert [r["path"] for r in disturbed] == paths  # exactly one record per image, in order
    for before, after in zip(undisturbed, disturbed):
        assert before["label"] == after["label"] and not after["error"]
        assert math.isclose(before["crack_probability"], after["crack_probability"], abs_tol=1e-5)
    wait_until(lambda: lost <= set(task_events(survivor.log(), "succeeded")), 30, 0.1,
               "the lost chunk to have run again, on the survivor")
    assert "recovered 1 chunk(s) of queue" in survivor.log()
    r = redis_server.client()
    # The dead worker's entry left kombu's unacked hash: nothing comes back an hour from now.
    assert in_flight(r, queue_name) == 0 and waiting(r, queue_name) == 0
    print(f"\njob finished {recovered_after:.1f}s after the kill (lease 5 s, visibility timeout 3600 s)")


def test_crackq_status_recovers_a_lost_chunk_when_no_worker_is_left(concrete_dir, redis_server, queue_name,
                                                                     start_worker):
    """The only worker dies whole: `crackq status` puts its chunk back, and a new worker finishes the job."""
    worker = start_worker(env=LEASE, data_roots=[str(concrete_dir)])
    client = _client(redis_server.url, queue_name)
    paths = mixed_paths(concrete_dir, 96, offset=7400)
    job_id = client.submit(paths)
    wait_until(lambda: client.status(job_id).done >= CHUNK, 120, 0.05, "the job to be under way")
    seen = len(task_events(worker.log(), "received"))
    wait_until(lambda: len(task_events(worker.log(), "received")) > seen, 120, 0.02, "the worker to take a chunk")
    worker.kill9()
    r = redis_server.client()
    assert in_flight(r, queue_name) == 1
    env = {"CRACKQ_REDIS_URL": redis_server.url, "CRACKQ_QUEUE": queue_name, **LEASE}

    def recovered_by_status():
        crackq_cli("status", job_id, env=env)
        return in_flight(r, queue_name) == 0

    wait_until(recovered_by_status, 60, 0.5, "`crackq status` to put the lost chunk back")
    start_worker(env=LEASE, data_roots=[str(concrete_dir)])
    status = client.wait(job_id, timeout=180)
    assert status.state == "done" and [x["path"] for x in _records(client, job_id)] == paths


def test_a_chunk_that_keeps_killing_its_worker_gets_error_records_instead_of_looping(
        concrete_dir, service_env, start_worker):
    """The chunk's pool process dies each time it runs it: after CRACKQ_MAX_DELIVERIES starts, error records."""
    worker = start_worker(env={"CRACKQ_MAX_DELIVERIES": "2"}, data_roots=[str(concrete_dir)])
    client = Client.from_settings()
    paths = mixed_paths(concrete_dir, 400, offset=7600)  # one chunk: seconds of work, time to kill it
    job_id = client.submit(paths, chunk_size=len(paths))
    starts = deliveries_key(job_id)
    for attempt in (1, 2):  # kill the pool process while it runs the chunk, twice
        wait_until(lambda: sum(map(int, client.redis.hvals(starts))) >= attempt, 120, 0.01, "the chunk to start")
        children = psutil.Process(worker.proc.pid).children()
        children[0].send_signal(signal.SIGKILL)
        wait_until(lambda: worker.log().count("WorkerLostError") >= attempt, 60, 0.05, "the loss to be noticed")
    status = client.wait(job_id, timeout=120)
    assert status.state == "failed" and status.failed == len(paths) and status.failed_chunks == 1
    records = _records(client, job_id)
    assert [r["path"] for r in records] == paths
    assert {r["error"] for r in records} == {
        "chunk started 2 times without finishing (its worker died each time; CRACKQ_MAX_DELIVERIES=2)"}
    assert worker.proc.poll() is None
