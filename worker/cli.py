"""``crackq worker``: a thin wrapper over Celery's own worker.

It turns flags into one :class:`~shared.config.Settings` (the device's defaults
come from :meth:`Settings.load`, for the flag and ``CRACKQ_DEVICE`` alike),
checks that the model files are there before consuming anything (a worker that
cannot load its model must not swallow chunks), plans processes and threads,
installs the settings as the worker's context (:mod:`worker.context`; pool
processes inherit them) and hands over to ``celery worker``.  ``celery -A
worker.app worker`` works too, with settings from the environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import click

from shared.config import Settings, default_concurrency
from shared.model_card import onnx_path


def count_gpus() -> int:
    """NVIDIA GPUs visible to this machine (without importing TensorFlow in the pool's parent)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def plan(settings: Settings, concurrency: int | None, gpus: int) -> tuple[int, Settings]:
    """Processes to start and the settings they run with (threads per process, GPUs to spread over)."""
    if settings.device == "gpu":
        # One process per GPU; each pins its own device (worker.context.pin_gpu).
        concurrency = concurrency or max(1, gpus)
        return concurrency, settings.replace(gpu_count=settings.gpu_count or gpus)
    # One process per core with one inference thread each: the most images per CPU second (no
    # intra-op synchronisation) and linear scaling; measured in docs/performance.md.
    concurrency = concurrency or default_concurrency()
    if not settings.threads:
        settings = settings.replace(threads=max(1, (os.cpu_count() or 1) // concurrency))
    return concurrency, settings


def check_redis(settings: Settings) -> None:
    """A wrong URL or password is a configuration error: say so and exit, rather than retry forever."""
    from shared.connections import RedisUnavailable, connect

    try:
        connect(settings.effective_redis_url, timeout=10).close()
    except RedisUnavailable as exc:
        if "password" in str(exc):
            raise click.ClickException(str(exc)) from None
        # Unreachable: Redis may simply start later (compose, reboots); Celery keeps retrying.
        click.echo(f"warning: {exc}; will keep retrying", err=True)


def check_model(settings: Settings) -> None:
    model = Path(settings.model)
    needed = [onnx_path(model)] if settings.backend == "onnx" else [model]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise click.ClickException(f"model file not found: {', '.join(missing)} (set CRACKQ_MODEL or --model)")
    if settings.precision == "int8":
        from shared.inference import int8_problem

        problem = int8_problem(settings.model)
        if problem:
            raise click.ClickException(f"CRACKQ_PRECISION=int8: {problem}")


@click.command()
@click.option("--concurrency", "-c", type=int, default=None,
              help="Worker processes (default: one per CPU core, one per GPU).")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default=None, help="Run inference on CPU or GPU.")
@click.option("--backend", type=click.Choice(["onnx", "tf"]), default=None,
              help="Inference backend (default onnx on CPU, tf on GPU).")
@click.option("--precision", type=click.Choice(["int8", "fp32", "fp16"]), default=None,
              help="onnx backend: model precision (default: int8 on CPU when the gated INT8 model is there, "
                   "else fp32; fp16 needs the CUDA provider).")
@click.option("--model", default=None, help="Model .keras path (its .onnx and card beside it).")
@click.option("--redis-url", default=None, envvar="CRACKQ_REDIS_URL", help="Broker and job store URL.")
@click.option("--data-roots", default=None, help="Folders workers may read (os.pathsep-separated).")
@click.option("--batch-size", type=int, default=None, help="Images per forward pass.")
@click.option("--threads", type=int, default=None, help="Inference threads per process (0: cores/processes).")
@click.option("--metrics-port", type=int, default=None, help="Prometheus metrics port (0: off).")
@click.option("--hostname", "-n", default=None, help="Celery node name (default crackq-<pid>@<host>).")
@click.option("--loglevel", "-l", default=None, help="Log level.")
@click.option("--pool", default="prefork", show_default=True, help="Celery pool (prefork, solo, threads).")
def worker(concurrency, device, backend, precision, model, redis_url, data_roots, batch_size, threads,
           metrics_port, hostname, loglevel, pool):
    """Start a worker that classifies chunks from the queue."""
    settings = Settings.load(device=device, backend=backend, precision=precision, model=model,
                             redis_url=redis_url, data_roots=data_roots, batch_size=batch_size, threads=threads,
                             metrics_port=metrics_port, log_level=loglevel)
    check_model(settings)
    check_redis(settings)
    concurrency, settings = plan(settings, concurrency, count_gpus() if settings.device == "gpu" else 0)
    from worker import context

    context.install(settings)
    from worker.app import app  # built with the installed settings

    argv = ["worker", "--pool", pool, "--concurrency", str(concurrency), "-Q", settings.queue,
            "--loglevel", settings.log_level, "-n", hostname or f"crackq-{os.getpid()}@%h",
            "--without-mingle", "--without-gossip"]
    app.worker_main(argv)
