"""Decode + resize: Pillow (today's path) against libjpeg-turbo DCT-domain scaling and libvips.

    .venv/bin/python -m benchmarks.decode [--patches 300] [--photos 3] [--repeats 3]

Two workloads, both on real imagery: 227 px concrete patches (test split)
decoded to the 160 px model input, and 4000×3000 JPEGs made of real patches
(as ``benchmarks/bigphotos.py`` makes them) decoded to the size at which a
227 px tile becomes 160 px (2819×2115, then cut into tiles by a plain crop,
which costs the same whichever decoder ran).

Candidates (each followed by Pillow's antialiased bilinear resize to the exact
target, unless it resizes itself):

* ``pillow``: ``shared.preprocessing.load_rgb`` + ``Image.resize`` -- what
  training and serving run today (draft only below ½ scale: not for these);
* ``simplejpeg``: libjpeg-turbo full-size decode;
* ``simplejpeg-dct``: libjpeg-turbo decoding straight to the smallest M/8
  scale not below the target (6/8 for both workloads), then the resize;
* ``turbojpeg-dct``: the same through PyTurboJPEG (1.x: Debian 12 ships
  libjpeg-turbo 2.1, PyTurboJPEG 2 needs 3.0);
* ``pyvips``: libvips decode + its own ``resize`` (linear kernel), one thread;
* ``pyvips-shrink``: libvips ``thumbnail`` (shrink-on-load, then resize).

Reported: CPU ms per image (``time.process_time``: all threads of this
process, much less disturbed by the other jobs on a shared machine than
wall time; medians over repeats) and the pixel difference from ``pillow``
(max and mean absolute difference in 0-255 units, share of values off by > 8).
Measured in one run, on the same files; absolute numbers move with the load.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VIPS_CONCURRENCY", "1")  # one thread, like one decode thread of a worker

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from shared.preprocessing import RESAMPLE, check_file, load_rgb  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PATCH_TARGET = (160, 160)
PHOTO_TARGET = (round(4000 * 160 / 227), round(3000 * 160 / 227))


def _read(path: str) -> bytes:
    """The file's bytes, with the same checks as ``load_rgb`` (a fair comparison includes them)."""
    check_file(path, 512 * 1024 * 1024)
    with open(path, "rb") as fh:
        return fh.read()


def _resize(arr: np.ndarray, target) -> np.ndarray:
    img = Image.fromarray(arr)
    return np.asarray(img if img.size == tuple(target) else img.resize(target, RESAMPLE))


def pillow(path: str, target) -> np.ndarray:
    img = load_rgb(path)
    return np.asarray(img if img.size == tuple(target) else img.resize(target, RESAMPLE))


def simplejpeg_full(path: str, target) -> np.ndarray:
    data = _read(path)
    import simplejpeg

    return _resize(simplejpeg.decode_jpeg(data, colorspace="RGB"), target)


def simplejpeg_dct(path: str, target) -> np.ndarray:
    data = _read(path)
    import simplejpeg

    arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=target[0], min_height=target[1])
    return _resize(arr, target)


_TJ = []


def turbojpeg_dct(path: str, target) -> np.ndarray:
    data = _read(path)
    from turbojpeg import TJPF_RGB, TurboJPEG

    if not _TJ:
        _TJ.append(TurboJPEG())
    tj = _TJ[0]
    w, h, _, _ = tj.decode_header(data)
    factors = sorted(tj.scaling_factors, key=lambda f: f[0] / f[1])
    factor = next(f for f in factors if w * f[0] / f[1] >= target[0] and h * f[0] / f[1] >= target[1])
    return _resize(tj.decode(data, pixel_format=TJPF_RGB, scaling_factor=factor), target)


def pyvips_resize(path: str, target) -> np.ndarray:
    data = _read(path)
    import pyvips

    img = pyvips.Image.new_from_buffer(data, "", access="sequential")
    out = img.resize(target[0] / img.width, vscale=target[1] / img.height, kernel="linear")
    return np.ndarray(buffer=out.write_to_memory(), dtype=np.uint8, shape=(out.height, out.width, out.bands))


def pyvips_shrink(path: str, target) -> np.ndarray:
    data = _read(path)
    import pyvips

    out = pyvips.Image.thumbnail_buffer(data, target[0], height=target[1], size="force")
    return np.ndarray(buffer=out.write_to_memory(), dtype=np.uint8, shape=(out.height, out.width, out.bands))


CANDIDATES = {"pillow": pillow, "simplejpeg": simplejpeg_full, "simplejpeg-dct": simplejpeg_dct,
              "turbojpeg-dct": turbojpeg_dct, "pyvips": pyvips_resize, "pyvips-shrink": pyvips_shrink}


def measure(paths: list[str], target, repeats: int) -> dict:
    """CPU ms per image of every available candidate, rounds interleaved; pixel differences from pillow."""
    available = {}
    for name, fn in CANDIDATES.items():
        try:
            fn(paths[0], target)
            available[name] = fn
        except Exception as exc:  # noqa: BLE001 - a missing library is reported, not fatal
            print(f"  {name}: not available ({type(exc).__name__}: {str(exc)[:80]})", file=sys.stderr)
    cpu = {name: [] for name in available}
    for _ in range(repeats):
        for name, fn in available.items():
            start = time.process_time()
            for path in paths:
                fn(path, target)
            cpu[name].append((time.process_time() - start) * 1000 / len(paths))
    reference = [pillow(p, target).astype(np.int16) for p in paths]
    rows = {}
    for name, fn in available.items():
        diffs = [np.abs(fn(p, target).astype(np.int16) - ref) for p, ref in zip(paths, reference)]
        flat = np.concatenate([d.ravel() for d in diffs])
        rows[name] = {"cpu_ms": statistics.median(cpu[name]), "max_abs": int(flat.max()),
                      "mean_abs": float(flat.mean()), "share_over_8": float(np.mean(flat > 8))}
    base = rows["pillow"]["cpu_ms"]
    for row in rows.values():
        row["speedup"] = base / row["cpu_ms"]
    return rows


def patch_paths(concrete: Path, n: int) -> list[str]:
    from benchmarks.common.imagery import held_out_patches

    held = held_out_patches(concrete)
    per = n // 2
    return [str(p) for cls in ("Negative", "Positive") for p in held[cls][:per]]


def table(title: str, rows: dict) -> str:
    lines = [f"\n{title}", "| decoder | CPU ms / image | vs pillow | max abs diff | mean abs diff | values off by > 8 |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['cpu_ms']:.2f} | {r['speedup']:.2f}x | {r['max_abs']} | {r['mean_abs']:.3f} | "
                     f"{100 * r['share_over_8']:.2f} % |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patches", type=int, default=300)
    ap.add_argument("--photos", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "concrete"))
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "decode.json"))
    args = ap.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    patches = measure(patch_paths(Path(args.data), args.patches), PATCH_TARGET, args.repeats)
    print(table(f"227 px patches -> {PATCH_TARGET[0]} px model input ({args.patches} real patches)", patches))
    from benchmarks.bigphotos import make_photos

    with tempfile.TemporaryDirectory(prefix="crackq-decode-") as tmp:
        photos, _ = make_photos(Path(tmp), args.photos, Path(args.data))
        big = measure([str(p) for p in photos], PHOTO_TARGET, args.repeats)
    print(table(f"4000x3000 photos -> {PHOTO_TARGET[0]}x{PHOTO_TARGET[1]} (227 px tile = 160 px; "
                f"{args.photos} photos)", big))
    result = {"patches": patches, "photos": big, "load_average": os.getloadavg()}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
