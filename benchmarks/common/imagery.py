"""Images built in code for the drone-imagery tests and benchmarks (nothing is copied into the repo).

* :func:`mosaic_photo`: a large "drone photo" made of real 227 px concrete
  patches laid on a grid, so the right answer for every tile is known.
* :func:`gps_exif`: an EXIF block with GPS position, altitude, capture time
  and orientation, written by Pillow as a camera would.
* :data:`UNFAMILIAR`: generators of imagery unlike the training patches
  (other scales, blur, colour, inversion, noise, sky, brick, asphalt-like
  aggregate, grooves, wood, foliage), for the in-domain check.

Used by the tests and the benchmarks alike.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from benchmarks.common import REPO

PATCH = 227
SPLIT_FILE = REPO / "models" / "split.json"


# ---- real patches ---------------------------------------------------------------------------------
def held_out_patches(concrete_dir: Path, split_file: Path = SPLIT_FILE) -> dict[str, list[Path]]:
    """``{"Negative": [...], "Positive": [...]}``: the test split of the shipped model when its
    ``split.json`` exists (patches it never trained on), else every patch."""
    if split_file.exists():
        files = json.loads(split_file.read_text())["files"]["test"]
    else:
        files = [f"{c}/{n}" for c in ("Negative", "Positive") for n in sorted(os.listdir(concrete_dir / c))]
    out: dict[str, list[Path]] = {"Negative": [], "Positive": []}
    for rel in files:
        cls = rel.split("/", 1)[0]
        if cls in out:
            out[cls].append(concrete_dir / rel)
    return out


def layout(cols: int, rows: int, seed: int, crack_share: float = 0.4) -> np.ndarray:
    """A rows×cols bool grid: True where the mosaic gets a crack patch (about ``crack_share`` of cells)."""
    rng = np.random.default_rng(seed)
    grid = np.zeros(rows * cols, bool)
    grid[rng.permutation(rows * cols)[: round(crack_share * rows * cols)]] = True
    return grid.reshape(rows, cols)


def mosaic_photo(patches: dict[str, list[Path]], grid: np.ndarray, seed: int) -> tuple[Image.Image, list[Path]]:
    """Lay one patch per grid cell (crack patch where ``grid`` is True); returns the image and the
    patch used for each cell in row-major order."""
    rng = np.random.default_rng(seed)
    rows, cols = grid.shape
    crack = [patches["Positive"][i] for i in rng.permutation(len(patches["Positive"]))]
    plain = [patches["Negative"][i] for i in rng.permutation(len(patches["Negative"]))]
    photo = Image.new("RGB", (cols * PATCH, rows * PATCH))
    used = []
    for r in range(rows):
        for c in range(cols):
            path = crack.pop() if grid[r, c] else plain.pop()
            with Image.open(path) as patch:
                photo.paste(patch.convert("RGB").resize((PATCH, PATCH)), (c * PATCH, r * PATCH))
            used.append(path)
    return photo, used


def gps_exif(lat: float | None = None, lon: float | None = None, alt: float | None = None,
             when: str | None = None, orientation: int | None = None) -> Image.Exif:
    """An EXIF block as a drone camera writes it: GPS in degrees/minutes/seconds with N/S/E/W refs,
    altitude with its above/below-sea-level ref, DateTimeOriginal and Orientation."""
    def dms(value: float):
        value = abs(value)
        d = int(value)
        m = int((value - d) * 60)
        s = (value - d - m / 60) * 3600
        return (float(d), float(m), round(s, 4))

    exif = Image.Exif()
    if lat is not None and lon is not None:
        gps = {1: "N" if lat >= 0 else "S", 2: dms(lat), 3: "E" if lon >= 0 else "W", 4: dms(lon)}
        if alt is not None:
            gps.update({5: 1 if alt < 0 else 0, 6: abs(float(alt))})
        exif[0x8825] = gps
    if when:
        exif[0x8769] = {0x9003: when}
    if orientation:
        exif[0x0112] = orientation
    return exif


# ---- unfamiliar imagery -----------------------------------------------------------------------------
# Each generator returns ``(image, label)``: label 1 = shows a crack, 0 = no crack, None = unknown
# (e.g. a zoomed crop that may or may not contain the crack of its source patch).
def _img(arr) -> Image.Image:
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB" if np.ndim(arr) == 3 else "L").convert("RGB")


def _grain(rng, size=PATCH, scale=8.0, cells=16) -> np.ndarray:
    low = rng.normal(0, 1, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC)) * scale


def _patch(rng, patches) -> tuple[Image.Image, int]:
    path = patches[rng.integers(len(patches))]
    with Image.open(path) as p:
        return p.convert("RGB"), int(Path(path).parent.name == "Positive")


def rescaled(n: int) -> Callable:
    """n×n concrete patches shrunk into one tile: concrete seen from n times further away."""
    def make(rng, patches):
        cell = PATCH // n + 1
        canvas = Image.new("RGB", (cell * n, cell * n))
        label = 0
        for i in range(n * n):
            p, y = _patch(rng, patches)
            label |= y
            canvas.paste(p.resize((cell, cell), Image.Resampling.BILINEAR), ((i % n) * cell, (i // n) * cell))
        return canvas.resize((PATCH, PATCH), Image.Resampling.BILINEAR), label
    return make


def zoomed(rng, patches):
    """The centre quarter of a patch blown up 4×: concrete seen from much closer."""
    p, _ = _patch(rng, patches)
    q = PATCH // 4
    x, y = rng.integers(0, PATCH - q, 2)
    return p.crop((x, y, x + q, y + q)).resize((PATCH, PATCH), Image.Resampling.BICUBIC), None


def blurred(rng, patches):
    p, y = _patch(rng, patches)
    return p.filter(ImageFilter.GaussianBlur(rng.uniform(3, 6))), y


def recoloured(rng, patches):
    """A strong colour cast (concrete is grey): the patch's luminance mapped between two random colours."""
    p, y = _patch(rng, patches)
    grey = ImageOps.autocontrast(p.convert("L"))
    dark, light = rng.integers(0, 120, 3), rng.integers(120, 256, 3)
    dark[rng.integers(3)] = rng.integers(0, 40)
    light[rng.integers(3)] = 255
    return ImageOps.colorize(grey, tuple(int(v) for v in dark), tuple(int(v) for v in light)), y


def inverted(rng, patches):
    p, y = _patch(rng, patches)
    return ImageOps.invert(p), y


def noise(rng, _patches):
    if rng.random() < 0.5:
        return _img(rng.integers(0, 256, (PATCH, PATCH, 3))), 0
    return _img(np.repeat(rng.normal(128, rng.uniform(20, 70), (PATCH, PATCH, 1)), 3, axis=2)), 0


def sky(rng, _patches):
    """A smooth vertical gradient from blue to white with faint cloud texture and sensor noise."""
    top = np.array([rng.uniform(60, 140), rng.uniform(120, 190), rng.uniform(200, 255)])
    bottom = np.array([rng.uniform(200, 250)] * 3)
    t = np.linspace(0, 1, PATCH)[:, None, None]
    arr = top * (1 - t) + bottom * t + np.zeros((PATCH, PATCH, 3))
    arr += _grain(rng, scale=rng.uniform(2, 10))[..., None] + rng.normal(0, 1.5, arr.shape)
    return _img(arr), 0


def brick(rng, _patches):
    """Running-bond brick wall: reddish bricks of random size and tone, grey mortar joints."""
    bh = int(rng.integers(18, 45))
    bw = int(bh * rng.uniform(2.0, 3.2))
    joint = int(rng.integers(2, 6))
    mortar = rng.uniform(150, 210)
    base = np.array([rng.uniform(120, 190), rng.uniform(50, 90), rng.uniform(30, 70)])
    img = Image.new("RGB", (PATCH, PATCH), (int(mortar),) * 3)
    draw = ImageDraw.Draw(img)
    for row, y in enumerate(range(-int(rng.integers(0, bh)), PATCH, bh + joint)):
        shift = (bw // 2) * (row % 2) + int(rng.integers(0, bw))
        for x in range(-shift, PATCH, bw + joint):
            tone = np.clip(base * rng.uniform(0.75, 1.2), 0, 255).astype(int)
            draw.rectangle([x, y, x + bw - 1, y + bh - 1], fill=tuple(int(v) for v in tone))
    arr = np.asarray(img, np.float32) + rng.normal(0, 8, (PATCH, PATCH, 1))
    return _img(arr).filter(ImageFilter.GaussianBlur(0.7)), 0


def _gravel(rng, stones: int, tone: float, spread: float) -> np.ndarray:
    """Packed stones of random grey tone (Voronoi cells), dark binder in the gaps, each stone lit
    brighter at its centre: a photo-like aggregate texture (float grey, PATCH×PATCH)."""
    from scipy.spatial import cKDTree

    points = rng.uniform(0, PATCH, (stones, 2))
    yy, xx = np.mgrid[0:PATCH, 0:PATCH]
    dist, idx = cKDTree(points).query(np.c_[xx.ravel(), yy.ravel()], k=2)
    tones = rng.normal(tone, spread, stones)
    arr = tones[idx[:, 0]] - dist[:, 0] * rng.uniform(0.5, 2.5)
    binder = (dist[:, 1] - dist[:, 0]) < rng.uniform(0.8, 2.5)
    arr = np.where(binder, rng.uniform(15, 45) + rng.normal(0, 5, arr.shape), arr)
    return arr.reshape(PATCH, PATCH) + rng.normal(0, 5, (PATCH, PATCH))


def asphalt_blobs(rng, _patches):
    """Road asphalt, drawn: dark binder with many small grey/black blobs and a few light ones."""
    arr = np.full((PATCH, PATCH), rng.uniform(40, 90), np.float32)
    img = Image.fromarray(arr.astype(np.uint8), "L")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(600, 1600))):
        x, y = rng.uniform(0, PATCH, 2)
        r = rng.gamma(2.0, rng.uniform(0.8, 1.6))
        shade = int(np.clip(rng.normal(rng.choice([35, 90, 140]), 20), 0, 255))
        draw.ellipse([x - r, y - r * rng.uniform(0.6, 1.0), x + r, y + r], fill=shade)
    arr = np.asarray(img, np.float32) + rng.normal(0, 6, (PATCH, PATCH))
    return _img(np.repeat(arr[..., None], 3, axis=2)).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9))), 0


def asphalt(rng, _patches):
    """Road asphalt, photo-like: densely packed small stones in dark binder, slightly soft."""
    arr = _gravel(rng, int(rng.integers(900, 3000)), rng.uniform(70, 140), rng.uniform(15, 40))
    arr = arr[..., None] + rng.uniform(-4, 4, 3)
    return _img(arr).filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0))), 0


def exposed_aggregate(rng, patches):
    """A concrete patch with its surface worn down to the aggregate: half patch, half gravel."""
    p, y = _patch(rng, patches)
    gravel = _gravel(rng, int(rng.integers(300, 1200)), rng.uniform(100, 170), rng.uniform(15, 35))
    mix = rng.uniform(0.4, 0.6)
    arr = np.asarray(p, np.float32) * (1 - mix) + gravel[..., None] * mix
    return _img(arr).filter(ImageFilter.GaussianBlur(0.5)), y


def grooved(rng, patches):
    """A tined bridge deck: a real concrete patch with regular parallel grooves pressed into it."""
    p, y = _patch(rng, patches)
    period = rng.uniform(8, 25)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:PATCH, 0:PATCH]
    phase = np.mod((xx * np.cos(angle) + yy * np.sin(angle)) / period, 1.0)
    width = rng.uniform(0.15, 0.35)
    groove = np.clip(1 - np.abs(phase - 0.5) / (width / 2), 0, 1) ** 0.7
    arr = np.asarray(p, np.float32) * (1 - rng.uniform(0.25, 0.5) * groove[..., None])
    return _img(arr).filter(ImageFilter.GaussianBlur(0.6)), y


def wood(rng, _patches):
    yy, xx = np.mgrid[0:PATCH, 0:PATCH].astype(np.float32)
    cx, cy = rng.uniform(-PATCH, 2 * PATCH, 2)
    rings = np.sin(np.hypot((xx - cx) * 0.3, yy - cy) / rng.uniform(2, 6) + _grain(rng, scale=2)) * 0.5 + 0.5
    base = np.array([rng.uniform(140, 200), rng.uniform(90, 130), rng.uniform(40, 70)])
    return _img(base * (0.7 + 0.3 * rings[..., None]) + rng.normal(0, 4, (PATCH, PATCH, 1))), 0


def foliage(rng, _patches):
    """Grass or leaves: many short green strokes of varied tone."""
    img = Image.new("RGB", (PATCH, PATCH), (int(rng.uniform(20, 60)), int(rng.uniform(60, 100)), 20))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(400, 900))):
        x, y = rng.uniform(0, PATCH, 2)
        a = rng.normal(-np.pi / 2, 0.5)
        length = rng.uniform(5, 25)
        g = int(rng.uniform(80, 200))
        draw.line([x, y, x + length * np.cos(a), y + length * np.sin(a)],
                  fill=(int(g * rng.uniform(0.3, 0.7)), g, int(g * rng.uniform(0.1, 0.4))),
                  width=int(rng.integers(1, 4)))
    return img, 0


#: name -> generator(rng, concrete_patch_paths) -> (227×227 RGB image, label 1/0/None).
UNFAMILIAR: dict[str, Callable] = {
    "mosaic 2x2": rescaled(2), "mosaic 3x3": rescaled(3), "mosaic 4x4": rescaled(4), "zoom 4x": zoomed,
    "blurred": blurred, "recoloured": recoloured, "inverted": inverted, "grooved deck": grooved,
    "exposed aggregate": exposed_aggregate, "asphalt": asphalt, "asphalt (drawn)": asphalt_blobs,
    "brick": brick, "wood": wood, "foliage": foliage, "sky": sky, "noise": noise,
}


def unfamiliar_images(name: str, n: int, patches: list[Path], seed: int = 0) -> tuple[list[Image.Image], list]:
    """``n`` images of one unfamiliar set and their labels (deterministic for a seed)."""
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    pairs = [UNFAMILIAR[name](rng, patches) for _ in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# ---- a survey folder for the service tests ------------------------------------------------------------
GPS_PHOTO = {"lat": 39.8912345, "lon": 32.7784321, "alt": 912.5, "when": "2024:05:17 10:31:02"}
ROTATED_PHOTO = {"lat": -33.4489, "lon": -70.6693, "alt": -12.25, "when": "2024:05:18 08:00:00"}


def write_survey(folder: Path, concrete_dir: Path, patches_per_class: int = 10, unfamiliar_each: int = 4) -> dict:
    """A drone-survey folder mixing large photos and small images; returns what each file should give.

    * ``photos/mosaic_gps.jpg``: 8×6 held-out patches (1816×1362 px), EXIF GPS/altitude/time;
    * ``photos/mosaic_rotated.jpg``: another 8×6 mosaic stored turned 90° with EXIF Orientation 6
      (displayed upright), GPS in the southern/western hemispheres, altitude below sea level;
    * ``photos/no_gps.jpg``: a 4×3 mosaic without EXIF;
    * ``photos/huge.jpg``: 2000×1600 px, for a worker whose pixel limit is below that;
    * ``patches/``: held-out 227 px patches (links into the data set), classified whole;
    * ``unfamiliar/``: noise, sky and brick images, which the in-domain check should flag.
    """
    held = held_out_patches(concrete_dir)
    (folder / "photos").mkdir(parents=True)
    expected: dict = {"photos": {}, "patches": {}, "unfamiliar": []}
    for name, seed, meta, orientation in (("mosaic_gps", 1, GPS_PHOTO, None),
                                          ("mosaic_rotated", 2, ROTATED_PHOTO, 6)):
        grid = layout(8, 6, seed)
        photo, used = mosaic_photo(held, grid, seed)
        stored = photo.transpose(Image.Transpose.ROTATE_90) if orientation == 6 else photo
        exif = gps_exif(meta["lat"], meta["lon"], meta["alt"], meta["when"], orientation)
        path = folder / "photos" / f"{name}.jpg"
        stored.save(path, quality=95, exif=exif)
        expected["photos"][str(path)] = {"grid": grid, "patches": used, "meta": meta}
    grid = layout(4, 3, 3)
    photo, used = mosaic_photo(held, grid, 3)
    path = folder / "photos" / "no_gps.jpg"
    photo.save(path, quality=95)
    expected["photos"][str(path)] = {"grid": grid, "patches": used, "meta": None}
    Image.new("RGB", (2000, 1600), (128, 128, 128)).save(folder / "photos" / "huge.jpg", quality=80)
    expected["huge"] = str(folder / "photos" / "huge.jpg")

    (folder / "patches").mkdir()
    rng = np.random.default_rng(4)
    for cls in ("Negative", "Positive"):
        members = held[cls]
        for i in rng.permutation(len(members))[:patches_per_class]:
            link = folder / "patches" / f"{cls}_{members[i].name}"
            os.symlink(members[i], link)
            expected["patches"][str(link)] = "crack" if cls == "Positive" else "no_crack"

    (folder / "unfamiliar").mkdir()
    for name in ("noise", "sky", "brick"):
        images, _ = unfamiliar_images(name, unfamiliar_each, held["Negative"], seed=5)
        for i, img in enumerate(images):
            path = folder / "unfamiliar" / f"{name.replace(' ', '_')}_{i}.png"
            img.save(path)
            expected["unfamiliar"].append(str(path))
    return expected
