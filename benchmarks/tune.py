"""Tune CPU workers: processes × inference threads × batch × chunk (× decode threads), measured together.

    .venv/bin/python -m benchmarks.tune                       # the grid in docs/performance.md
    .venv/bin/python -m benchmarks.tune --grid 2x1:16:64 1x2:16:64 --n 1000

Each configuration gets its in-process ceiling (b) and its service (d: private
Redis + ``crackq worker``), all kept up at once; every round measures each of
them in turn, so a change in the machine's load hits all configurations alike.
Besides images/second it reports CPU seconds per image (all processes of the
configuration, user + system): it is far less sensitive to other load on a
shared machine than wall time, and on a CPU-bound service it is what limits
throughput (``cores / cpu_per_image``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


from benchmarks.bench_inprocess import CeilingPool
from benchmarks.bench_service import EmbeddedService
from benchmarks.bench_setup import DEFAULT_FOLDER, WorkerConfig, load_average, machine, sample_images
from producer.api import plan_chunks
from producer.embedded import data_roots_for
from shared.config import Settings
from shared.contract import make_items

#: processes x threads : batch : chunk [: decode threads [: layout (pool, separate, pinned)]]
DEFAULT_GRID = ["1x2:32:64", "1x2:8:64", "1x1:8:64", "2x1:8:64", "2x1:16:64", "2x1:32:64", "2x1:8:32", "2x1:8:128",
                "2x1:8:64:1"]


def parse_spec(spec: str, base: Settings) -> WorkerConfig:
    parts = spec.split(":")
    procs, threads = (int(x) for x in parts[0].split("x"))
    settings = base.replace(batch_size=int(parts[1]), chunk_size=int(parts[2]),
                            decode_threads=int(parts[3]) if len(parts) > 3 and parts[3] else None)
    return WorkerConfig.resolve(settings, procs, threads)


def layout_of(spec: str) -> str:
    parts = spec.split(":")
    return parts[4] if len(parts) > 4 else "pool"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", nargs="+", default=DEFAULT_GRID,
                   help="PROCSxTHREADS:BATCH:CHUNK[:DECODE[:LAYOUT]] ...")
    p.add_argument("--folder", default=DEFAULT_FOLDER)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", choices=["onnx", "tf"], default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--no-ceiling", action="store_true", help="Measure the services only.")
    p.add_argument("--json", default=None, help="Also write the results to this file.")
    args = p.parse_args(argv)
    base = Settings.load(backend=args.backend, model=args.model)
    configs = [parse_spec(s, base) for s in args.grid]
    paths = sample_images(os.path.abspath(args.folder), args.n)
    roots = data_roots_for(paths)
    load_before = load_average()
    print(f"{len(paths)} images; load {load_before}", file=sys.stderr)
    rows = {spec: {"b": [], "d": [], "b_cpu": [], "d_cpu": []} for spec in args.grid}
    ceilings, services = {}, {}
    try:
        for spec, config in zip(args.grid, configs):
            if not args.no_ceiling:
                ceilings[spec] = CeilingPool(config, roots)
            services[spec] = EmbeddedService(config, roots, layout=layout_of(spec)).start()
            services[spec].run_job(paths[:2 * config.processes * config.chunk_size])
        for round_ in range(args.repeats):
            for spec, config in zip(args.grid, configs):
                chunks = plan_chunks(make_items(paths), config.chunk_size)
                if spec in ceilings:
                    cpu = ceilings[spec].cpu_seconds()
                    rows[spec]["b"].append(len(paths) / ceilings[spec].run_chunks(chunks))
                    rows[spec]["b_cpu"].append((ceilings[spec].cpu_seconds() - cpu) / len(paths) * 1000)
                cpu = services[spec].cpu_seconds()
                rows[spec]["d"].append(len(paths) / services[spec].run_job(paths)[0])
                rows[spec]["d_cpu"].append((services[spec].cpu_seconds() - cpu) / len(paths) * 1000)
                print(f"  round {round_ + 1} {spec}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rows[spec].items()
                                                                   if v), file=sys.stderr)
    finally:
        rss = {spec: s.close() for spec, s in services.items()}
        for c in ceilings.values():
            c.close()
    med = {spec: {k: statistics.median(v) if v else None for k, v in r.items()} for spec, r in rows.items()}
    print(f"load average before {load_before}, after {load_average()}; {len(paths)} images, "
          f"median of {args.repeats}")
    print("| processes x threads | layout | batch | chunk | decode threads | (b) ceiling img/s | (d) service img/s "
          "| d/b | CPU ms/img (b) | CPU ms/img (d) | peak RSS/process MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for spec, config in zip(args.grid, configs):
        m = med[spec]
        b = f"{m['b']:.0f}" if m["b"] else "-"
        ratio = f"{m['d'] / m['b']:.2f}" if m["b"] else "-"
        bcpu = f"{m['b_cpu']:.2f}" if m["b_cpu"] else "-"
        print(f"| {config.processes} x {config.threads} | {layout_of(spec)} | {config.batch_size} | "
              f"{config.chunk_size} | {config.decode_threads} | {b} | {m['d']:.0f} | {ratio} | {bcpu} | "
              f"{m['d_cpu']:.2f} | "
              f"{rss[spec].get('max_pool_process_mib')} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "rows": rows, "rss": rss,
                       "configs": {s: c.to_dict() for s, c in zip(args.grid, configs)}}, fh, indent=2)


if __name__ == "__main__":
    main()
