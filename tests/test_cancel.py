"""`crackq cancel`: once it returns, a job gets no further results, and its queued chunks are dropped."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from benchmarks.common import REPO
from benchmarks.common.service import wait_until
from producer.api import Client
from tests.faults import idle, mixed_paths, results_written, task_events

CHUNK = 16


def test_cancel_mid_job_no_result_appears_afterwards(concrete_dir, service_env, redis_server, queue_name,
                                                     start_worker):
    workers = [start_worker(data_roots=[str(concrete_dir)], wait=False) for _ in range(2)]
    for w in workers:
        w.wait_ready()
    client = Client.from_settings(chunk_size=CHUNK)
    paths = mixed_paths(concrete_dir, 960, offset=4000)
    job_id = client.submit(paths)
    r = redis_server.client()
    wait_until(lambda: results_written(r, job_id) >= 4 * CHUNK, 120, 0.05, "the job to be under way")

    cancel = subprocess.run([sys.executable, "-m", "producer.cli", "cancel", job_id], cwd=REPO, capture_output=True,
                            text=True, timeout=60, env={**os.environ, **service_env})
    assert cancel.returncode == 0, cancel.stderr
    assert f"job {job_id} cancelled" in cancel.stderr
    frozen = results_written(r, job_id)
    assert frozen < len(paths)

    def workers_idle() -> bool:
        assert results_written(r, job_id) == frozen  # checked on every poll until the queue is empty
        return idle(r, queue_name)

    wait_until(workers_idle, 120, 0.05, "the workers to drop the cancelled job's chunks")
    assert results_written(r, job_id) == frozen
    status = client.status(job_id)
    assert status.state == "cancelled" and status.done == frozen
    assert len(list(client.results(job_id))) == frozen

    # Every chunk taken after the cancel was dropped unclassified (its summary says so).
    summaries = [m for w in workers for m in re.findall(r"succeeded in [0-9.e-]+s: (\{.*\})", w.log())]
    dropped = [s for s in summaries if "'dropped': True" in s]
    classified = [s for s in summaries if "'dropped'" not in s]
    chunks = -(-len(paths) // CHUNK)
    assert dropped and len(classified) * CHUNK == frozen
    assert len(dropped) + len(classified) == chunks
    assert sum(len(task_events(w.log(), "received")) for w in workers) == chunks  # none ran twice

    # The workers are not stuck: the next job is served.
    follow_up = mixed_paths(concrete_dir, 32, offset=4600)
    assert client.wait(client.submit(follow_up), timeout=120).state == "done"
