"""A whole worker lost mid-job: how long until the job completes, and is every result right?

The scenario of issue 13: N real patches on 2 workers (separate ``crackq
worker`` process groups, private Redis); at 20 % one worker's whole process
group gets SIGKILL and never comes back.  Before leases the job stopped just
short of N for the visibility timeout (an hour); now the survivor recovers the
lost chunk once its lease runs out.  Prints the time from the kill until the
lost chunk is back on the queue and until the job's completion, the record
count, and the comparison with an undisturbed run of the same images on the
same workers (labels and probabilities).

    .venv/bin/python -m benchmarks.lost_worker                 # 4,000 patches, default lease (30 s)
    .venv/bin/python -m benchmarks.lost_worker --images 1000 --lease 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import time

from benchmarks.common import CONCRETE
from producer.api import Client
from producer.embedded import local_workers, private_redis
from shared.config import Settings


def patches(count: int) -> list[str]:
    per_class = (count + 1) // 2
    folders = [sorted(os.listdir(CONCRETE / name))[:per_class] for name in ("Positive", "Negative")]
    mixed = [str(CONCRETE / name / f) for pair in zip(*folders) for name, f in zip(("Positive", "Negative"), pair)]
    return mixed[:count]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--lease", type=int, default=Settings().lease_seconds)
    parser.add_argument("--at", type=float, default=0.2, help="fraction done when the worker is killed")
    args = parser.parse_args(argv)
    paths = patches(args.images)
    env = {"CRACKQ_LEASE_SECONDS": str(args.lease), "CRACKQ_THREADS": "1"}
    logs = tempfile.mkdtemp(prefix="crackq-lost-worker-")
    with private_redis() as url:
        with local_workers(url, 1, [str(CONCRETE)], env=env, log_path=f"{logs}/victim.log") as victim, \
                local_workers(url, 1, [str(CONCRETE)], env=env, log_path=f"{logs}/survivor.log"):
            # The client's own recovery waits 10 leases: the recovery measured is the surviving worker's.
            client = Client(Settings.load(redis_url=url, chunk_size=16, lease_seconds=10 * args.lease))
            start = time.monotonic()
            undisturbed_id = client.submit(paths)
            client.wait(undisturbed_id, timeout=3600)
            undisturbed_s = time.monotonic() - start
            undisturbed = list(client.results(undisturbed_id))

            job_id = client.submit(paths)
            while client.status(job_id).done < args.at * len(paths):
                time.sleep(0.05)
            held = set(client.redis.hkeys("unacked"))  # both workers' chunks in hand at the kill
            os.killpg(victim.pid, signal.SIGKILL)
            killed = time.monotonic()
            while held & set(client.redis.hkeys("unacked")):  # the survivor acks its own in < 1 s
                time.sleep(0.1)
            back_on_queue = time.monotonic() - killed
            status = client.wait(job_id, timeout=3600)
            after_kill = time.monotonic() - killed
            records = list(client.results(job_id))
    same = sum(a["path"] == b["path"] and a["label"] == b["label"]
               and math.isclose(a["crack_probability"], b["crack_probability"], abs_tol=1e-5)
               for a, b in zip(undisturbed, records))
    report = {"images": len(paths), "lease_seconds": args.lease, "visibility_timeout": Settings().visibility_timeout,
              "killed_at_fraction": args.at, "state": status.state, "records": len(records),
              "errors": sum(1 for r in records if r["error"]), "equal_to_undisturbed": same,
              "seconds_from_kill_to_lost_chunk_requeued": round(back_on_queue, 1),
              "seconds_from_kill_to_done": round(after_kill, 1), "undisturbed_job_seconds": round(undisturbed_s, 1)}
    print(json.dumps(report, indent=2))
    return 0 if status.state == "done" and same == len(paths) == len(records) else 1


if __name__ == "__main__":
    sys.exit(main())
