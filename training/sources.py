"""Training sources beyond one labelled folder: photos with crack masks, split by photo, cut into tiles.

A source of survey photos with segmentation masks (``../shared/data/uav-concrete``)
gives labelled tiles at any tile size.  Three rules keep its measurements honest:

* the split is made **by photo** (:func:`photo_split`, saved as ``uav_split.json``):
  tiles of one photo never land on both sides;
* validation and test tiles are cut on the workers' grid and preprocessed
  with the workers' own :func:`shared.preprocessing.tiles_to_inputs`, so a
  tile scored here is the tile a worker scores;
* training tiles are random crops of random size (crack width varies) with
  :mod:`training.augment` transforms, labelled by :mod:`shared.mask_tiles`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.mask_tiles import (DEFAULT_BORDER_FRACTION, DEFAULT_MIN_CRACK_FRACTION, label_tile, load_mask,
                               mask_tiles)
from shared.preprocessing import IMAGE_EXTENSIONS, INPUT_SIZE, load_input, load_rgb, tiles_to_inputs
from training.augment import AugmentConfig, augment_image
from training.data import SPLIT_NAMES, list_sha256

UAV_SPLIT_FILE = "uav_split.json"
UAV_RATIOS = (70, 15, 15)
#: Grid tile sizes (source px, each resized to 160) of the uav validation/test sets and of training tiles.
GRID_SIZES = (224, 112, 64)


@dataclass
class ImageSet:
    """Model inputs of one source and split, with what each came from."""

    name: str
    images: np.ndarray                  # (N, 160, 160, 3) uint8
    labels: np.ndarray                  # (N,) 0 = Negative, 1 = Positive
    groups: list[str]                   # photo stem or patch file of each input
    tile_sizes: np.ndarray              # source px of each input (0 = whole patch)
    description: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


def mask_pairs(images_dir: str | os.PathLike, masks_dir: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """``stem -> (image path, mask path)`` for every image that has a mask with the same stem."""
    masks = {p.stem: str(p) for p in Path(masks_dir).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    pairs = {}
    for p in sorted(Path(images_dir).iterdir()):
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.stem in masks:
            pairs[p.stem] = (str(p), masks[p.stem])
    return pairs


def photo_split(stems, seed: int = 42, ratios=UAV_RATIOS) -> dict[str, list[str]]:
    """Seeded train/val/test split of photo stems (test takes the rounding remainder)."""
    stems = sorted(stems)
    order = [stems[i] for i in np.random.default_rng(seed).permutation(len(stems))]
    total = float(sum(ratios))
    n_train = int(round(ratios[0] / total * len(stems)))
    n_val = int(round((ratios[0] + ratios[1]) / total * len(stems))) - n_train
    return {"train": sorted(order[:n_train]), "val": sorted(order[n_train:n_train + n_val]),
            "test": sorted(order[n_train + n_val:])}


def save_photo_split(path, split: dict[str, list[str]], seed: int, ratios, images_dir, masks_dir) -> None:
    doc = {"images_dir": str(images_dir), "masks_dir": str(masks_dir), "seed": seed, "ratios": list(ratios),
           "unit": "photo (file stem): every tile of a photo is in the photo's split",
           "counts": {k: len(v) for k, v in split.items()},
           "sha256": {k: list_sha256(split[k]) for k in SPLIT_NAMES}, "photos": split}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def load_photo_split(path) -> dict[str, list[str]]:
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    split = {k: list(doc["photos"][k]) for k in SPLIT_NAMES}
    for name, digest in doc.get("sha256", {}).items():
        if list_sha256(split[name]) != digest:
            raise ValueError(f"{path}: the {name} photo list does not match its recorded sha256")
    return split


def _photos(pairs: dict[str, tuple[str, str]], stems):
    """``(stem, photo, mask)`` of each stem: the photo decoded as workers decode it, its mask at its size."""
    for stem in stems:
        image_path, mask_path = pairs[stem]
        img = load_rgb(image_path)
        yield stem, img, load_mask(mask_path, img.size)


def grid_tiles(pairs: dict[str, tuple[str, str]], stems, sizes=GRID_SIZES, name: str = "uav",
               max_negatives_per_photo: int | None = None, seed: int = 0,
               min_crack_fraction: float = DEFAULT_MIN_CRACK_FRACTION,
               border_fraction: float = DEFAULT_BORDER_FRACTION) -> ImageSet:
    """Labelled, non-ambiguous grid tiles of ``stems`` at each size, preprocessed exactly as workers do."""
    rng = np.random.default_rng(seed)
    images, labels, groups, tile_sizes = [], [], [], []
    for stem, img, mask in _photos(pairs, stems):
        for size in sizes:
            tiles = [t for t in mask_tiles(mask, size, None, min_crack_fraction, border_fraction)
                     if t.label is not None]
            if max_negatives_per_photo is not None:
                neg = [t for t in tiles if t.label == 0]
                if len(neg) > max_negatives_per_photo:
                    keep = {id(neg[i]) for i in rng.permutation(len(neg))[:max_negatives_per_photo]}
                    tiles = [t for t in tiles if t.label == 1 or id(t) in keep]
            if not tiles:
                continue
            images.append(tiles_to_inputs(img, [t.box for t in tiles], img.size, size))
            labels += [t.label for t in tiles]
            groups += [stem] * len(tiles)
            tile_sizes += [size] * len(tiles)
    desc = {"kind": "grid", "name": name, "stems": list_sha256(list(stems)), "sizes": list(sizes),
            "max_negatives_per_photo": max_negatives_per_photo, "seed": seed,
            "min_crack_fraction": min_crack_fraction, "border_fraction": border_fraction}
    return ImageSet(name, _stack(images), np.array(labels, np.int64), groups, np.array(tile_sizes), desc)


def random_crops(pairs: dict[str, tuple[str, str]], stems, per_photo: int, cfg: AugmentConfig, seed: int,
                 crop_range: tuple[int, int] = (48, 320), name: str = "uav-aug",
                 min_crack_fraction: float = DEFAULT_MIN_CRACK_FRACTION,
                 border_fraction: float = DEFAULT_BORDER_FRACTION) -> ImageSet:
    """``per_photo`` augmented crops per photo, half crack and half not where the photo allows.

    The crop side is log-uniform in ``crop_range`` (source px), so after the
    resize to 160 px the same crack appears anywhere from thin to wide.
    """
    rng = np.random.default_rng(seed)
    images, labels, groups, tile_sizes = [], [], [], []
    for stem, img, mask in _photos(pairs, stems):
        w, h = img.size
        want = {1: per_photo // 2, 0: per_photo - per_photo // 2}
        for _ in range(per_photo * 6):
            if not any(want.values()):
                break
            side = int(np.exp(rng.uniform(np.log(crop_range[0]), np.log(min(crop_range[1], w, h)))))
            x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            _, label = label_tile(mask[y:y + side, x:x + side], min_crack_fraction, border_fraction)
            if label is None or want[label] == 0:
                continue
            want[label] -= 1
            images.append(augment_image(img.crop((x, y, x + side, y + side)), cfg, rng)[None])
            labels.append(label)
            groups.append(stem)
            tile_sizes.append(side)
    desc = {"kind": "crops", "name": name, "stems": list_sha256(list(stems)), "per_photo": per_photo,
            "augment": cfg.to_dict(), "seed": seed, "crop_range": list(crop_range),
            "min_crack_fraction": min_crack_fraction, "border_fraction": border_fraction}
    return ImageSet(name, _stack(images), np.array(labels, np.int64), groups, np.array(tile_sizes), desc)


def patches(root: str, files, classes, name: str, cfg: AugmentConfig | None = None, seed: int = 0) -> ImageSet:
    """Labelled patches (``root/<class>/<file>``), whole and clean, or one augmented draw each."""
    from training.data import labels_of

    rng = np.random.default_rng(seed)
    images = np.zeros((len(files), INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
    for i, f in enumerate(files):
        path = os.path.join(root, f)
        images[i] = load_input(path) if cfg is None else augment_image(load_rgb(path), cfg, rng)
    desc = {"kind": "patches", "name": name, "root": os.path.realpath(root), "files": list_sha256(list(files)),
            "augment": cfg and cfg.to_dict(), "seed": seed}
    return ImageSet(name, images, labels_of(classes, files), list(files), np.zeros(len(files), int), desc)


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
