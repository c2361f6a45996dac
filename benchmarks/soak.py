"""Soak: ≥ 20,000 images through the service while Redis memory is sampled; it must stay bounded.

    .venv/bin/python -m benchmarks.soak                    # `make soak`: 20,000 images, 5 jobs, TTL 60 s
    .venv/bin/python -m benchmarks.soak --images 40000 --jobs 10 --ttl 90
    .venv/bin/python -m benchmarks.soak --json             # machine-readable (the table goes to stderr)

A private Redis (loopback, random password) and local ``crackq worker``
processes are started, exactly as ``crackq run`` does.  The images are the
real patches of ``../shared/data/concrete`` (16,000), then the same files
again from the top until ``--images`` is reached (a repeated path is a new
image of the job).  They go through as ``--jobs`` jobs, one after the other,
with a short ``CRACKQ_RESULT_TTL``: a finished job's results live ``--ttl``
seconds, so Redis holds only the last few jobs however many have run.  After
the last job the run keeps sampling for the TTL plus a margin, to show the
memory drop back to where it started.

Redis ``INFO memory`` (used_memory, used_memory_rss) and the number of job
keys are sampled every ``--every`` seconds.  Every job is checked for exactly
one record per image before it expires.  Nothing here asserts a figure: the
table and the summary are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from contextlib import ExitStack

from benchmarks.common import CONCRETE
from producer.api import Client
from producer.embedded import local_workers, private_redis
from shared.config import Settings

DEFAULT_FOLDER = str(CONCRETE)
MB = 1024 * 1024


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=DEFAULT_FOLDER,
                   help="Images (searched recursively; default ../shared/data/concrete).")
    p.add_argument("--images", type=int, default=20_000, help="Images in all (files repeat when needed).")
    p.add_argument("--jobs", type=int, default=5, help="Jobs the images are split into, run one after another.")
    p.add_argument("--ttl", type=int, default=60, help="CRACKQ_RESULT_TTL of the run, seconds.")
    p.add_argument("--workers", type=int, default=2, help="Worker processes (one thread each).")
    p.add_argument("--chunk-size", type=int, default=64, help="Images per chunk.")
    p.add_argument("--every", type=float, default=2.0, help="Seconds between memory samples.")
    p.add_argument("--settle", type=float, default=15.0, help="Extra seconds sampled after the TTL has passed.")
    p.add_argument("--json", action="store_true", help="Print the samples and summary as JSON on stdout.")
    return p.parse_args(argv)


def image_paths(folder: str, count: int) -> list[str]:
    """Every image under ``folder`` (sorted), then the same list again until ``count`` paths."""
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if name.lower().endswith((".jpg", ".jpeg", ".png")))
    if not files:
        raise SystemExit(f"no images under {folder}")
    return [files[i % len(files)] for i in range(count)]


class Sampler(threading.Thread):
    """Samples Redis memory and the job keys every ``every`` seconds, tagged with the current phase."""

    def __init__(self, client, every: float):
        super().__init__(daemon=True)
        self.client, self.every = client, every
        self.phase = "idle"
        self.samples: list[dict] = []
        self.start_time = time.monotonic()
        self._halt = threading.Event()

    def sample(self) -> dict:
        info = self.client.info("memory")
        row = {"t": round(time.monotonic() - self.start_time, 1), "phase": self.phase,
               "used_mb": round(info["used_memory"] / MB, 2), "rss_mb": round(info["used_memory_rss"] / MB, 2),
               "dataset_mb": round(info["used_memory_dataset"] / MB, 2),
               "clients_mb": round(info.get("mem_clients_normal", 0) / MB, 2), "keys": self.client.dbsize(),
               "job_keys": sum(1 for _ in self.client.scan_iter("crackq:job:*", count=1000)),
               "results": sum(self.client.hlen(k) for k in self.client.scan_iter("crackq:job:*:results"))}
        self.samples.append(row)
        return row

    def run(self) -> None:
        while not self._halt.wait(self.every):
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - a missed sample is reported, not fatal
                print(f"sample failed: {exc}", file=sys.stderr)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def wait_for_workers(log: str, processes: int, timeout: float = 300) -> None:
    """Until the worker's log says it is consuming and every pool process has loaded the model."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = open(log, errors="replace").read() if os.path.exists(log) else ""
        if " ready." in text and text.count("worker process") >= processes:
            return
        time.sleep(0.5)
    raise SystemExit(f"workers not ready after {timeout:g}s (see {log})")


def soak(args: argparse.Namespace) -> dict:
    paths = image_paths(args.folder, args.images)
    per_job = -(-len(paths) // args.jobs)
    jobs = [paths[i:i + per_job] for i in range(0, len(paths), per_job)]
    env = {"CRACKQ_RESULT_TTL": str(args.ttl), "CRACKQ_THREADS": "1"}
    log = os.path.join(tempfile.gettempdir(), f"crackq-soak-workers-{os.getpid()}.log")
    with ExitStack() as stack:
        url = stack.enter_context(private_redis())
        settings = Settings.load(redis_url=url, result_ttl=args.ttl, chunk_size=args.chunk_size)
        client = Client(settings)
        redis = client.redis
        sampler = Sampler(redis, args.every)
        stack.enter_context(local_workers(url, args.workers, [os.path.abspath(args.folder)], env=env, log_path=log))
        wait_for_workers(log, args.workers)
        baseline = sampler.sample()  # Redis with the workers connected, before any job
        sampler.start()
        job_rows, start = [], time.monotonic()
        for n, job_paths in enumerate(jobs, 1):
            sampler.phase = f"job {n}/{len(jobs)}"
            t0 = time.monotonic()
            job_id = client.submit(job_paths)
            status = client.wait(job_id, timeout=3600, poll=0.5)
            records = redis.hlen(f"crackq:job:{job_id}:results")
            peak = max((s["used_mb"] for s in sampler.samples if s["phase"] == sampler.phase), default=None)
            job_rows.append({"job": n, "images": len(job_paths), "state": status.state, "records": records,
                             "errors": status.failed, "seconds": round(time.monotonic() - t0, 1),
                             "images_per_second": round(len(job_paths) / (time.monotonic() - t0), 1),
                             "peak_used_mb": peak})
        seconds = time.monotonic() - start
        sampler.phase = "after the last job"
        last_write = time.monotonic()
        while time.monotonic() - last_write < args.ttl + args.settle:
            time.sleep(1)
        sampler.stop()
        final = sampler.sample()
    during = [s for s in sampler.samples if s["phase"].startswith("job")]
    summary = {
        "images": len(paths), "distinct_files": len(set(paths)), "jobs": len(jobs), "ttl_s": args.ttl,
        "workers": args.workers, "chunk_size": args.chunk_size, "seconds": round(seconds, 1),
        "images_per_second": round(len(paths) / seconds, 1),
        "all_jobs_done_with_one_record_per_image": all(j["state"] == "done" and j["records"] == j["images"]
                                                       for j in job_rows),
        "baseline_used_mb": baseline["used_mb"], "peak_used_mb": max(s["used_mb"] for s in during),
        "baseline_dataset_mb": baseline["dataset_mb"], "peak_dataset_mb": max(s["dataset_mb"] for s in during),
        "final_dataset_mb": final["dataset_mb"], "final_keys": final["keys"],
        "peak_job_keys": max(s["job_keys"] for s in during), "final_used_mb": final["used_mb"],
        "final_job_keys": final["job_keys"], "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
    }
    return {"summary": summary, "jobs": job_rows, "samples": sampler.samples}


def print_report(result: dict, out) -> None:
    print(f"{'t (s)':>7}  {'phase':<20} {'used MB':>8} {'dataset MB':>10} {'clients MB':>10} {'rss MB':>7} "
          f"{'keys':>5} {'job keys':>8} {'results':>8}", file=out)
    for s in result["samples"]:
        print(f"{s['t']:>7}  {s['phase']:<20} {s['used_mb']:>8} {s['dataset_mb']:>10} {s['clients_mb']:>10} "
              f"{s['rss_mb']:>7} {s['keys']:>5} {s['job_keys']:>8} {s['results']:>8}", file=out)
    print("\njob  images  state  records  errors  seconds  img/s  peak used MB", file=out)
    for j in result["jobs"]:
        print(f"{j['job']:>3}  {j['images']:>6}  {j['state']:<5}  {j['records']:>7}  {j['errors']:>6}  "
              f"{j['seconds']:>7}  {j['images_per_second']:>5}  {j['peak_used_mb']}", file=out)
    print("", file=out)
    for key, value in result["summary"].items():
        print(f"{key:>40}: {value}", file=out)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = soak(args)
    print_report(result, sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
