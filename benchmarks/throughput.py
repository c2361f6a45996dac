"""Throughput of crackq against the obvious alternatives, measured in ONE run on the same images.

    .venv/bin/python -m benchmarks.throughput                 # `make bench`
    .venv/bin/python -m benchmarks.throughput --scaling       # + 1 vs 2 worker processes, 1 thread each
    .venv/bin/python -m benchmarks.throughput --json          # machine-readable (table goes to stderr)
    .venv/bin/python -m benchmarks.throughput --photos 0 --precision fp32 --no-fp32   # the FP32 path alone

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

(b), (c) and (d) run in INT8 and in FP32 side by side (issue 15) when the
model has a servable INT8 export (``crackq export --int8``), whether or not
INT8 is the workers' default; ``d/b_fp32`` is the service in INT8 against the
in-process FP32 loop.  ``--photos N`` 4000×3000 photos made of real held-out
patches go through each precision's service too (MP/s), and the held-out test
split through each service gives its accuracy (``--no-accuracy`` to skip).
Every rate is also given per core.

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
import tempfile
from dataclasses import replace
from pathlib import Path

import psutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter would bury the table

from benchmarks.bench_inprocess import CeilingPool, NaiveLoop
from benchmarks.bench_service import EmbeddedService
from benchmarks.bench_setup import DEFAULT_FOLDER, WorkerConfig, load_average, machine, sample_images
from producer.api import plan_chunks
from producer.embedded import data_roots_for
from shared.config import Settings
from shared.contract import make_items

TARGETS = {"d/b": 0.90, "d/a": 20.0, "scaling": 1.8, "scaling_pinned": 1.8, "latency_ms": 250.0,
           "d/b_fp32": 1.5, "photos/photos_fp32": 1.5}


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
    p.add_argument("--precision", choices=["int8", "fp32"], default=None,
                   help="Precision of (b), (c), (d) (default: as workers pick it: int8 on CPU when the gated INT8 "
                        "model is there). When it is int8, (b), (c), (d) are also measured in fp32, side by side.")
    p.add_argument("--no-fp32", action="store_true", help="Do not measure the fp32 side by side.")
    p.add_argument("--photos", type=int, default=3,
                   help="4000x3000 photos (made from real test-split patches) measured through the service, "
                        "in MP/s, per precision (0: none; default 3).")
    p.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True,
                   help="Accuracy of every precision's service on the model's held-out test split (default on).")
    p.add_argument("--json", action="store_true", help="Print the results as JSON on stdout (table on stderr).")
    return p.parse_args(argv)


def say(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def default_workers(settings: Settings) -> int:
    """``crackq run``'s own default, so `make bench` measures what users get."""
    from producer.runner import default_local_workers

    return default_local_workers(settings)


def _default_precision(settings: Settings) -> str:
    from shared.inference import resolve_precision

    return resolve_precision(settings)[0] if settings.backend == "onnx" else "fp32"


def _int8_servable(model: str) -> bool:
    from shared.inference import int8_problem

    return int8_problem(model) is None


def median_rate(n: int, seconds: list[float]) -> float:
    return n / statistics.median(seconds)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.repeats < 1 or args.latency_n < 1:
        raise SystemExit("--repeats and --latency-n must be at least 1")
    settings = Settings.load(backend=args.backend, model=args.model, batch_size=args.batch_size,
                             chunk_size=args.chunk_size, decode_threads=args.decode_threads, precision=args.precision)
    default_precision = _default_precision(settings)
    if args.precision is None and settings.backend == "onnx" and _int8_servable(settings.model):
        settings = settings.replace(precision="int8")  # INT8 measured (beside FP32) whether or not it is the default
    config = WorkerConfig.resolve(settings, args.workers or default_workers(settings), args.threads)
    folder = os.path.normpath(os.path.abspath(args.folder))
    paths = sample_images(folder, args.n, args.seed)
    naive_paths = paths[:min(args.naive_n, len(paths))]
    roots = data_roots_for(paths)
    chunks = plan_chunks(make_items(paths), config.chunk_size)
    report = {"images": len(paths), "folder": folder, "seed": args.seed, "repeats": args.repeats,
              "config": config.to_dict(), "machine": machine(), "load_before": load_average(),
              "default_precision": default_precision}
    say(f"{len(paths)} images from {folder}; {config.label()}; load {report['load_before']}")

    # Side by side: the same measurements in FP32 when the main precision is INT8 (keys suffixed ":fp32").
    side = {} if args.no_fp32 or config.precision == "fp32" else {":fp32": replace(config, precision="fp32")}
    report["precisions"] = {"": config.precision, **{k: c.precision for k, c in side.items()}}
    photos_dir = tempfile.TemporaryDirectory(prefix="crackq-bench-photos-") if args.photos else None
    photos = _make_photos(Path(photos_dir.name), args.photos, folder) if photos_dir else []
    roots = data_roots_for(paths + [str(p) for p in photos])
    services: dict[str, EmbeddedService] = {}
    ceilings: dict[str, CeilingPool] = {}
    naive = None
    try:
        say("setting up: naive Keras model, ceiling processes, service (private Redis + workers) ...")
        from shared.inference import ModelInfo

        size = ModelInfo.from_model_path(config.model).input_size
        naive = None if args.skip_naive else _naive_loop(config.model, size)
        for suffix, cfg in {"": config, **side}.items():
            ceilings[suffix] = CeilingPool(cfg, roots)
            ceilings[suffix].predecode(paths)
            services["d" + suffix] = _start_service(cfg, roots, paths)
        aliases: dict[str, str] = {}  # a scaling configuration that is the main one is measured once
        if args.scaling:
            for name, procs, pin in (("scale1", 1, False), ("scale2", 2, False), ("pinned1", 1, True),
                                     ("pinned2", 2, True)):
                scaled = WorkerConfig(**{**config.to_dict(), "processes": procs, "threads": 1})
                if scaled == config and not pin:
                    aliases[name] = "d"
                else:
                    services[name] = _start_service(scaled, roots, paths, "pinned" if pin else "pool")
        seconds, cpu = _measure(args, naive, naive_paths, ceilings, chunks, services, paths, photos)
        latencies = [services["d"].latency(p) for p in paths[:args.latency_n]]
        if args.accuracy:
            report["accuracy"] = _accuracy(services, config.model, folder)
    finally:
        rss = {name: service.close() for name, service in services.items()}
        for pool in ceilings.values():
            pool.close()
        if photos_dir:
            photos_dir.cleanup()
    report["photos"] = {"n": len(photos), "megapixels": len(photos) * 12.0}
    for name, same in aliases.items():
        seconds[name], cpu[name], services[name] = seconds[same], cpu[same], services[same]
    report["naive_images"] = len(naive_paths) if naive else 0
    report.update(_results(args, report, seconds, latencies, services, rss, paths, naive_paths))
    report["cpu_ms_per_image"] = {k: round(statistics.median(v), 2) for k, v in cpu.items() if v}
    report["cpu_ratios"] = _cpu_ratios(report["cpu_ms_per_image"])
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


def _make_photos(folder: Path, n: int, concrete: str) -> list[Path]:
    """``n`` 4000x3000 JPEGs made of real held-out patches (as benchmarks.bigphotos makes them)."""
    from benchmarks.bigphotos import make_photos

    say(f"making {n} 4000x3000 photos from real patches ...")
    return make_photos(folder, n, Path(concrete))[0]


def _accuracy(services: dict, model: str, folder: str) -> dict:
    """Accuracy of each precision's service on the model's held-out TEST split (and FP32/INT8 agreement)."""
    split = Path(model).with_name("split.json")
    if not split.exists():
        return {}
    files = json.loads(split.read_text())["files"]["test"]
    paths = [os.path.join(folder, f) for f in files]
    truth = {p: f.startswith("Positive/") for p, f in zip(paths, files)}
    out, crack = {}, {}
    for name in [k for k in services if k == "d" or k.startswith("d:")]:
        records = services[name].run_job(paths)[1]
        crack[name] = {r["path"]: r["label"] == "crack" for r in records}
        out[name] = {"n": len(records), "accuracy": sum(crack[name][p] == truth[p] for p in paths) / len(paths)}
    if "d:fp32" in crack:
        out["label_agreement"] = sum(crack["d"][p] == crack["d:fp32"][p] for p in paths) / len(paths)
        out["points"] = 100 * (out["d"]["accuracy"] - out["d:fp32"]["accuracy"])
    return out


def _measure(args, naive, naive_paths, ceilings, chunks, services, paths, photos) -> tuple[dict, dict]:
    """Every measurement once per round, rounds repeated: noise from other load hits all alike.

    Besides wall seconds, the CPU seconds (user + system, all threads) of the
    processes doing the work: CPU per image is the cost that limits throughput
    (cores / CPU per image) and is much less disturbed by other load.
    """
    keys = ["a"] + [f"{m}{suffix}" for suffix in ceilings for m in ("b", "c")] + list(services)
    keys += [f"photos{k[1:]}" for k in services if photos and (k == "d" or k.startswith("d:"))]
    seconds: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in seconds}
    me = psutil.Process()

    def timed(key: str, n: int, run, cpu_now) -> None:
        before = cpu_now()
        seconds[key].append(run())
        cpu[key].append((cpu_now() - before) / n * 1000)

    for round_ in range(args.repeats):
        if naive:
            timed("a", len(naive_paths), lambda: naive.run(naive_paths), lambda: sum(me.cpu_times()[:2]))
        for suffix, ceiling in ceilings.items():
            timed("b" + suffix, len(paths), lambda: ceiling.run_chunks(chunks), ceiling.cpu_seconds)
            timed("c" + suffix, len(paths), ceiling.run_model, ceiling.cpu_seconds)
        for name, service in services.items():
            timed(name, len(paths), lambda: service.run_job(paths)[0], service.cpu_seconds)
        for name in [k for k in seconds if k.startswith("photos")]:
            service = services["d" + name[len("photos"):]]
            timed(name, len(photos), lambda: service.run_job([str(p) for p in photos])[0], service.cpu_seconds)
        say(f"  round {round_ + 1}/{args.repeats}: " + ", ".join(
            f"{k} {_count(k, naive_paths, paths, photos) / v[-1]:.1f}" for k, v in seconds.items() if v)
            + " img/s (photos: photos/s)")
    return seconds, cpu


def _cpu_ratios(cpu: dict) -> dict:
    """The same comparisons in CPU per image (cores / CPU per image bounds throughput): on a loaded,
    shared machine these move much less than wall-clock rates."""
    pairs = {"b_fp32/d": ("b:fp32", "d"), "d_fp32/d": ("d:fp32", "d"), "c_fp32/c": ("c:fp32", "c"),
             "photos_fp32/photos": ("photos:fp32", "photos")}
    return {k: round(cpu[a] / cpu[b], 3) for k, (a, b) in pairs.items() if cpu.get(a) and cpu.get(b)}


def _count(key: str, naive_paths, paths, photos) -> int:
    return len(naive_paths) if key == "a" else len(photos) if key.startswith("photos") else len(paths)


def _results(args, report, seconds, latencies, services, rss, paths, naive_paths) -> dict:
    n = len(paths)
    n_photos = report.get("photos", {}).get("n", 0)
    rates = {k: median_rate(len(naive_paths) if k == "a" else n_photos if k.startswith("photos") else n, v)
             for k, v in seconds.items() if v}
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
    if "b:fp32" in rates:
        out["ratios"]["d/b_fp32"] = rates["d"] / rates["b:fp32"]
        out["ratios"]["c/c_fp32"] = rates["c"] / rates["c:fp32"]
        out["ratios"]["d/d_fp32"] = rates["d"] / rates["d:fp32"]
    if "photos:fp32" in rates:
        out["ratios"]["photos/photos_fp32"] = rates["photos"] / rates["photos:fp32"]
    if "photos" in rates:
        out["megapixels_per_s"] = {k: round(v * 12.0, 2) for k, v in rates.items() if k.startswith("photos")}
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
    cores = m["nproc"] or 1
    main_p = r["precisions"][""]

    def row(label: str, key: str | None, value: float | None = None, used: int | None = None) -> str:
        value = rate[key] if value is None else value
        per_core = value / min(cores, used or cfg["processes"] * cfg["threads"])
        per_image = f"{cpu[key]:>10.2f}" if key in cpu else " " * 10
        return f"{label:<70}{value:>9.1f}{per_core:>11.1f}{per_image}"

    lines = [
        f"crackq throughput: {r['images']} images from {r['folder']} (seed {r['seed']}), "
        f"median of {r['repeats']} round(s)",
        f"machine: {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM; "
        f"load average before {r['load_before']}, after {r['load_after']} (shared machine: compare ratios)",
        f"config: {cfg['processes']} worker process(es) x {cfg['threads']} inference thread(s), "
        f"batch {cfg['batch_size']}, chunk {cfg['chunk_size']}, decode threads {cfg['decode_threads']}, "
        f"backend {cfg['backend']}, model {os.path.basename(cfg['model'])}; precision CPU workers pick by "
        f"default: {r.get('default_precision')}",
        "",
        f"{'measurement':<70}{'img/s':>9}{'img/s/core':>11}{'CPU ms/img':>11}",
    ]
    if "a" in rate:
        lines.append(row(f"(a) naive: decode + Keras model.predict per image ({r['naive_images']} images)",
                         "a", used=cores))
    for suffix, precision in r["precisions"].items():
        lines += [
            row(f"(b) {precision}: in-process ceiling: worker decode + batched inference", "b" + suffix),
            row(f"(c) {precision}: model only, pre-decoded batches", "c" + suffix),
            row(f"(d) {precision}: service: submit -> last result (warm workers)", "d" + suffix),
        ]
    lines.append(row(f"    ({main_p}) same, including start-up ({r['startup_seconds']['d']:.1f} s: Redis + workers)",
                     None, r["service_incl_startup_img_per_s"]))
    if "scale1" in rate:
        lines += [row(f"(d) {main_p}: 1 worker process x 1 inference thread", "scale1", used=1),
                  row(f"(d) {main_p}: 2 worker processes x 1 inference thread", "scale2", used=2),
                  row(f"(d) {main_p}: 1 worker process pinned to 1 core", "pinned1", used=1),
                  row(f"(d) {main_p}: 2 worker processes pinned to 1 core each", "pinned2", used=2)]
    if r.get("megapixels_per_s"):
        lines += ["", f"4000x3000 photos ({r['photos']['n']} per round, made of real held-out patches), "
                      "through the service:",
                  f"{'':<70}{'MP/s':>9}{'MP/s/core':>11}{'CPU ms/MP':>11}"]
        for suffix, precision in r["precisions"].items():
            key = "photos" + suffix
            if key in r["megapixels_per_s"]:
                mp = r["megapixels_per_s"][key]
                per_mp = f"{cpu[key] / 12.0:>11.1f}" if key in cpu else ""
                lines.append(f"{'(d) ' + precision + ': photos, 252 tiles each':<70}{mp:>9.2f}"
                             f"{mp / min(cores, cfg['processes']):>11.2f}{per_mp}")
    acc = r.get("accuracy") or {}
    if acc:
        lines += ["", "held-out accuracy (test split of the model, through the service): " + ", ".join(
            f"{r['precisions'][k[1:]]} {100 * v['accuracy']:.2f} % (n {v['n']})"
            for k, v in acc.items() if isinstance(v, dict))]
        if "points" in acc:
            lines.append(f"  {main_p} - fp32: {acc['points']:+.2f} points; same label on "
                         f"{100 * acc['label_agreement']:.2f} % of the images")
    lines += ["", "ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items()),
              "CPU-per-image ratios (how much more CPU the first needs; robust to load): " + ", ".join(
                  f"{k} {v:.2f}" for k, v in r.get("cpu_ratios", {}).items()),
              f"single-image latency (warm): median {r['latency_ms']['median']:.0f} ms "
              f"(of {len(r['latency_ms']['all'])})",
              "peak RSS (MiB): " + "; ".join(
                  f"{k}: pool process(es) {v.get('pool_processes_mib')}, main {v.get('main_process_mib')}"
                  for k, v in r["rss_mib"].items()),
              "", "targets:"]
    for key, t in r["targets"].items():
        op = "<" if key == "latency_ms" else ">="
        lines.append(f"  {key:<19} {t['measured']:>8} {op} {t['target']:<6} {'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
