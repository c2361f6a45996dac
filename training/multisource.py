"""Multi-source training on cached frozen features: extract once, fit the head in seconds, ship one model.

With the backbone frozen, a training image only ever matters through the
backbone's activations, so every (image, augmentation draw) is pushed
through MobileNetV2 once and a compact feature vector is cached on disk:

* the serving ``features`` (``pooled`` 1280 + texture statistics, exactly as
  :func:`shared.serving.serving_model` builds them), and
* the global average of earlier layers (:data:`EXTRA_LAYERS`), which keep the
  thin, local evidence of a crack that the last 5×5 layer averages away.

The head (:class:`HeadConfig`: which extra layers, hidden units, dropout) is
trained on those rows, then its weights are set into the full image-in Keras
model (:func:`training.model.build_model` with the same head), so serving is
one model with the outputs workers expect.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from shared.serving import DOMAIN_STAT_LAYERS, POOLED_DIM, feature_layout
from training import model as model_lib

log = logging.getLogger(__name__)

#: Earlier layers whose per-channel spatial mean the head may read (name -> channels).
EXTRA_LAYERS = {"block_13_expand_relu": 576, "block_10_expand_relu": 384, "block_6_expand_relu": 192}
SERVING_DIM = feature_layout()[-1][2]
LAYOUT_VERSION = 1
EXTRACT_BATCH = 64


def column_layout() -> dict[str, tuple[int, int]]:
    """Columns of a cached row: ``serving`` (pooled + stats), then one block per extra layer."""
    out = {"pooled": (0, POOLED_DIM), "serving": (0, SERVING_DIM)}
    start = SERVING_DIM
    for name, channels in EXTRA_LAYERS.items():
        out[name] = (start, start + channels)
        start += channels
    return out


ROW_DIM = column_layout()[list(EXTRA_LAYERS)[-1]][1]


def extractor(model):
    """Image -> cached row (serving features, then the mean of each extra layer)."""
    import keras

    from shared.serving import serving_model

    parts = [serving_model(model).output["features"]]
    for name in EXTRA_LAYERS:
        parts.append(keras.ops.mean(model.get_layer(name).output, axis=(1, 2)))
    return keras.Model(model.inputs, keras.layers.Concatenate(axis=-1)(parts), name="extractor")


def cache_key(backbone_sha: str, description: dict) -> str:
    doc = {"backbone": backbone_sha, "layout": LAYOUT_VERSION, "extra": EXTRA_LAYERS,
           "stats": DOMAIN_STAT_LAYERS, "set": description}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class FeatureSet:
    """Cached rows of one :class:`training.sources.ImageSet` (images dropped)."""

    name: str
    rows: np.ndarray            # (N, ROW_DIM) float16
    labels: np.ndarray
    groups: list[str]
    tile_sizes: np.ndarray
    seconds: float = 0.0
    cached: bool = False

    def __len__(self) -> int:
        return len(self.labels)


def load_cached(cache_dir, backbone_sha: str, description: dict) -> FeatureSet | None:
    path = Path(cache_dir) / "multisource" / f"{cache_key(backbone_sha, description)}.npz"
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as npz:
        return FeatureSet(str(npz["name"]), npz["rows"], npz["labels"], json.loads(str(npz["groups"])),
                          npz["tile_sizes"], cached=True)


def extract_set(model, image_set, cache_dir=None, fn=None, backbone_sha: str | None = None) -> FeatureSet:
    """Rows of ``image_set`` through the frozen backbone (cached under ``cache_dir`` by its description)."""
    backbone_sha = backbone_sha or model_lib.weights_fingerprint(model_lib.backbone_layers(model))
    if cache_dir is not None:
        hit = load_cached(cache_dir, backbone_sha, image_set.description)
        if hit is not None:
            return hit
    fn = fn or model_lib.inference_fn(extractor(model))
    start = time.perf_counter()
    rows = np.zeros((len(image_set), ROW_DIM), np.float16)
    for i in range(0, len(image_set), EXTRACT_BATCH):
        rows[i:i + EXTRACT_BATCH] = fn(image_set.images[i:i + EXTRACT_BATCH].astype(np.float32))
    out = FeatureSet(image_set.name, rows, image_set.labels, list(image_set.groups), image_set.tile_sizes,
                     time.perf_counter() - start)
    if cache_dir is not None:
        path = Path(cache_dir) / "multisource" / f"{cache_key(backbone_sha, image_set.description)}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, name=np.array(out.name), rows=rows, labels=out.labels,
                 groups=np.array(json.dumps(out.groups)), tile_sizes=out.tile_sizes)
        os.replace(tmp, path)
    return out


# -- the head ---------------------------------------------------------------
@dataclass(frozen=True)
class HeadConfig:
    """The classifier head: what it reads (``pooled`` + ``extra`` layer means) and its shape."""

    extra: tuple[str, ...] = ("block_13_expand_relu",)
    hidden: int = 256
    dropout: float = 0.3
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 1e-3
    l2: float = 1e-4

    def to_dict(self) -> dict:
        return asdict(self)


def head_columns(cfg: HeadConfig) -> np.ndarray:
    """Row columns the head reads, in the order the full model concatenates them."""
    layout = column_layout()
    cols = [np.arange(*layout["pooled"])] + [np.arange(*layout[name]) for name in cfg.extra]
    return np.concatenate(cols)


def source_weights(names: list[str]) -> np.ndarray:
    """Sample weights that give every source (and within it every class) the same total weight."""
    names = np.asarray(names)
    w = np.zeros(len(names), np.float32)
    for n in np.unique(names):
        w[names == n] = len(names) / (len(np.unique(names)) * (names == n).sum())
    return w


def fit_head(model, train_x: np.ndarray, train_y: np.ndarray, cfg: HeadConfig, weights=None,
             val=None, seed: int = 0, verbose: int = 0) -> dict:
    """Fit the head layers of ``model`` (built with ``cfg``) on cached head inputs; returns the history.

    The head learns on standardised inputs; the standardisation is then folded
    into its first Dense layer (``W / std``, ``b - mean / std @ W``), so the
    saved model reads raw features and exports to plain ONNX constants.
    """
    import keras

    keras.utils.set_random_seed(seed)
    x = train_x.astype(np.float32)
    mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-3)
    head = model_lib.head_model(model)
    # Cosine decay to zero: at a constant rate the last epoch's validation accuracy on the uav tiles swung
    # by +-5 points from epoch to epoch; decayed, the epoch that is saved is a settled one.
    steps = cfg.epochs * int(np.ceil(len(x) / cfg.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, decay_steps=max(1, steps))
    head.compile(optimizer=keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy",
                 metrics=["accuracy"])
    if val is not None:
        val = ((val[0].astype(np.float32) - mean) / std, val[1])
    history = head.fit((x - mean) / std, train_y, sample_weight=weights, batch_size=cfg.batch_size,
                       epochs=cfg.epochs, validation_data=val, shuffle=True, verbose=verbose)
    fold_standardisation(model, mean, std)
    return {k: [float(v) for v in vs] for k, vs in history.history.items()}


def fold_standardisation(model, mean: np.ndarray, std: np.ndarray) -> None:
    """Make the first Dense layer of the head read raw inputs instead of ``(x - mean) / std``."""
    names = [layer.name for layer in model.layers]
    first = model.get_layer(model_lib.HIDDEN_LAYER if model_lib.HIDDEN_LAYER in names else model_lib.OUTPUT_LAYER)
    kernel, bias = first.get_weights()
    first.set_weights([(kernel / std[:, None]).astype(np.float32),
                       (bias - (mean / std) @ kernel).astype(np.float32)])


def predict_head(model, x: np.ndarray) -> np.ndarray:
    """Crack probabilities (N, 2) of cached head inputs through ``model``'s head."""
    fn = model_lib.inference_fn(model_lib.head_model(model))
    return np.concatenate([fn(x[i:i + 4096].astype(np.float32)) for i in range(0, len(x), 4096)]) \
        if len(x) else np.zeros((0, 2), np.float32)
