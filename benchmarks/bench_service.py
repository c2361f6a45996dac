"""(d) The service end to end: what ``crackq run`` starts (private Redis + local workers), timed in parts.

``crackq run`` = start-up (private Redis, ``crackq worker`` processes loading
the model) + the job (submit -> last result collected).  The two are timed
separately, so the queue's cost (job vs in-process ceiling) is not hidden by
a start-up that a long-lived deployment pays once; both are reported.
While the service runs, a sampler thread records the peak RSS of every
worker process.

Layouts of ``P`` worker processes:

* ``pool``: one ``crackq worker --concurrency P`` (what ``crackq run`` starts);
* ``separate``: ``P`` single-process ``crackq worker`` (``--scale worker=P``);
* ``pinned``: as ``separate``, each confined to its own core (Linux CPU
  affinity, inherited by all its threads): the scaling measurement that
  separates "does the service scale with worker processes" from "one process
  already uses more than one core".
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil

from benchmarks.bench_setup import WorkerConfig, tree_cpu_seconds, tree_processes
from producer.api import Client
from producer.embedded import local_workers, private_redis, stop_group, worker_command
from shared.config import Settings


class RssSampler:
    """Peak resident memory of process trees, sampled every ``interval`` seconds in a thread."""

    def __init__(self, root_pids: list[int], interval: float = 0.1):
        self.root_pids = root_pids
        self.interval = interval
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")

    def start(self) -> "RssSampler":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def processes(self) -> list[psutil.Process]:
        return tree_processes(self.root_pids)

    def sample(self) -> None:
        for proc in self.processes():
            try:
                self.peak[proc.pid] = max(proc.memory_info().rss, self.peak.get(proc.pid, 0))
            except psutil.Error:
                continue

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far by the process trees (main + pool processes)."""
        return tree_cpu_seconds(self.root_pids)

    def stop(self) -> dict:
        """Peaks of the main processes and of the pool processes still alive (replaced ones left out)."""
        self._stop.set()
        self._thread.join(timeout=5)
        pool = []
        for pid in self.root_pids:
            with contextlib.suppress(psutil.Error):
                pool += [self.peak[p.pid] for p in psutil.Process(pid).children() if p.pid in self.peak]
        main = [self.peak[p] for p in self.root_pids if p in self.peak]
        mib = 2**20
        return {"pool_processes_mib": sorted(round(v / mib) for v in pool),
                "max_pool_process_mib": round(max(pool) / mib) if pool else None,
                "main_process_mib": round(max(main) / mib) if main else None}


class EmbeddedService:
    """A private Redis + local ``crackq worker`` processes (as ``crackq run`` starts them), kept up for reuse."""

    LAYOUTS = ("pool", "separate", "pinned")

    def __init__(self, config: WorkerConfig, data_roots: list[str], layout: str = "pool"):
        if layout not in self.LAYOUTS:
            raise ValueError(f"layout must be one of {self.LAYOUTS}")
        self.config = config
        self.data_roots = data_roots
        self.layout = layout
        self.log_path = tempfile.NamedTemporaryFile(prefix="crackq-bench-worker-", suffix=".log", delete=False).name
        self._stack = contextlib.ExitStack()
        self.startup_seconds = 0.0
        self.client: Client | None = None
        self.rss: RssSampler | None = None

    def start(self, timeout: float = 300.0) -> "EmbeddedService":
        started = time.monotonic()
        try:
            url = self._stack.enter_context(private_redis())
            env = self.config.worker_env()
            if self.layout != "pool":
                cores = sorted(os.sched_getaffinity(0))
                procs = [self._stack.enter_context(_single_worker(
                    url, cores[i % len(cores)] if self.layout == "pinned" else None, self.data_roots, env,
                    self.log_path)) for i in range(self.config.processes)]
            else:
                procs = [self._stack.enter_context(local_workers(url, self.config.processes, self.data_roots,
                                                                 env=env, log_path=self.log_path))]
            self.rss = RssSampler([p.pid for p in procs]).start()
            self._wait_ready(procs, started + timeout)
            self.startup_seconds = time.monotonic() - started
            self.client = Client(Settings.load(redis_url=url, model=self.config.model,
                                               chunk_size=self.config.chunk_size))
        except BaseException:
            self.close()
            raise
        return self

    def _wait_ready(self, procs: list[subprocess.Popen], deadline: float) -> None:
        """Ready = every Celery worker consuming and every pool process has loaded (and warmed) its model."""
        while time.monotonic() < deadline:
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {proc.returncode}:\n{self.log()[-3000:]}")
            lines = self.log().splitlines()
            if any("model loading failed" in line for line in lines):
                raise RuntimeError("worker could not load the model:\n" + "\n".join(lines[-40:]))
            loaded = sum(1 for line in lines if "worker process" in line and " ready" in line)
            consuming = sum(1 for line in lines if line.rstrip().endswith(" ready."))
            if loaded >= self.config.processes and consuming >= len(procs):
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

    def cpu_seconds(self) -> float:
        """CPU time used so far by the worker processes (main + pool)."""
        return self.rss.cpu_seconds() if self.rss else 0.0

    def latency(self, path: str) -> float:
        """One image, submit -> its record read back (warm workers)."""
        return self.run_job([path])[0]

    def close(self) -> dict:
        rss = self.rss.stop() if self.rss else {}
        self._stack.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)
        return rss


@contextlib.contextmanager
def _single_worker(redis_url: str, core: int | None, data_roots: list[str], env: dict, log_path: str):
    """``crackq worker --concurrency 1``, confined to ``core`` if given; its process group stopped afterwards."""
    environment = {**os.environ, **env, "CRACKQ_REDIS_URL": redis_url,
                   "CRACKQ_DATA_ROOTS": os.pathsep.join(data_roots)}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(worker_command(1), env=environment, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(Path.cwd()),
                                preexec_fn=None if core is None else lambda: os.sched_setaffinity(0, {core}))
        try:
            yield proc
        finally:
            stop_group(proc)
