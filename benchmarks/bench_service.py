"""(d) The service end to end: what ``crackq run`` starts (private Redis + local workers), timed in parts.

``crackq run`` = start-up (private Redis, ``crackq worker`` processes loading
the model) + the job (submit -> last result collected).  The two are timed
separately, so the queue's cost (job vs in-process ceiling) is not hidden by
a start-up that a long-lived deployment pays once; both are reported.
While the service runs, a sampler thread records the peak RSS of every
worker process.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time

import psutil

from bench_setup import WorkerConfig
from producer.api import Client
from producer.embedded import local_workers, private_redis
from shared.config import Settings


class RssSampler:
    """Peak resident memory of a process tree, sampled every ``interval`` seconds in a thread."""

    def __init__(self, root_pid: int, interval: float = 0.1):
        self.root_pid = root_pid
        self.interval = interval
        self.peak: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")

    def start(self) -> "RssSampler":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for proc in procs:
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            self.peak[proc.pid] = max(rss, self.peak.get(proc.pid, 0))
            self.names.setdefault(proc.pid, "main" if proc.pid == self.root_pid else "pool")

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=5)
        pool = [v for pid, v in self.peak.items() if self.names[pid] == "pool"]
        main = [v for pid, v in self.peak.items() if self.names[pid] == "main"]
        mib = 2**20
        return {"pool_processes_mib": sorted(round(v / mib) for v in pool),
                "max_pool_process_mib": round(max(pool) / mib) if pool else None,
                "main_process_mib": round(main[0] / mib) if main else None}


class EmbeddedService:
    """A private Redis + ``crackq worker --concurrency P`` (as ``crackq run`` starts them), kept up for reuse."""

    def __init__(self, config: WorkerConfig, data_roots: list[str]):
        self.config = config
        self.data_roots = data_roots
        self.log_path = tempfile.NamedTemporaryFile(prefix="crackq-bench-worker-", suffix=".log", delete=False).name
        self._stack = contextlib.ExitStack()
        self.startup_seconds = 0.0
        self.client: Client | None = None
        self.rss: RssSampler | None = None

    def start(self, timeout: float = 300.0) -> "EmbeddedService":
        started = time.monotonic()
        try:
            url = self._stack.enter_context(private_redis())
            proc = self._stack.enter_context(local_workers(url, self.config.processes, self.data_roots,
                                                           env=self.config.worker_env(), log_path=self.log_path))
            self.rss = RssSampler(proc.pid).start()
            self._wait_ready(proc, started + timeout)
            self.startup_seconds = time.monotonic() - started
            self.client = Client(Settings.load(redis_url=url, model=self.config.model,
                                               chunk_size=self.config.chunk_size))
        except BaseException:
            self.close()
            raise
        return self

    def _wait_ready(self, proc, deadline: float) -> None:
        """Ready = Celery consuming and every pool process has loaded (and warmed) its model."""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}:\n{self.log()[-3000:]}")
            text = self.log()
            if "model loading failed" in text:
                raise RuntimeError(f"worker could not load the model:\n{text[-3000:]}")
            loaded = sum(1 for line in text.splitlines() if "worker process" in line and " ready" in line)
            if loaded >= self.config.processes and " ready." in text:
                return
            time.sleep(0.02)
        raise RuntimeError(f"workers not ready in time:\n{self.log()[-3000:]}")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as fh:
            return fh.read()

    def run_job(self, paths: list[str]) -> tuple[float, list[dict]]:
        """Submit -> wait -> every record read back; the wall time and the records."""
        start = time.perf_counter()
        job_id = self.client.submit(paths)
        status = self.client.wait(job_id, timeout=3600)
        records = list(self.client.results(job_id))
        seconds = time.perf_counter() - start
        if status.state != "done" or len(records) != len(paths):
            raise RuntimeError(f"job {job_id} ended {status.state} with {len(records)}/{len(paths)} records")
        errors = [r["error"] for r in records if r.get("error")]
        if errors:
            raise RuntimeError(f"{len(errors)} image(s) failed in the service, e.g. {errors[0]}")
        return seconds, records

    def latency(self, path: str) -> float:
        """One image, submit -> its record read back (warm workers)."""
        return self.run_job([path])[0]

    def close(self) -> dict:
        rss = self.rss.stop() if self.rss else {}
        self._stack.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)
        return rss
