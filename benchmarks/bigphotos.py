"""Throughput on drone-size photos: 4000×3000 JPEGs through `crackq run`, in megapixels/s and tiles/s.

    .venv/bin/python -m benchmarks.bigphotos [--photos 12] [--repeats 2]

The photos are generated from real concrete patches (test split of the shipped
model): 18×14 patches laid edge to edge and cropped to 4000×3000, saved as
JPEG (quality 90) with EXIF GPS, like a drone camera's output.  Each
configuration runs `crackq run` as a user would (private Redis + local
workers); the job time is the one `crackq run` reports (submit -> last
result read back, start-up excluded), and the wall time with start-up is
given too.  Configurations alternate (a, b, c, a, b, c, ...) so a load change
on this shared machine hits all alike; medians are reported.

For context it also measures, in this process, the two halves of the work:
decoding a photo into its 252 tile inputs (``prepare_image``) and the model on
those tiles (``Classifier.predict``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import CONCRETE, REPO
from benchmarks.common.imagery import PATCH, gps_exif, held_out_patches
from shared.preprocessing import prepare_image, tile_grid

WIDTH, HEIGHT = 4000, 3000
CONFIGS = {  # name -> extra `crackq run` arguments
    "1 worker process": ["--workers", "1"],
    "2 worker processes": ["--workers", "2"],
    "1 process, overlap 32 px": ["--workers", "1", "--tile-overlap", "32"],
}


def make_photos(folder: Path, n: int, concrete: Path, seed: int = 0) -> tuple[list[Path], dict]:
    """The photos, and per photo the class (1 = crack) of the patch under each grid cell."""
    held = held_out_patches(concrete)
    patches = [(p, int(c == "Positive")) for c, members in held.items() for p in members]
    rng = np.random.default_rng(seed)
    cols, rows = -(-WIDTH // PATCH), -(-HEIGHT // PATCH)
    paths, truth = [], {}
    for i in range(n):
        canvas = Image.new("RGB", (cols * PATCH, rows * PATCH))
        labels = np.zeros((rows, cols), int)
        for k in range(cols * rows):
            path, labels[k // cols, k % cols] = patches[rng.integers(len(patches))]
            with Image.open(path) as p:
                canvas.paste(p.convert("RGB"), ((k % cols) * PATCH, (k // cols) * PATCH))
        path = folder / f"DJI_{i:04d}.JPG"
        canvas.crop((0, 0, WIDTH, HEIGHT)).save(path, quality=90,
                                                exif=gps_exif(47.0 + i * 1e-4, 8.0, 450.0, "2024:06:01 12:00:00"))
        paths.append(path)
        truth[str(path)] = labels
    return paths, truth


def tile_accuracy(folder: Path, truth: dict, out: Path) -> dict:
    """Tile-level accuracy over the tiles that sit exactly on one patch (the grid's last row and
    column are shifted back to the photo's edge and straddle two patches, so they are left out)."""
    subprocess.run([sys.executable, "-m", "producer.cli", "run", str(folder), "--out", str(out), "--per-tile",
                    "--format", "jsonl"], check=True, capture_output=True, env={**os.environ, "CRACKQ_REDIS_URL": ""},
                   cwd=str(REPO), timeout=3600)
    right = total = 0
    for line in out.read_text().splitlines():
        r = json.loads(line)
        if "tile" not in r or r["x"] % PATCH or r["y"] % PATCH:
            continue
        total += 1
        right += int(int(r["label"] == "crack") == truth[r["path"]][r["y"] // PATCH, r["x"] // PATCH])
    return {"tiles": total, "correct": right, "accuracy": right / total}


def run_once(folder: Path, extra: list[str], out: Path) -> dict:
    env = {**os.environ, "CRACKQ_REDIS_URL": ""}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "producer.cli", "run", str(folder), "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, cwd=str(REPO), timeout=3600)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"crackq run failed:\n{proc.stderr[-2000:]}")
    job = float(re.search(r"image\(s\) in ([\d.]+)s", proc.stdout).group(1))
    return {"job_seconds": job, "wall_seconds": wall}


def in_process(photos: list[Path]) -> dict:
    from shared.config import Settings
    from shared.inference import load_classifier

    classifier = load_classifier(Settings.load())
    decode, infer = [], []
    for path in photos[:3]:
        t = time.perf_counter()
        prepared = prepare_image(str(path))
        decode.append(time.perf_counter() - t)
        t = time.perf_counter()
        classifier.predict(prepared.inputs)
        infer.append(time.perf_counter() - t)
    tiles = len(prepared.inputs)
    return {"decode_ms_per_photo": 1000 * statistics.median(decode),
            "model_tiles_per_second": tiles / statistics.median(infer), "tiles_per_photo": tiles}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--data", default=str(CONCRETE))
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "bigphotos.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="crackq-bigphotos-") as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        photos, truth = make_photos(folder, args.photos, Path(args.data))
        megapixels = args.photos * WIDTH * HEIGHT / 1e6
        mb = sum(p.stat().st_size for p in photos) / 1e6
        print(f"{args.photos} photos of {WIDTH}x{HEIGHT} ({mb / args.photos:.1f} MB each), "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
        context = in_process(photos)
        runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
        for _ in range(args.repeats):
            for name, extra in CONFIGS.items():
                runs[name].append(run_once(folder, extra, Path(tmp) / "out.csv"))
                print(f"  {name}: {runs[name][-1]}", flush=True)
        accuracy = tile_accuracy(folder, truth, Path(tmp) / "tiles.jsonl")
    rows = []
    for name, extra in CONFIGS.items():
        overlap = int(extra[extra.index("--tile-overlap") + 1]) if "--tile-overlap" in extra else 0
        tiles = args.photos * len(tile_grid(WIDTH, HEIGHT, PATCH, overlap))
        job = statistics.median(r["job_seconds"] for r in runs[name])
        wall = statistics.median(r["wall_seconds"] for r in runs[name])
        rows.append({"config": name, "tiles": tiles, "job_seconds": job, "wall_seconds": wall,
                     "megapixels_per_second": megapixels / job, "tiles_per_second": tiles / job,
                     "photos_per_second": args.photos / job})
    print(f"\nin-process halves: decode {context['decode_ms_per_photo']:.0f} ms per photo "
          f"({context['tiles_per_photo']} tiles), model {context['model_tiles_per_second']:.0f} tiles/s\n")
    print(f"tile-level accuracy (tiles lying on one patch): {accuracy['correct']}/{accuracy['tiles']} = "
          f"{accuracy['accuracy']:.4f}\n")
    print("| configuration | tiles | job s | MP/s | tiles/s | photos/s | wall s (with start-up) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['tiles']} | {r['job_seconds']:.1f} | {r['megapixels_per_second']:.2f} | "
              f"{r['tiles_per_second']:.0f} | {r['photos_per_second']:.2f} | {r['wall_seconds']:.1f} |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "in_process": context, "photos": args.photos,
                               "tile_accuracy": accuracy,
                               "load_average": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
