"""``crackq samples DIR``: synthetic concrete images to try the service on (used by ``make demo``).

The real training photos may not be redistributed with the project, so the
demo draws its own: grey, speckled "concrete" patches, half of them with a
dark, branching crack, plus one large "drone photo" (tiled by the workers)
carrying EXIF GPS so that the GeoJSON output has something to place.
They are drawings, not photos: the demo shows the service working, and the
model's answers on them are a sanity check, not an accuracy figure.
"""

from __future__ import annotations

import math
from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PATCH = 227


def concrete(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth grey surface with pores and fine grain."""
    base = rng.uniform(150, 200)
    tint = rng.uniform(-6, 6, size=3)
    low = rng.normal(0, 1, (height // 16 + 2, width // 16 + 2))
    low = np.asarray(Image.fromarray(low.astype(np.float32)).resize((width, height), Image.Resampling.BICUBIC))
    grain = rng.normal(0, 6, (height, width))
    grey = base + 4 * low + grain
    img = np.clip(grey[..., None] + tint, 0, 255).astype(np.uint8)
    out = Image.fromarray(img, "RGB")
    draw = ImageDraw.Draw(out)
    for _ in range(int(width * height / 3000)):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.5, 2.0)
        shade = int(base - rng.uniform(30, 60))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(shade,) * 3)
    return out.filter(ImageFilter.GaussianBlur(0.6))


def draw_crack(img: Image.Image, rng: np.random.Generator, box: tuple[int, int, int, int] | None = None) -> None:
    """A dark random-walk crack with a branch, across ``box`` (default the whole image)."""
    x0, y0, w, h = box or (0, 0, img.width, img.height)
    draw = ImageDraw.Draw(img)
    vertical = rng.random() < 0.5
    angle = (math.pi / 2 if vertical else 0.0) + rng.normal(0, 0.3)
    if vertical:
        x, y = x0 + rng.uniform(0.25, 0.75) * w, y0
    else:
        x, y = x0, y0 + rng.uniform(0.25, 0.75) * h
    points = [(x, y)]
    steps = 40
    heading = angle
    for _ in range(steps):
        heading = angle + 0.6 * (heading - angle) + rng.normal(0, 0.35)
        x += math.cos(heading) * w / steps * 1.1
        y += math.sin(heading) * h / steps * 1.1
        points.append((min(max(x, x0), x0 + w), min(max(y, y0), y0 + h)))
    width = int(rng.integers(4, 9))
    shade = int(rng.uniform(15, 45))
    draw.line(points, fill=(shade,) * 3, width=width, joint="curve")
    branch = points[len(points) // 2:len(points) // 2 + 12]
    draw.line([(px + i * 2, py + i * 3) for i, (px, py) in enumerate(branch)], fill=(shade + 15,) * 3,
              width=max(2, width // 2))


def gps_exif(lat: float, lon: float, alt: float) -> Image.Exif:
    """EXIF with a GPS block, written by Pillow (degrees/minutes/seconds as EXIF wants)."""
    def dms(value: float):
        value = abs(value)
        d = int(value)
        m = int((value - d) * 60)
        s = round((value - d - m / 60) * 3600, 4)
        return (float(d), float(m), float(s))

    exif = Image.Exif()
    gps = {1: "N" if lat >= 0 else "S", 2: dms(lat), 3: "E" if lon >= 0 else "W", 4: dms(lon), 5: 0,
           6: float(alt)}
    exif[0x8825] = gps
    exif[0x0132] = "2026:05:14 10:21:07"
    return exif


def write_samples(folder: str | Path, n_patches: int = 24, seed: int = 7) -> list[Path]:
    folder = Path(folder)
    (folder / "patches").mkdir(parents=True, exist_ok=True)
    (folder / "photos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = []
    for i in range(n_patches):
        img = concrete(rng, PATCH, PATCH)
        cracked = i % 2 == 1
        if cracked:
            draw_crack(img, rng)
        path = folder / "patches" / f"{'crack' if cracked else 'plain'}_{i:03d}.jpg"
        img.save(path, quality=92)
        written.append(path)
    photo = concrete(rng, 8 * PATCH, 6 * PATCH)
    for (col, row) in [(1, 1), (2, 1), (5, 3), (6, 4)]:
        draw_crack(photo, rng, (col * PATCH, row * PATCH, PATCH, PATCH))
    path = folder / "photos" / "survey_0001.jpg"
    photo.save(path, quality=90, exif=gps_exif(39.8912, 32.7784, 912.5))
    written.append(path)
    return written


@click.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--patches", default=24, show_default=True, help="Number of 227 px patches.")
@click.option("--seed", default=7, show_default=True)
def samples(folder, patches, seed):
    """Write synthetic demo images (patches and one large GPS-tagged photo) into FOLDER."""
    paths = write_samples(folder, patches, seed)
    click.echo(f"wrote {len(paths)} sample image(s) to {folder}")
