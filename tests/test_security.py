"""No one let in: JSON-only messages, passwords and TLS, data roots, no secrets in output, expiring results."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from benchmarks.common import REPO
from benchmarks.common.service import wait_until
from producer.api import Client
from shared.config import Settings
from shared.contract import TASK_NAME
from shared.celery_config import make_celery
from tests.faults import TlsRedisServer, idle, mixed_paths, tls_redis_binary


def crackq(*args, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})


class _CreatesFile:
    """Unpickling this calls ``open(path, "w")``: the marker file appears if a worker ever unpickles it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_pickled_task_is_refused_and_never_executed(concrete_dir, redis_server, queue_name, service_env,
                                                      start_worker, tmp_path):
    worker = start_worker(data_roots=[str(concrete_dir)])
    marker = tmp_path / "unpickled-and-ran"
    # A producer of the attacker's own that speaks pickle to our queue (as any Redis client could).
    evil = make_celery(Settings.load(redis_url=redis_server.url, queue=queue_name), name="evil")
    evil.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    evil.send_task(TASK_NAME, args=["job", [{"index": 0, "path": _CreatesFile(str(marker))}], {}],
                   queue=queue_name, serializer="pickle")

    refusal = "Refusing to deserialize untrusted content of type pickle"
    wait_until(lambda: marker.exists() or refusal in worker.log(), 60, 0.1, "the worker to handle the pickled message")
    assert not marker.exists()
    r = redis_server.client()
    wait_until(lambda: idle(r, queue_name), 30, 0.1, "the refused message to leave the queue")
    assert not marker.exists()
    assert worker.proc.poll() is None

    # The same worker still serves JSON jobs.
    client = Client.from_settings()
    paths = mixed_paths(concrete_dir, 4, offset=5000)
    status = client.wait(client.submit(paths), timeout=120)
    assert status.state == "done" and status.failed == 0
    assert not marker.exists()


def test_wrong_redis_password_fails_with_a_clear_message_and_never_prints_it(redis_server, tmp_path, start_worker):
    image = tmp_path / "a.jpg"
    image.write_bytes(b"x")
    wrong = redis_server.url.replace(redis_server.password, "not-the-password")
    worker = start_worker(redis_url=wrong, wait=False)  # a configuration error: the worker says why and exits
    for args in (("submit", str(image), "--json"), ("status", "0" * 32, "--json"), ("cancel", "0" * 32)):
        result = crackq(*args, env={"CRACKQ_REDIS_URL": wrong})
        assert result.returncode == 2, result
        assert "refused the password" in result.stderr or "needs a password" in result.stderr
        assert "redis://:***@127.0.0.1" in result.stderr
        output = result.stdout + result.stderr
        assert "not-the-password" not in output and redis_server.password not in output
        assert "Traceback" not in output

    no_password = redis_server.url.replace(f":{redis_server.password}@", "")
    result = crackq("status", "0" * 32, env={"CRACKQ_REDIS_URL": no_password})
    assert result.returncode == 2 and "password" in result.stderr

    wait_until(lambda: worker.proc.poll() is not None, 120, 0.2, "the worker to exit")
    assert worker.proc.returncode != 0
    assert "refused the password" in worker.log() and "redis://:***@127.0.0.1" in worker.log()
    assert "not-the-password" not in worker.log() and redis_server.password not in worker.log()


def test_results_expire_after_their_ttl(concrete_dir, redis_server, service_env, start_worker, monkeypatch):
    """Keys of a finished job vanish result_ttl seconds after its last write: Redis memory stays bounded."""
    ttl = 8
    monkeypatch.setenv("CRACKQ_RESULT_TTL", str(ttl))
    start_worker(data_roots=[str(concrete_dir)], env={"CRACKQ_RESULT_TTL": str(ttl)})
    submitted = crackq("submit", *mixed_paths(concrete_dir, 8, offset=5100), "--chunk-size", "4", "--json",
                       env={**service_env, "CRACKQ_RESULT_TTL": str(ttl)})
    assert submitted.returncode == 0, submitted.stderr
    assert redis_server.password not in submitted.stdout + submitted.stderr  # --json shows the URL masked
    job_id = json.loads(submitted.stdout)["job_id"]
    assert Client.from_settings().wait(job_id, timeout=120).state == "done"
    r = redis_server.client()
    keys = r.keys(f"crackq:job:{job_id}*")
    assert len(keys) >= 2 and all(0 < r.ttl(k) <= ttl for k in keys)
    wait_until(lambda: not r.keys(f"crackq:job:{job_id}*"), ttl + 30, 0.5, "the job's keys to expire")
    gone = crackq("status", job_id, env=service_env)
    assert gone.returncode == 2 and "unknown job" in gone.stderr


def test_tls_rediss_end_to_end_with_data_roots_enforced_and_no_secret_in_output(concrete_dir, tmp_path, queue_name,
                                                                                  start_worker):
    binary = tls_redis_binary()
    if binary is None:
        message = "no redis-server built with TLS on PATH (Debian: apt-get install redis-server)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    server = TlsRedisServer(tmp_path / "tls-redis", binary).start()
    worker = None
    try:
        worker = start_worker(redis_url=server.url, data_roots=[str(concrete_dir)])
        env = {"CRACKQ_REDIS_URL": server.url, "CRACKQ_QUEUE": queue_name}
        inside = mixed_paths(concrete_dir, 6, offset=5200)
        outside = tmp_path / "outside.jpg"
        shutil.copy(inside[0], outside)
        paths = [*inside, str(outside), "/etc/passwd"]

        submitted = crackq("submit", *paths, "--json", env=env)
        assert submitted.returncode == 0, submitted.stderr
        info = json.loads(submitted.stdout)
        assert info["images"] == len(paths) and info["redis"].startswith("rediss://:***@127.0.0.1:")
        waited = crackq("wait", info["job_id"], "--timeout", "120", env=env)
        assert waited.returncode == 0, waited.stderr
        got = crackq("results", info["job_id"], env=env)
        rows = {row["path"]: row for row in csv.DictReader(io.StringIO(got.stdout))}
        assert list(rows) == paths
        assert all(rows[p]["label"] in ("crack", "no_crack") and not rows[p]["error"] for p in inside)
        for refused in (str(outside), "/etc/passwd"):
            assert rows[refused]["error"] == "path outside the worker's data roots (CRACKQ_DATA_ROOTS)"
        assert "root:" not in got.stdout  # nothing of /etc/passwd was read into a record

        everything = "".join(p.stdout + p.stderr for p in (submitted, waited, got)) + worker.log()
        assert server.password not in everything
        assert "rediss://:**@127.0.0.1" in worker.log()  # Celery's banner, masked

        # TLS is verified: no CA, or plain redis:// to the TLS port, gets a clear refusal (exit 2).
        no_ca = server.url.split("?")[0]
        refused = crackq("status", info["job_id"], env={"CRACKQ_REDIS_URL": no_ca})
        assert refused.returncode == 2 and "certificate verify failed" in refused.stderr
        plain = crackq("status", info["job_id"], env={"CRACKQ_REDIS_URL": no_ca.replace("rediss://", "redis://")})
        assert plain.returncode == 2 and "cannot reach Redis" in plain.stderr
        assert server.password not in refused.stderr + plain.stderr
    finally:
        if worker:
            worker.stop()
        server.stop()
