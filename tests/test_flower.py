"""Flower, started with the command line of docker-compose.yml's `flower` service, against the test Redis.

It must list the running worker through its (password-protected) API, serve Prometheus metrics that
follow the worker's task events, and pass the compose health check.
"""

from __future__ import annotations

import base64
import os
import secrets
import socket
import subprocess
import urllib.error
import urllib.request

from benchmarks.common.service import wait_until
from producer.api import Client
from producer.embedded import free_port, stop_group
from tests.compose import host_env, start_command


def http_get(url: str, auth: str | None = None) -> tuple[int | None, str]:
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return None, ""


def test_flower_lists_the_worker_and_serves_its_metrics(compose_config, start_worker, service_env, concrete_dir,
                                                         tmp_path):
    node = f"flower-test@{socket.gethostname()}"
    start_worker(data_roots=[str(concrete_dir)], args=["--hostname", node])

    service = compose_config["services"]["flower"]
    port = free_port()
    # What the container differs in: loopback instead of all interfaces, a free port, the test Redis.
    command = [{"--address=0.0.0.0": "--address=127.0.0.1", "--port=5555": f"--port={port}"}.get(a, a)
               for a in service["command"]]
    assert command != service["command"]
    credentials = f"ops:{secrets.token_hex(8)}"
    env = host_env(service, FLOWER_BASIC_AUTH=credentials, **service_env)
    flower = start_command(command, env, tmp_path / "flower.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: flower.poll() is None and http_get(f"{base}/healthcheck") == (200, "OK"), 60,
                   message=f"Flower to answer; log:\n{(tmp_path / 'flower.log').read_text()[-2000:]}")
        assert http_get(f"{base}/api/workers")[0] == 401  # the API and dashboard need the password
        assert http_get(f"{base}/api/workers", "ops:wrong")[0] == 401
        wait_until(lambda: node in http_get(f"{base}/api/workers?refresh=1", credentials)[1], 60,
                   message="Flower's API to list the worker")

        client = Client.from_settings()
        paths = [str(concrete_dir / "Positive" / n) for n in sorted(os.listdir(concrete_dir / "Positive"))[:4]]
        job = client.submit(paths, chunk_size=2)
        assert client.wait(job, timeout=120).state == "done"
        succeeded = (f'flower_events_total{{task="crackq.classify_chunk",type="task-succeeded",'
                     f'worker="{node}"}} 2.0')
        wait_until(lambda: succeeded in http_get(f"{base}/metrics")[1], 30, message="Flower's metrics")
        online = f'flower_worker_online{{worker="{node}"}} 1.0'  # set from the worker's heartbeats
        wait_until(lambda: online in http_get(f"{base}/metrics")[1], 30, message="Flower's worker-online gauge")

        test = [a.replace("127.0.0.1:5555", f"127.0.0.1:{port}") for a in service["healthcheck"]["test"][1:]]
        assert subprocess.run(test, env=env, capture_output=True, timeout=30).returncode == 0
    finally:
        stop_group(flower, grace=10)
