"""A large orthomosaic (default 20,000 × 20,000 px GeoTIFF) on 1 and 2 worker processes: time and worker RSS.

    .venv/bin/python -m benchmarks.orthomosaic [--size 20000] [--repeats 1]

The GeoTIFF is built from real concrete patches (laid edge to edge, EPSG:32633,
1 cm pixels, JPEG-compressed 256 px blocks like an OpenDroneMap orthophoto)
and written strip by strip, so this process never holds it whole either.  Each
configuration starts `crackq worker --concurrency N` (one inference thread per
process) on a private Redis, warms it up with a one-patch job, then classifies
the raster (split into windows of CRACKQ_RASTER_WINDOW px, default 4096:
25 windows for 20k px).  Job time is submit -> last window's result.  The RSS
of every process of the worker group is sampled every 0.2 s; the peak per
process is reported.  Configurations alternate when --repeats > 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from benchmarks.common import CONCRETE
from benchmarks.common.imagery import PATCH, held_out_patches
from producer.api import Client
from producer.embedded import local_workers, private_redis
from shared.config import Settings


def write_orthomosaic(path: Path, size: int, seed: int = 0) -> None:
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    held = held_out_patches(CONCRETE)
    patches = [p for members in held.values() for p in members]
    rng = np.random.default_rng(seed)
    cache = {}
    cells = -(-size // PATCH)
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8", "tiled": True,
               "blockxsize": 256, "blockysize": 256, "compress": "jpeg", "photometric": "YCbCr",
               "jpeg_quality": 90, "crs": "EPSG:32633", "transform": from_origin(500_000, 4_650_000, 0.01, 0.01),
               "BIGTIFF": "IF_SAFER"}
    with rasterio.Env(GDAL_CACHEMAX=512), rasterio.open(path, "w", **profile) as ds:
        for r in range(cells):
            strip = np.empty((PATCH, cells * PATCH, 3), np.uint8)
            for c in range(cells):
                p = patches[rng.integers(len(patches))]
                if p not in cache:
                    with Image.open(p) as img:
                        cache[p] = np.asarray(img.convert("RGB").resize((PATCH, PATCH)))
                strip[:, c * PATCH:(c + 1) * PATCH] = cache[p]
            h = min(PATCH, size - r * PATCH)
            ds.write(np.moveaxis(strip[:h, :size], -1, 0), window=Window(0, r * PATCH, size, h))


class RssSampler(threading.Thread):
    """Peak RSS of each process in the worker's process group (parent and pool children)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.peaks: dict[int, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                for proc in [self.root] + self.root.children(recursive=True):
                    try:
                        self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), proc.memory_info().rss)
                    except psutil.Error:
                        pass
            except psutil.Error:
                return


def run_config(url: str, processes: int, raster: str, warm: str, tmp: Path) -> dict:
    env = {"CRACKQ_THREADS": "1"}
    roots = [str(Path(raster).parent), str(Path(warm).parent)]
    with local_workers(url, processes, roots, env=env, log_path=str(tmp / f"workers-{processes}.log")) as proc:
        client = Client(Settings.load(redis_url=url))
        client.wait(client.submit([warm]), timeout=600, poll=0.05)  # every pool process has loaded its model
        for _ in range(processes - 1):
            client.wait(client.submit([warm]), timeout=600, poll=0.05)
        sampler = RssSampler(proc.pid)
        sampler.start()
        start = time.perf_counter()
        job = client.submit([raster])
        status = client.wait(job, timeout=3600, poll=0.1)
        seconds = time.perf_counter() - start
        sampler.stop.set()
        sampler.join()
        record = next(r for r in client.results(job) if "tile" not in r)
        assert status.state == "done" and not record["error"], record
        children = [rss for pid, rss in sampler.peaks.items() if pid != proc.pid]
        return {"seconds": seconds, "windows": status.total, "tiles": record["tiles"],
                "workers": len(set(record["worker"].split(","))), "peak_child_rss": max(children),
                "peak_parent_rss": sampler.peaks.get(proc.pid, 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=1)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="crackq-ortho-bench-") as tmp_name:
        tmp = Path(tmp_name)
        raster = tmp / "ortho" / "orthomosaic.tif"
        raster.parent.mkdir()
        started = time.perf_counter()
        write_orthomosaic(raster, opts.size)
        print(f"wrote {opts.size}x{opts.size} px GeoTIFF ({raster.stat().st_size / 1e6:.0f} MB) "
              f"in {time.perf_counter() - started:.0f}s", flush=True)
        warm = tmp / "warm" / "patch.jpg"
        warm.parent.mkdir()
        warm.write_bytes(held_out_patches(CONCRETE)["Positive"][0].read_bytes())
        results: dict[int, list] = {1: [], 2: []}
        with private_redis() as url:
            for _ in range(opts.repeats):
                for processes in (1, 2):
                    row = run_config(url, processes, str(raster), str(warm), tmp)
                    results[processes].append(row)
                    print(f"  {processes} process(es): {row['seconds']:.1f}s, {row['windows']} windows, "
                          f"{row['tiles']} tiles, by {row['workers']} process(es), peak RSS per worker process "
                          f"{row['peak_child_rss'] / 2**20:.0f} MiB", flush=True)
    print("\n| worker processes | windows | tiles | job s | tiles/s | peak RSS per worker process |")
    print("|---:|---:|---:|---:|---:|---:|")
    for processes, rows in results.items():
        seconds = statistics.median(r["seconds"] for r in rows)
        peak = max(r["peak_child_rss"] for r in rows)
        print(f"| {processes} | {rows[0]['windows']} | {rows[0]['tiles']} | {seconds:.1f} | "
              f"{rows[0]['tiles'] / seconds:.0f} | {peak / 2**20:.0f} MiB |")
    one = statistics.median(r["seconds"] for r in results[1])
    two = statistics.median(r["seconds"] for r in results[2])
    print(f"\nspeed-up of 2 processes over 1: {one / two:.2f}x (target >= 1.7); cores {os.cpu_count()}, "
          f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
