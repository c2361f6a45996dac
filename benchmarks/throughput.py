"""Throughput of crackq against the obvious alternatives, measured in ONE run on the same images.

    .venv/bin/python benchmarks/throughput.py                 # `make bench`
    .venv/bin/python benchmarks/throughput.py --scaling       # + 1 vs 2 worker processes, 1 thread each
    .venv/bin/python benchmarks/throughput.py --json          # machine-readable (table goes to stderr)

On N real images (default 2,000 from ../shared/data/concrete, balanced over
its class folders, seeded) it measures, each repeated ``--repeats`` times in
turn (a, b, c, d, a, b, c, d, ...: a load change on this shared machine hits
all of them alike) and reports medians:

(a) naive loop: decode + Keras ``model.predict`` one image at a time (on the
    first ``--naive-n`` images only: at ~20 img/s the full set would dominate
    the run; it is a rate, so the subset is comparable);
(b) in-process ceiling: the worker's own ``load_classifier`` + ``ChunkRunner``
    (threaded decode + batched inference + records) on the same chunks, in
    the same number of processes and threads as the service, no queue;
(c) model only: the same classifier on already decoded inputs;
(d) the service end to end: private Redis + local ``crackq worker``
    processes (what ``crackq run`` starts), from submit to the last result
    read back; start-up timed separately and reported both ways.

Then: ratios d/b (queue cost), d/a, b/c (decode cost); peak RSS per worker
process; single-image latency (submit -> result, warm worker, median).
Targets are printed next to the figures; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter would bury the table

from bench_inprocess import CeilingPool, NaiveLoop  # noqa: E402
from bench_service import EmbeddedService  # noqa: E402
from bench_setup import DEFAULT_FOLDER, WorkerConfig, load_average, machine, sample_images  # noqa: E402
from producer.api import plan_chunks  # noqa: E402
from producer.embedded import data_roots_for  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.contract import make_items  # noqa: E402

TARGETS = {"d/b": 0.90, "d/a": 20.0, "scaling": 1.8, "scaling_pinned": 1.8, "latency_ms": 250.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=DEFAULT_FOLDER, help="Images to sample (default ../shared/data/concrete).")
    p.add_argument("--n", type=int, default=2000, help="Images in the sample (default 2000).")
    p.add_argument("--naive-n", type=int, default=200, help="Images for the naive loop (a) (default 200).")
    p.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    p.add_argument("--repeats", type=int, default=3, help="Repetitions of every measurement (median; >= 3).")
    p.add_argument("--backend", choices=["onnx", "tf"], default=None, help="Inference backend (default: setting).")
    p.add_argument("--model", default=None, help="Model .keras (default: the shipped model / CRACKQ_MODEL).")
    p.add_argument("--workers", type=int, default=None,
                   help="Worker processes for (b) and (d) (default: as `crackq run`).")
    p.add_argument("--threads", type=int, default=None,
                   help="Inference threads per process (default: as `crackq worker`, cores / processes).")
    p.add_argument("--batch-size", type=int, default=None, help="Images per forward pass (default: setting).")
    p.add_argument("--chunk-size", type=int, default=None, help="Images per queued chunk (default: setting).")
    p.add_argument("--decode-threads", type=int, default=None, help="Decode threads per process (default: setting).")
    p.add_argument("--latency-n", type=int, default=9, help="Single-image jobs for the latency median.")
    p.add_argument("--scaling", action="store_true",
                   help="Also run the service with 1 and with 2 worker processes, 1 inference thread each: "
                        "as started by `crackq run`, and pinned to one core per process.")
    p.add_argument("--skip-naive", action="store_true", help="Leave out (a) (tuning runs).")
    p.add_argument("--json", action="store_true", help="Print the results as JSON on stdout (table on stderr).")
    return p.parse_args(argv)


def say(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def default_workers(settings: Settings) -> int:
    """``crackq run``'s own default, so `make bench` measures what users get."""
    from producer.runner import default_local_workers

    return default_local_workers(settings)


def median_rate(n: int, seconds: list[float]) -> float:
    return n / statistics.median(seconds)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.repeats < 1 or args.latency_n < 1:
        raise SystemExit("--repeats and --latency-n must be at least 1")
    settings = Settings.load(backend=args.backend, model=args.model, batch_size=args.batch_size,
                             chunk_size=args.chunk_size, decode_threads=args.decode_threads)
    config = WorkerConfig.resolve(settings, args.workers or default_workers(settings), args.threads)
    folder = os.path.normpath(os.path.abspath(args.folder))
    paths = sample_images(folder, args.n, args.seed)
    naive_paths = paths[:min(args.naive_n, len(paths))]
    roots = data_roots_for(paths)
    chunks = plan_chunks(make_items(paths), config.chunk_size)
    report = {"images": len(paths), "folder": folder, "seed": args.seed, "repeats": args.repeats,
              "config": config.to_dict(), "machine": machine(), "load_before": load_average()}
    say(f"{len(paths)} images from {folder}; {config.label()}; load {report['load_before']}")

    services: dict[str, EmbeddedService] = {}
    ceiling = naive = None
    try:
        say("setting up: naive Keras model, ceiling processes, service (private Redis + workers) ...")
        from worker.inference import ModelInfo

        size = ModelInfo.from_model_path(config.model).input_size
        naive = None if args.skip_naive else _naive_loop(config.model, size)
        ceiling = CeilingPool(config, roots)
        ceiling.predecode(paths)
        services["d"] = _start_service(config, roots, paths)
        aliases: dict[str, str] = {}  # a scaling configuration that is the main one is measured once
        if args.scaling:
            for name, procs, pin in (("scale1", 1, False), ("scale2", 2, False), ("pinned1", 1, True),
                                     ("pinned2", 2, True)):
                scaled = WorkerConfig(**{**config.to_dict(), "processes": procs, "threads": 1})
                if scaled == config and not pin:
                    aliases[name] = "d"
                else:
                    services[name] = _start_service(scaled, roots, paths, "pinned" if pin else "pool")
        seconds, cpu = _measure(args, naive, naive_paths, ceiling, chunks, services, paths)
        latencies = [services["d"].latency(p) for p in paths[:args.latency_n]]
    finally:
        rss = {name: service.close() for name, service in services.items()}
        if ceiling:
            ceiling.close()
    for name, same in aliases.items():
        seconds[name], cpu[name], services[name] = seconds[same], cpu[same], services[same]
    report["naive_images"] = len(naive_paths) if naive else 0
    report.update(_results(args, report, seconds, latencies, services, rss, paths, naive_paths))
    report["cpu_ms_per_image"] = {k: round(statistics.median(v), 2) for k, v in cpu.items() if v}
    report["load_after"] = load_average()
    table = format_table(report)
    say(table)
    if args.json:
        print(json.dumps(report, indent=2))
    return report


def _naive_loop(model: str, size: int) -> NaiveLoop | None:
    """(a) needs TensorFlow/Keras, which a serving-only install (ONNX Runtime) does not have."""
    try:
        return NaiveLoop(model, size)
    except ImportError as exc:
        say(f"  (a) left out: {exc} (install the `cpu` extra for TensorFlow)")
        return None


def _start_service(config: WorkerConfig, roots: list[str], paths: list[str], layout: str = "pool"
                   ) -> EmbeddedService:
    service = EmbeddedService(config, roots, layout=layout).start()
    say(f"  service {config.processes}x{config.threads} ({layout}) ready after {service.startup_seconds:.1f}s")
    service.run_job(paths[:max(config.batch_size, 2 * config.processes * config.chunk_size)])  # warm-up
    return service


def _measure(args, naive, naive_paths, ceiling, chunks, services, paths) -> tuple[dict, dict]:
    """Every measurement once per round, rounds repeated: noise from other load hits all alike.

    Besides wall seconds, the CPU seconds (user + system, all threads) of the
    processes doing the work: CPU per image is the cost that limits throughput
    (cores / CPU per image) and is much less disturbed by other load.
    """
    seconds: dict[str, list[float]] = {k: [] for k in ("a", "b", "c", *services)}
    cpu: dict[str, list[float]] = {k: [] for k in seconds}
    me = psutil.Process()

    def timed(key: str, n: int, run, cpu_now) -> None:
        before = cpu_now()
        seconds[key].append(run())
        cpu[key].append((cpu_now() - before) / n * 1000)

    for round_ in range(args.repeats):
        if naive:
            timed("a", len(naive_paths), lambda: naive.run(naive_paths), lambda: sum(me.cpu_times()[:2]))
        timed("b", len(paths), lambda: ceiling.run_chunks(chunks), ceiling.cpu_seconds)
        timed("c", len(paths), ceiling.run_model, ceiling.cpu_seconds)
        for name, service in services.items():
            timed(name, len(paths), lambda: service.run_job(paths)[0], service.cpu_seconds)
        say(f"  round {round_ + 1}/{args.repeats}: " + ", ".join(
            f"{k} {(len(naive_paths) if k == 'a' else len(paths)) / v[-1]:.1f}" for k, v in seconds.items() if v)
            + " img/s")
    return seconds, cpu


def _results(args, report, seconds, latencies, services, rss, paths, naive_paths) -> dict:
    n = len(paths)
    rates = {k: median_rate(len(naive_paths) if k == "a" else n, v) for k, v in seconds.items() if v}
    d = services["d"]
    run_seconds = statistics.median(seconds["d"])
    out = {
        "seconds": seconds,
        "img_per_s": {k: round(v, 1) for k, v in rates.items()},
        "startup_seconds": {k: round(s.startup_seconds, 2) for k, s in services.items()},
        "service_incl_startup_img_per_s": round(n / (d.startup_seconds + run_seconds), 1),
        "ratios": {"d/b": rates["d"] / rates["b"], "b/c": rates["b"] / rates["c"]},
        "latency_ms": {"median": statistics.median(latencies) * 1000, "all": [x * 1000 for x in latencies]},
        "rss_mib": rss,
    }
    if "a" in rates:
        out["ratios"]["d/a"] = rates["d"] / rates["a"]
    if "scale1" in rates:
        out["ratios"]["scaling"] = rates["scale2"] / rates["scale1"]
        out["ratios"]["scaling_pinned"] = rates["pinned2"] / rates["pinned1"]
    out["ratios"] = {k: round(v, 3) for k, v in out["ratios"].items()}
    out["targets"] = {k: {"target": t, "measured": _measured(out, k), "met": _met(out, k, t)}
                      for k, t in TARGETS.items() if _measured(out, k) is not None}
    return out


def _measured(out: dict, key: str):
    return round(out["latency_ms"]["median"], 1) if key == "latency_ms" else out["ratios"].get(key)


def _met(out: dict, key: str, target: float) -> bool:
    value = _measured(out, key)
    return value < target if key == "latency_ms" else value >= target


def format_table(r: dict) -> str:
    rate, cpu, m, cfg = r["img_per_s"], r.get("cpu_ms_per_image", {}), r["machine"], r["config"]

    def row(label: str, value: float, key: str | None = None) -> str:
        per_image = f"{cpu[key]:>10.2f}" if key in cpu else " " * 10
        return f"{label:<64}{value:>9.1f}{per_image}"

    lines = [
        f"crackq throughput: {r['images']} images from {r['folder']} (seed {r['seed']}), "
        f"median of {r['repeats']} round(s)",
        f"machine: {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM; "
        f"load average before {r['load_before']}, after {r['load_after']}",
        f"config: {cfg['processes']} worker process(es) x {cfg['threads']} inference thread(s), "
        f"batch {cfg['batch_size']}, chunk {cfg['chunk_size']}, decode threads {cfg['decode_threads']}, "
        f"backend {cfg['backend']}, model {os.path.basename(cfg['model'])}",
        "",
        f"{'measurement':<64}{'img/s':>9}{'CPU ms/img':>11}",
    ]
    if "a" in rate:
        lines.append(row(f"(a) naive: decode + Keras model.predict per image ({r['naive_images']} images)",
                         rate["a"], "a"))
    lines += [
        row("(b) in-process ceiling: worker decode + batched inference", rate["b"], "b"),
        row("(c) model only, pre-decoded batches", rate["c"], "c"),
        row("(d) service: submit -> last result (warm workers)", rate["d"], "d"),
        row(f"    same, including start-up ({r['startup_seconds']['d']:.1f} s: Redis + workers)",
            r["service_incl_startup_img_per_s"]),
    ]
    if "scale1" in rate:
        lines += [row("(d) 1 worker process x 1 inference thread", rate["scale1"], "scale1"),
                  row("(d) 2 worker processes x 1 inference thread", rate["scale2"], "scale2"),
                  row("(d) 1 worker process pinned to 1 core", rate["pinned1"], "pinned1"),
                  row("(d) 2 worker processes pinned to 1 core each", rate["pinned2"], "pinned2")]
    lines += ["", "ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items()),
              f"single-image latency (warm): median {r['latency_ms']['median']:.0f} ms "
              f"(of {len(r['latency_ms']['all'])})",
              "peak RSS (MiB): " + "; ".join(
                  f"{k}: pool process(es) {v.get('pool_processes_mib')}, main {v.get('main_process_mib')}"
                  for k, v in r["rss_mib"].items()),
              "", "targets:"]
    for key, t in r["targets"].items():
        op = "<" if key == "latency_ms" else ">="
        lines.append(f"  {key:<15} {t['measured']:>8} {op} {t['target']:<6} {'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
