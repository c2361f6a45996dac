"""Worker Prometheus metrics: a real `crackq worker` (two pool processes), real Redis, real JPEGs.

The endpoint is served by the worker's main process and sums its pool processes (prometheus_client
multiprocess mode); queue depth is read from Redis at scrape time.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import REPO
from benchmarks.common.service import wait_until
from producer.api import Client
from producer.embedded import free_port
from shared.config import Settings


def scrape(port: int) -> dict[tuple, float]:
    """``{(sample name, sorted label items): value}`` from the worker's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def celery_control(*args: str, env: dict) -> str:
    proc = subprocess.run([sys.executable, "-m", "celery", "-A", "worker.app", "control", *args],
                          capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_metrics_endpoint_counts_images_errors_chunks_latency_and_queue_depth(
        concrete_dir, service_env, start_worker, queue_name, shipped_model, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for folder in ("Negative", "Positive"):
        for name in sorted(os.listdir(concrete_dir / folder))[:8]:
            shutil.copyfile(concrete_dir / folder / name, images / f"{folder}-{name}")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    paths = sorted(str(p) for p in images.iterdir())

    # A stale sample left in an operator-chosen multiprocess folder must not be summed in.
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    subprocess.run([sys.executable, "-c", "from prometheus_client import Counter; "
                    "Counter('crackq_chunks', 'stale').inc(1000)"],
                   env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom_dir)}, check=True)
    assert list(prom_dir.glob("*.db"))

    port = free_port()
    node = f"metrics@{socket.gethostname()}"
    start_worker(concurrency=2, data_roots=[str(images)], args=["--hostname", node],
                 env={"CRACKQ_METRICS_PORT": str(port), "PROMETHEUS_MULTIPROC_DIR": str(prom_dir)})

    before = scrape(port)
    card = json.loads(shipped_model.with_name("model_card.json").read_text())
    assert value(before, "crackq_model_info", model=f"{card['name']}:{card['version']}", backend="onnx",
                 device="cpu", queue=queue_name) == 1
    assert value(before, "crackq_redis_up") == 1
    assert value(before, "crackq_queue_depth", queue=queue_name) == 0
    assert value(before, "crackq_chunks_total") == 0  # the stale 1000 is gone
    assert not [k for k in before if k[0] == "crackq_images_classified_total"]

    # Drained (as before a model upgrade), the worker takes nothing: the queue depth shows the waiting chunks.
    env = {**os.environ, **service_env}
    assert f"{node}: OK" in celery_control("cancel_consumer", queue_name, "-d", node, env=env)
    client = Client.from_settings()
    job = client.submit(paths, chunk_size=4)  # 17 images: 5 chunks
    wait_until(lambda: value(scrape(port), "crackq_queue_depth", queue=queue_name) == 5, 30,
               message="queue depth 5")
    assert client.status(job).done == 0

    assert f"{node}: OK" in celery_control("add_consumer", queue_name, "-d", node, env=env)
    assert client.wait(job, timeout=120).state == "done"
    after = wait_until(lambda: (s := scrape(port)) and value(s, "crackq_chunks_total") == 5 and s, 30,
                       message="all 5 chunks counted")

    labels = Counter(r["label"] for r in client.results(job) if not r["error"])
    assert sum(labels.values()) == 16 and set(labels) <= {"crack", "no_crack"}
    for label in ("crack", "no_crack"):
        assert (value(after, "crackq_images_classified_total", label=label) or 0) == labels[label]
    assert value(after, "crackq_image_errors_total") == 1
    assert value(after, "crackq_model_inputs_total") == 16
    assert value(after, "crackq_chunks_failed_total") == 0
    assert value(after, "crackq_chunk_seconds_count") == 5 and value(after, "crackq_chunk_seconds_sum") > 0
    assert value(after, "crackq_chunk_seconds_bucket", le="+Inf") == 5
    assert value(after, "crackq_batch_seconds_count") >= 4 and value(after, "crackq_batch_seconds_sum") > 0
    assert value(after, "crackq_queue_depth", queue=queue_name) == 0


def test_scrape_reports_redis_down_instead_of_failing(shipped_model):
    from worker.metrics import ClusterCollector

    settings = Settings.load(redis_url=f"redis://127.0.0.1:{free_port()}/0", model=str(shipped_model))
    families = {f.name: f for f in ClusterCollector(settings).collect()}
    assert [s.value for s in families["crackq_redis_up"].samples] == [0]
    assert "crackq_queue_depth" not in families and "crackq_model" in families


def test_metrics_are_off_by_default_and_cost_nothing():
    code = ("import os, worker.metrics as m; from shared.config import Settings; "
            "m.start(Settings.load()); m.observe_chunk([{'label': 'crack', 'error': ''}], 0.1); "
            "m.observe_batch(1, 0.1); print(m._metrics, os.environ.get('PROMETHEUS_MULTIPROC_DIR'))")
    env = {k: v for k, v in os.environ.items() if k not in ("CRACKQ_METRICS_PORT", "PROMETHEUS_MULTIPROC_DIR")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                         check=True).stdout
    assert out.split() == ["None", "None"]
