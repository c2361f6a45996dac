"""The multi-source recipe: which image sets a model is trained, tuned and tested on, and the run itself.

Sources (each recorded in the model card with its counts):

* the labelled patch folder ``DATA_DIR`` (Özgenel), split by ``split.json``;
* optionally photos with crack masks (``--uav-images/--uav-masks``), split
  by photo (``uav_split.json``): train photos give grid tiles at
  :data:`training.sources.GRID_SIZES` plus augmented random crops; val and
  test photos give grid tiles cut as workers cut them;
* optionally more labelled folders (``--extra-source``), split per class.

Every set is a :class:`SetSpec` — a builder and its arguments — so its
features are cached under a key of exactly those arguments and a rerun
(or a design experiment in ``benchmarks/generalisation.py``) costs seconds.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from training import multisource as ms
from training import sources
from training.augment import FULL, GEOMETRIC, AugmentConfig
from training.data import SPLIT_NAMES, Split, list_labelled, list_sha256, make_split

log = logging.getLogger(__name__)

AUGMENTS = {"none": None, "geometric": GEOMETRIC, "full": FULL, "mixed": FULL}
#: Crops of a uav training photo without any transform (random position and size only).
PLAIN_CROPS = AugmentConfig(zoom=(1.0, 1.0), photometric=False)
OZGENEL = "ozgenel"


@dataclass(frozen=True)
class SetSpec:
    """One image set: ``source`` and ``split`` it belongs to, and how to build it (``builder(**args)``)."""

    source: str
    split: str
    kind: str                    # "clean" | "aug" | "grid" | "crops"
    builder: str
    args: dict = field(hash=False, default_factory=dict)

    def description(self) -> dict:
        args = {k: (list_sha256(v) if isinstance(v, (list, tuple)) and len(v) > 8 else v)
                for k, v in self.args.items() if k != "pairs"}
        if "root" in args:  # the same folder named two ways is the same set
            args["root"] = os.path.realpath(args["root"])
        if "pairs" in self.args:
            args["pairs"] = list_sha256([f"{k}\t{os.path.realpath(a)}\t{os.path.realpath(b)}"
                                         for k, (a, b) in sorted(self.args["pairs"].items())])
        # "crops-aug" is a second draw of "crops": the builder's arguments (augmentation) tell them apart
        return {"builder": self.builder, "source": self.source, "split": self.split, "kind": self.kind.split("-")[0],
                "args": json.loads(json.dumps(args, default=_jsonable))}

    def build(self):
        return getattr(sources, self.builder)(**self.args)


def _jsonable(value):
    if isinstance(value, AugmentConfig):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    return str(value)


@dataclass
class MultiConfig:
    """What the multi-source sets are made of (the ``crackq train`` flags that concern sources)."""

    data_dir: str
    split: Split
    uav_images: str | None = None
    uav_masks: str | None = None
    uav_split: dict | None = None
    extra_sources: tuple[str, ...] = ()
    train_per_class: int | None = 2500     # Özgenel train patches per class (seeded sample)
    val_per_class: int | None = 600        # Özgenel val patches per class used for design choices
    augment: str = "mixed"                 # none | geometric | full | mixed (clean + full draws)
    uav_crops_per_photo: int = 40
    uav_max_negatives: int = 6
    seed: int = 42

    def augment_config(self) -> AugmentConfig | None:
        return AUGMENTS[self.augment]


def _sample(files: list[str], per_class: int | None, seed: int) -> list[str]:
    if per_class is None:
        return list(files)
    from training.domain_fit import balanced_sample

    return balanced_sample(files, 2 * per_class, seed)


def specs(cfg: MultiConfig, splits=SPLIT_NAMES) -> list[SetSpec]:
    """Every set of the recipe for ``splits``."""
    out: list[SetSpec] = []
    aug = cfg.augment_config()
    classes = list(cfg.split.classes)
    for name in splits:
        files = cfg.split.files[name]
        if name == "train":
            files = _sample(files, cfg.train_per_class, cfg.seed)
        elif name == "val":
            files = _sample(files, cfg.val_per_class, cfg.seed)
        base = dict(root=cfg.data_dir, files=files, classes=classes, name=OZGENEL)
        out.append(SetSpec(OZGENEL, name, "clean", "patches", base))
        if name == "train" and aug is not None:
            out.append(SetSpec(OZGENEL, name, "aug", "patches", base | {"cfg": aug, "seed": cfg.seed + 1}))
    if cfg.uav_images and cfg.uav_masks:
        pairs = sources.mask_pairs(cfg.uav_images, cfg.uav_masks)
        uav_split = cfg.uav_split or sources.photo_split(pairs, cfg.seed)
        for name in splits:
            stems = [s for s in uav_split[name] if s in pairs]
            if not stems:
                continue
            grid = dict(pairs=pairs, stems=stems, name="uav")
            if name == "train":
                grid["max_negatives_per_photo"] = cfg.uav_max_negatives
            out.append(SetSpec("uav", name, "grid", "grid_tiles", grid))
            if name == "train" and cfg.uav_crops_per_photo:
                crops = dict(pairs=pairs, stems=stems, per_photo=cfg.uav_crops_per_photo, seed=cfg.seed + 2)
                if cfg.augment in ("none", "mixed"):
                    out.append(SetSpec("uav", name, "crops", "random_crops", crops | {"cfg": PLAIN_CROPS}))
                if aug is not None:
                    kind = "crops-aug" if cfg.augment == "mixed" else "crops"
                    out.append(SetSpec("uav", name, kind, "random_crops", crops | {"cfg": aug}))
    for folder in cfg.extra_sources:
        data = list_labelled(folder)
        split = make_split(data, cfg.seed, (70, 15, 15))
        source = Path(folder).name
        for name in splits:
            base = dict(root=folder, files=split.files[name], classes=list(data.classes), name=source)
            if split.files[name]:
                out.append(SetSpec(source, name, "clean", "patches", base))
            if name == "train" and aug is not None and split.files[name]:
                out.append(SetSpec(source, name, "aug", "patches", base | {"cfg": aug, "seed": cfg.seed + 1}))
    return out


def extract_all(model, set_specs: list[SetSpec], cache_dir) -> list[tuple[SetSpec, ms.FeatureSet]]:
    """Features of every set (cache hits cost a file read; misses build the images and run the backbone)."""
    from training import model as model_lib

    sha = model_lib.weights_fingerprint(model_lib.backbone_layers(model))
    fn = None
    out = []
    for spec in set_specs:
        hit = ms.load_cached(cache_dir, sha, spec.description()) if cache_dir else None
        if hit is None:
            fn = fn or model_lib.inference_fn(ms.extractor(model))
            log.info("building %s/%s/%s", spec.source, spec.split, spec.kind)
            image_set = spec.build()
            image_set.description = spec.description()
            hit = ms.extract_set(model, image_set, cache_dir, fn, sha)
            log.info("  %d inputs, %.0f s (%.0f img/s)", len(hit), hit.seconds, len(hit) / max(hit.seconds, 1e-9))
        out.append((spec, hit))
    return out


def stack(feature_sets, columns: np.ndarray):
    """``(x, y, source name per row)`` of several feature sets."""
    if not feature_sets:
        return np.zeros((0, len(columns)), np.float32), np.zeros(0, np.int64), []
    x = np.concatenate([f.rows[:, columns] for _, f in feature_sets]).astype(np.float32)
    y = np.concatenate([f.labels for _, f in feature_sets])
    names = [s.source for s, f in feature_sets for _ in range(len(f))]
    return x, y, names


def counts(feature_sets) -> dict:
    """Per source, split and kind: inputs per class (for the model card)."""
    out: dict = {}
    for spec, f in feature_sets:
        entry = out.setdefault(spec.source, {}).setdefault(spec.split, {})
        n_pos = int(f.labels.sum())
        entry[spec.kind] = {"Negative": int(len(f) - n_pos), "Positive": n_pos, "total": int(len(f))}
        if spec.kind == "grid":
            entry[spec.kind]["photos"] = len(set(f.groups))
            entry[spec.kind]["tile_sizes"] = sorted({int(t) for t in np.unique(f.tile_sizes)})
        elif spec.kind in ("crops", "crops-aug"):
            entry[spec.kind]["photos"] = len(set(f.groups))
            entry[spec.kind]["crop_sides"] = [int(f.tile_sizes.min()), int(f.tile_sizes.max())] if len(f) else []
    return out


def describe_sources(cfg: MultiConfig) -> dict:
    doc = {OZGENEL: {"dir": str(cfg.data_dir), "split": "split.json (by patch, per class)",
                     "train_per_class": cfg.train_per_class, "val_per_class": cfg.val_per_class}}
    if cfg.uav_images:
        doc["uav"] = {"images": str(cfg.uav_images), "masks": str(cfg.uav_masks),
                      "split": f"{sources.UAV_SPLIT_FILE} (by photo)", "grid_sizes": list(sources.GRID_SIZES),
                      "crops_per_photo": cfg.uav_crops_per_photo, "crop_sizes": [48, 320],
                      "max_negatives_per_photo_and_size": cfg.uav_max_negatives}
    for folder in cfg.extra_sources:
        doc[Path(folder).name] = {"dir": str(folder), "split": "70:15:15 per class (seed)"}
    return doc


def augment_doc(cfg: MultiConfig) -> dict:
    aug = cfg.augment_config()
    applies = {"none": "nothing: clean patches, grid tiles and plain random crops (random size and position)",
               "mixed": "clean patches + one augmented copy of each; grid tiles + plain random crops + "
                        "augmented random crops (as many again)"}.get(
        cfg.augment, "one augmented copy of every training patch, and every uav training crop")
    return {"name": cfg.augment, "draws": 1 if aug else 0, "config": aug.to_dict() if aug else None,
            "applies_to": applies,
            "chosen_by": "validation sets (Özgenel val sample + uav val photos' grid tiles at 224/112/64 px): "
                         "docs/training.md, 'Design choices'"}


def as_dict(cfg: MultiConfig) -> dict:
    d = asdict(cfg)
    d.pop("split")
    d.pop("uav_split")
    return d


def cache_dir_default() -> str:
    from training.features import default_cache_dir

    return str(default_cache_dir())


def env_cache() -> str | None:
    return os.environ.get("CRACKQ_FEATURE_CACHE")
