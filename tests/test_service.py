"""The core service end to end: real Redis, real `crackq worker` processes, real JPEGs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from benchmarks.common import REPO
from benchmarks.common.service import wait_until
from producer.api import Client
from shared.contract import RESULT_COLUMNS

CLI = [sys.executable, "-m", "producer.cli"]


def crackq(*args, env=None, check=True, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"crackq {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def sample(concrete_dir: Path, per_class: int, offset: int = 0) -> dict[str, str]:
    """``{path: expected label}`` for the first images of each class folder."""
    expected = {}
    for folder, label in (("Negative", "no_crack"), ("Positive", "crack")):
        names = sorted(os.listdir(concrete_dir / folder))[offset:offset + per_class]
        expected.update({str(concrete_dir / folder / n): label for n in names})
    return expected


def test_cli_submit_wait_results_classifies_real_images(concrete_dir, service_env, start_worker, tmp_path):
    originals = sample(concrete_dir, 60)
    start_worker(concurrency=2, data_roots=[str(concrete_dir)])
    listing = tmp_path / "list"
    (listing / "nested").mkdir(parents=True)
    expected = {}
    for i, (path, label) in enumerate(originals.items()):  # links into the data set: folders are walked
        link = listing / ("nested" if i % 3 == 0 else "") / f"{i:04d}.jpg"
        os.symlink(path, link)
        expected[str(link)] = label
    (listing / "notes.txt").write_text("not an image")
    submitted = crackq("submit", str(listing), "--chunk-size", "16", env=service_env)
    assert "skipped 1 non-image file" in submitted.stderr
    job_id = submitted.stdout.strip()
    assert len(job_id) == 32 and "\n" not in job_id

    crackq("wait", job_id, "--timeout", "240", env=service_env)
    status = json.loads(crackq("status", job_id, "--json", env=service_env).stdout)
    assert status["state"] == "done" and status["done"] == status["total"] == len(expected)
    assert status["failed"] == 0

    out = tmp_path / "results.csv"
    crackq("results", job_id, "--output", str(out), env=service_env)
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0].keys()) == RESULT_COLUMNS
    assert sorted(r["path"] for r in rows) == sorted(expected)  # one row per image
    assert all(r["error"] == "" for r in rows)
    wrong = [r["path"] for r in rows if r["label"] != expected[r["path"]]]
    assert len(wrong) <= 1, f"misclassified: {wrong}"
    assert {r["model"] for r in rows} == {"crackq-mobilenetv2:1"}
    assert len({r["worker"] for r in rows}) >= 1
    assert all(0.0 <= float(r["crack_probability"]) <= 1.0 and float(r["elapsed_ms"]) > 0 for r in rows)

    jsonl = crackq("results", job_id, "--format", "jsonl", env=service_env).stdout.splitlines()
    assert len(jsonl) == len(expected) and json.loads(jsonl[0])["path"] == rows[0]["path"]


def test_results_are_readable_while_the_job_runs(concrete_dir, service_env, start_worker):
    client = Client.from_settings()
    paths = list(sample(concrete_dir, 300, offset=100))
    job_id = client.submit(paths, chunk_size=8)
    start_worker(concurrency=1, data_roots=[str(concrete_dir)], wait=False)

    def partial():
        st = client.status(job_id)
        return st if 0 < st.done < st.total else None

    status = wait_until(partial, 180, 0.05, "some but not all results")
    assert status.state == "running"
    partial_results = list(client.results(job_id))
    assert 0 < len(partial_results) < len(paths)
    assert all(r["path"] in paths for r in partial_results)
    final = client.wait(job_id, timeout=300)
    assert final.state == "done" and len(list(client.results(job_id))) == len(paths)


def test_tasks_on_the_queue_are_json_only(concrete_dir, service_env, redis_server, queue_name):
    client = Client.from_settings()
    paths = list(sample(concrete_dir, 2))
    job_id = client.submit(paths, chunk_size=2)
    raw = redis_server.client().lrange(queue_name, 0, -1)
    assert len(raw) == 2
    for message in map(json.loads, raw):
        assert message["content-type"] == "application/json"
        assert message["headers"]["task"] == "crackq.classify_chunk"
        import base64

        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        assert args[0] == job_id and {"index", "path"} <= set(args[1][0])
    conf = client.celery.conf
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1


def test_a_corrupt_file_inside_a_good_chunk_is_an_error_record(concrete_dir, service_env, start_worker, tmp_path):
    good = list(sample(concrete_dir, 3))
    for i, path in enumerate(good):
        shutil.copy(path, tmp_path / f"good{i}.jpg")
    (tmp_path / "broken.jpg").write_bytes(Path(good[0]).read_bytes()[:600])  # truncated JPEG
    (tmp_path / "garbage.jpg").write_bytes(os.urandom(4096))
    paths = [str(tmp_path / "good0.jpg"), str(tmp_path / "broken.jpg"), str(tmp_path / "good1.jpg"),
             str(tmp_path / "garbage.jpg"), str(tmp_path / "good2.jpg")]
    start_worker(data_roots=[str(tmp_path)])
    client = Client.from_settings()
    job_id = client.submit(paths, chunk_size=16)
    status = client.wait(job_id, timeout=120)
    assert status.state == "done" and status.failed == 2
    records = {Path(r["path"]).name: r for r in client.results(job_id)}
    assert "truncated" in records["broken.jpg"]["error"] or "corrupt" in records["broken.jpg"]["error"]
    assert records["garbage.jpg"]["error"] == "not an image or unsupported format"
    assert records["broken.jpg"]["label"] == "" and records["broken.jpg"]["crack_probability"] is None
    for name in ("good0.jpg", "good1.jpg", "good2.jpg"):
        assert records[name]["error"] == "" and records[name]["label"] in ("crack", "no_crack")


def test_cli_errors_exit_2_with_a_message(tmp_path, service_env, redis_server):
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = crackq("submit", str(empty), env=service_env, check=False)
    assert nothing.returncode == 2 and "no images found" in nothing.stderr

    unknown = crackq("status", "f" * 32, env=service_env, check=False)
    assert unknown.returncode == 2 and "unknown job" in unknown.stderr

    image = tmp_path / "x.jpg"
    image.write_bytes(b"x")
    dead = crackq("submit", str(image), env={"CRACKQ_REDIS_URL": "redis://127.0.0.1:1/0"}, check=False)
    assert dead.returncode == 2 and "cannot reach Redis" in dead.stderr

    wrong = redis_server.url.replace(redis_server.password, "wrong-password")
    denied = crackq("status", "a" * 32, env={"CRACKQ_REDIS_URL": wrong}, check=False)
    assert denied.returncode == 2 and "password" in denied.stderr
    assert "wrong-password" not in denied.stderr and redis_server.password not in denied.stderr


def _alive(pids: set[int]) -> set[int]:
    return {p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}


class Descendants:
    """Remembers every process ever seen below ``pid`` (redis-server, workers, pool children)."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.seen: set[int] = set()

    def poll(self) -> set[int]:
        try:
            self.seen |= {c.pid for c in self.root.children(recursive=True)}
        except psutil.Error:
            pass
        return self.seen


def test_crackq_run_embedded_default_end_to_end_leaves_nothing_behind(concrete_dir, tmp_path, shipped_model):
    expected = sample(concrete_dir, 20, offset=500)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, (path, label) in enumerate(expected.items()):
        target = folder / ("sub" if i % 2 else "") / f"{label}-{i:03d}.jpg"
        shutil.copy(path, target)
    env = {k: v for k, v in os.environ.items() if k != "CRACKQ_REDIS_URL"}
    env.update(CRACKQ_MODEL=str(shipped_model))
    out = tmp_path / "out" / "results.csv"
    proc = subprocess.Popen([*CLI, "run", str(folder), "--out", str(out), "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    family = Descendants(proc.pid)
    while proc.poll() is None:  # sample the process tree until the run exits
        family.poll()
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "40 image(s)" in stdout and "0 error(s)" in stdout
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(expected)
    correct = sum(Path(r["path"]).name.startswith(r["label"] + "-") for r in rows)
    assert correct >= len(rows) - 1
    assert len(family.seen) >= 3  # redis-server, worker, pool child
    assert _alive(family.seen) == set()  # ... and every one of them is gone


def test_crackq_run_stops_everything_on_interrupt(concrete_dir, tmp_path, shipped_model):
    env = {k: v for k, v in os.environ.items() if k != "CRACKQ_REDIS_URL"}
    env.update(CRACKQ_MODEL=str(shipped_model))
    proc = subprocess.Popen([*CLI, "run", str(concrete_dir / "Negative"), "--out", str(tmp_path / "r.csv")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    family = Descendants(proc.pid)
    # A deterministic point mid-run, however loaded the machine: Redis and the workers are started and the
    # job exists once `run` prints its id (its 8,000 images then take far longer than this test waits).
    before = []
    for line in iter(proc.stderr.readline, ""):
        before.append(line)
        if line.startswith("job "):
            break
    first_line = before[-1] if before else ""
    assert first_line.startswith("job ") and "queueing 8000 image(s)" in first_line, "".join(before)
    family.poll()
    proc.send_signal(2)  # Ctrl-C
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, first_line + stderr
    assert "interrupted" in stderr
    assert len(family.seen) >= 2  # redis-server and the worker (at least) were running
    wait_until(lambda: _alive(family.seen) == set(), 30, 0.2, "every started process to exit")


def test_a_worker_with_a_wrong_password_exits_with_a_clear_message(redis_server, shipped_model):
    wrong = redis_server.url.replace(redis_server.password, "not-the-password")
    proc = crackq("worker", env={"CRACKQ_REDIS_URL": wrong, "CRACKQ_MODEL": str(shipped_model)}, check=False,
                  timeout=120)
    assert proc.returncode != 0
    assert "password" in proc.stderr and "not-the-password" not in proc.stderr + proc.stdout
