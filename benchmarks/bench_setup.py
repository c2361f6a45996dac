"""What every throughput measurement shares: the image sample, the worker settings, the machine, and the
CPU time of process trees.

All four measurements of ``benchmarks.throughput`` run on the *same*
images with the *same* per-process settings, so their ratios compare code
paths, not inputs or configurations.
"""

from __future__ import annotations

import os
import platform
import random
from collections import defaultdict
from dataclasses import asdict, dataclass

from benchmarks.common import CONCRETE
from producer.discover import discover
from shared.config import ENV_PREFIX, Settings

#: The labelled data set beside the repository (never copied into it).
DEFAULT_FOLDER = str(CONCRETE)


def sample_images(folder: str, n: int, seed: int = 0) -> list[str]:
    """``n`` images from ``folder``: balanced over its class sub-folders, seeded, shuffled.

    Balanced so a sample of the crack data set has as many cracks as not
    (a real survey mix); shuffled so every chunk holds both.
    """
    paths = discover([folder], recursive=True).paths
    if not paths:
        raise SystemExit(f"no images found in {folder}")
    groups: dict[str, list[str]] = defaultdict(list)
    for path in sorted(paths):
        groups[os.path.dirname(path)].append(path)
    rng = random.Random(seed)
    keys = sorted(groups)
    picked: list[str] = []
    for i, key in enumerate(keys):
        want = n // len(keys) + (1 if i < n % len(keys) else 0)
        group = groups[key]
        picked += rng.sample(group, min(want, len(group)))
    rng.shuffle(picked)
    return picked


@dataclass(frozen=True)
class WorkerConfig:
    """One worker configuration: processes × inference threads, batch, chunk, decode threads, backend."""

    processes: int
    threads: int
    batch_size: int
    chunk_size: int
    decode_threads: int
    backend: str
    model: str
    precision: str = "fp32"

    @classmethod
    def resolve(cls, settings: Settings, processes: int, threads: int | None) -> "WorkerConfig":
        """Threads as ``crackq worker`` picks them (``worker.cli.plan``) unless given."""
        from worker.cli import plan

        if threads is None:
            threads = settings.threads
        if not threads:
            threads = plan(settings.replace(threads=0), processes, 0)[1].threads or 1
        from shared.inference import resolve_precision

        precision = resolve_precision(settings)[0] if settings.backend == "onnx" else "fp32"
        return cls(processes=processes, threads=threads, batch_size=settings.batch_size,
                   chunk_size=settings.chunk_size, decode_threads=settings.decode_threads,
                   backend=settings.backend, model=os.path.abspath(settings.model), precision=precision)

    def settings(self, data_roots: list[str]) -> Settings:
        """The settings one worker process of this configuration runs with."""
        return Settings.load(model=self.model, backend=self.backend, precision=self.precision, threads=self.threads,
                             batch_size=self.batch_size, chunk_size=self.chunk_size,
                             decode_threads=self.decode_threads, data_roots=os.pathsep.join(data_roots))

    def worker_env(self) -> dict[str, str]:
        """Environment of `crackq worker` processes with this configuration."""
        return {ENV_PREFIX + "MODEL": self.model, ENV_PREFIX + "BACKEND": self.backend,
                ENV_PREFIX + "PRECISION": self.precision,
                ENV_PREFIX + "THREADS": str(self.threads), ENV_PREFIX + "BATCH_SIZE": str(self.batch_size),
                ENV_PREFIX + "DECODE_THREADS": str(self.decode_threads), "PYTHONUNBUFFERED": "1"}

    def label(self) -> str:
        return (f"{self.processes} process(es) x {self.threads} inference thread(s), batch {self.batch_size}, "
                f"chunk {self.chunk_size}, {self.decode_threads} decode thread(s), {self.backend} {self.precision}")

    def to_dict(self) -> dict:
        return asdict(self)


def machine() -> dict:
    """The machine a result was measured on (cores, CPU model, RAM, load, library versions)."""
    import psutil

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "versions": _versions()}


def tree_processes(root_pids: list[int]) -> list:
    """The living processes (``psutil.Process``) of the trees rooted at ``root_pids``, roots first."""
    import psutil

    procs = []
    for pid in root_pids:
        try:
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
    return procs


def tree_cpu_seconds(root_pids: list[int]) -> float:
    """User + system CPU time used so far by the living processes of the trees rooted at ``root_pids``."""
    import psutil

    total = 0.0
    for proc in tree_processes(root_pids):
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("onnxruntime", "tensorflow-cpu", "tensorflow", "keras", "pillow", "numpy", "celery", "redis"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
