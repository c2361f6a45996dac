"""No message stops a worker: hand-published entries on the real queue, in front of a real job.

Each entry below once stopped the worker that popped it (``Unrecoverable
error``) or failed/stalled its job; now each is refused (logged, counted in
``crackq_messages_refused``, parked in the dead-letter list that ``crackq
dead-letters`` shows) or turned into error records, and the same worker
process classifies the job queued behind them.
"""

from __future__ import annotations

import base64
import json
import urllib.request
import uuid

import pytest

from benchmarks.common.service import crackq_cli, wait_until
from producer.api import Client
from producer.embedded import free_port
from shared.config import Settings
from shared.contract import TASK_NAME
from shared.celery_config import make_celery
from tests.faults import mixed_paths, waiting


def envelope(client: Client, name: str, args: list, kwargs: dict | None = None) -> dict:
    """A real message envelope as kombu writes it, made by Celery (sent to a scratch queue, popped)."""
    scratch = f"scratch-{uuid.uuid4().hex[:8]}"
    app = make_celery(client.settings.replace(queue=scratch))
    app.send_task(name, args=args, kwargs=kwargs or {}, queue=scratch)
    raw = client.redis.rpop(scratch)
    return json.loads(raw)


def with_body(message: dict, body) -> dict:
    message = json.loads(json.dumps(message))
    message["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    message["properties"]["delivery_tag"] = uuid.uuid4().hex
    return message


@pytest.fixture
def hostile(concrete_dir, service_env, queue_name, start_worker):
    port = free_port()
    worker = start_worker(env={"CRACKQ_METRICS_PORT": str(port)}, data_roots=[str(concrete_dir)])
    client = Client.from_settings(chunk_size=8)
    client.store.clear_dead_letters()
    return {"worker": worker, "client": client, "port": port, "env": service_env, "queue": queue_name}


def test_hostile_messages_are_refused_and_the_worker_serves_the_job_behind_them(hostile, concrete_dir):
    worker, client, queue = hostile["worker"], hostile["client"], hostile["queue"]
    pid = worker.proc.pid
    good = envelope(client, TASK_NAME, ["no-such-job", [], {}])
    entries = {
        "undecodable": "this is not JSON {",
        "not an envelope": json.dumps("x"),
        "envelope without properties": json.dumps({"body": "", "headers": {}}),
        "body of the wrong shape": json.dumps(with_body(good, "x")),
        "arguments of the wrong shape": json.dumps(with_body(good, [["job", "not a list"], {}, {}])),
        "unknown task": json.dumps(envelope(client, "nope.not_a_task", [])),
        "built-in Celery task": json.dumps(envelope(client, "celery.accumulate", [1, 2])),
    }
    for raw in entries.values():
        client.redis.lpush(queue, raw)  # BRPOP takes from the right: these come before the job
    paths = mixed_paths(concrete_dir, 24, offset=7800)
    job_id = client.submit(paths)

    status = client.wait(job_id, timeout=120)
    assert status.state == "done" and status.failed == 0
    assert [r["path"] for r in client.results(job_id)] == paths
    assert worker.proc.poll() is None and worker.proc.pid == pid
    assert "Unrecoverable error" not in worker.log()
    assert waiting(client.redis, queue) == 0

    letters = [json.loads(line) for line in
               crackq_cli("dead-letters", "--json", "--limit", "50", env=hostile["env"]).stdout.splitlines()]
    reasons = [letter["reason"] for letter in letters]
    assert len(letters) == len(entries), reasons
    assert sum(r.startswith("undecodable") for r in reasons) == 1
    assert sum(r.startswith("malformed") for r in reasons) == 4
    assert sum(r.startswith("refused: task") for r in reasons) == 2
    assert any("'celery.accumulate' is not a crackq task" in r for r in reasons)
    assert "this is not JSON {" in [letter["message"] for letter in letters]
    text = urllib.request.urlopen(f"http://127.0.0.1:{hostile['port']}/metrics", timeout=10).read().decode()
    assert 'crackq_messages_refused_total{reason="malformed"} 4.0' in text
    assert 'crackq_messages_refused_total{reason="undecodable"} 1.0' in text
    assert 'crackq_messages_refused_total{reason="refused"} 2.0' in text


def test_hand_made_chunks_with_bad_options_or_items_get_error_records_and_their_jobs_finish(hostile, concrete_dir):
    client = hostile["client"]
    patches = mixed_paths(concrete_dir, 3, offset=7900)
    celery = client.celery

    def job(items: list, options) -> str:
        job_id = uuid.uuid4().hex
        client.store.create(job_id, total=len(patches), chunks=1, options={})
        celery.send_task(TASK_NAME, args=[job_id, items, options], queue=client.settings.queue)
        return job_id

    items = [{"index": i, "path": p} for i, p in enumerate(patches)]
    cases = {
        job(items, {"tile_size": 227, "tile_overlap": 227}): "bad options: tile_overlap (227) must be smaller",
        job(items, {"threshold": "0.5"}): "bad options: threshold must be a number between 0 and 1",
        job(items, {"tile_size": 2}): "bad options: tile_size must be 0 (no tiling) or an integer of at least 16",
        job(items, {"tile_overlap": -1000}): "bad options: tile_overlap must be an integer of at least 0",
        job(items, {"scales": [1, 0]}): "bad options: scales must be a list",
    }
    missing_path = job([items[0], {"index": 1}, {"index": 2, "path": 7}, {"index": 99, "path": patches[0]},
                        {"path": patches[1]}], {})
    for job_id, reason in cases.items():
        status = client.wait(job_id, timeout=60)
        assert status.state == "done" and status.failed == len(patches)
        assert all(r["error"].startswith(reason) for r in client.results(job_id)), reason
    # Items without a path get error records; an index outside the job (99) or none at all is dropped, so
    # the job can still finish once the others are there: one image per index, no more.
    wait_until(lambda: client.status(missing_path).done == 3, 60, 0.1, "the hand-made job to finish")
    records = list(client.results(missing_path))
    assert records[0]["label"] in ("crack", "no_crack") and not records[0]["error"]
    assert [r["error"] for r in records[1:]] == ["item has no path (a string)"] * 2
    assert client.status(missing_path).state == "done"
    assert hostile["worker"].proc.poll() is None
