"""Training-time augmentation on uint8 images, chosen by measurement on VALIDATION data (docs/training.md).

Unseen survey imagery differs from the training patches in four ways that
matter to a crack classifier, and each has a transform here:

* **scale** (crack width in input pixels): :func:`zoom` crops in (wider cracks)
  or mirror-pads out (thinner cracks) before the resize to 160 px;
* **orientation**: flips and multiples of 90 degrees;
* **colour and light**: brightness, contrast, saturation, and sometimes grey;
* **camera and compression**: Gaussian blur and JPEG re-encoding.

Every transform draws from a ``numpy.random.Generator``, so a draw is
reproducible from its seed and feature caches can be keyed by it.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from shared.preprocessing import INPUT_SIZE, RESAMPLE


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of each transform; ``photometric=False`` keeps only zoom and orientation."""

    zoom: tuple[float, float] = (0.6, 1.6)   # <1 zooms out (mirror pad), >1 zooms in (crop)
    photometric: bool = True
    brightness: float = 0.25
    contrast: float = 0.3
    saturation: float = 0.4
    grey_p: float = 0.1
    blur_p: float = 0.3
    blur_radius: float = 1.2
    jpeg_p: float = 0.4
    jpeg_quality: tuple[int, int] = (30, 90)

    def to_dict(self) -> dict:
        return asdict(self)


GEOMETRIC = AugmentConfig(photometric=False)
FULL = AugmentConfig()


def zoom(img: Image.Image, factor: float, rng: np.random.Generator) -> Image.Image:
    """``factor`` > 1: a random crop of side/factor; < 1: mirror-pad to side/factor (content shrinks)."""
    w, h = img.size
    if factor >= 1:
        cw, ch = max(8, round(w / factor)), max(8, round(h / factor))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return img.crop((x, y, x + cw, y + ch))
    arr = np.asarray(img)
    pw, ph = round(w / factor) - w, round(h / factor) - h
    left, top = int(rng.integers(0, pw + 1)), int(rng.integers(0, ph + 1))
    arr = np.pad(arr, ((top, ph - top), (left, pw - left), (0, 0)), mode="symmetric")
    return Image.fromarray(arr)


def orient(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(np.rot90(arr, int(rng.integers(0, 4))))


def photometric(img: Image.Image, cfg: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    img = ImageEnhance.Brightness(img).enhance(1 + rng.uniform(-cfg.brightness, cfg.brightness))
    img = ImageEnhance.Contrast(img).enhance(1 + rng.uniform(-cfg.contrast, cfg.contrast))
    if rng.random() < cfg.grey_p:
        img = img.convert("L").convert("RGB")
    else:
        img = ImageEnhance.Color(img).enhance(1 + rng.uniform(-cfg.saturation, cfg.saturation))
    if rng.random() < cfg.blur_p:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, cfg.blur_radius)))
    if rng.random() < cfg.jpeg_p:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(*cfg.jpeg_quality)))
        buf.seek(0)
        img = Image.open(buf).convert("RGB")
    return img


def augment_image(img: Image.Image, cfg: AugmentConfig, rng: np.random.Generator,
                  size: int = INPUT_SIZE) -> np.ndarray:
    """One augmented model input (``size``×``size``×3 uint8) from a source-resolution RGB crop."""
    lo, hi = cfg.zoom
    factor = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if hi > lo else lo
    if factor != 1.0:
        img = zoom(img, factor, rng)
    img = img.resize((size, size), RESAMPLE)
    if cfg.photometric:
        img = photometric(img, cfg, rng)
    return orient(np.asarray(img, dtype=np.uint8), rng)
