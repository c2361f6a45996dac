"""One training run: split, fit, save the whole model, score it, export ONNX, write card and plots.

Two ways to fit, same result format:

* **cached features** (frozen backbone, no augmentation — the default): the
  pooled features are computed once (:mod:`training.features`) and only the
  Dropout + Dense head is trained on them; its layers *are* the classifier's
  layers, so afterwards the whole image-in model is saved.
* **end to end** (``unfreeze_blocks > 0`` or ``augment``): images are decoded
  once into memory and streamed through ``tf.data`` and the whole model.

The metrics in the card are always measured by reloading the saved ``.keras``
file and running it on the decoded validation and test images, so they
describe the artefact that ships, not an intermediate.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.model_card import CARD_FILE, MODEL_FILE, ONNX_FILE, SPLIT_FILE, read_card, write_card  # noqa: F401
from training import card as card_lib
from training import features as features_lib
from training import model as model_lib
from training import plots, runs
from training.data import DEFAULT_RATIOS, Split, iter_batches, warn_skipped
from training.export import export_onnx
from training.progress import bar

log = logging.getLogger(__name__)



@dataclass
class TrainConfig:
    """Every option of ``crackq train``; the CLI takes its defaults from here."""

    data_dir: str
    out: str
    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 1e-3
    seed: int = 42
    ratios: tuple = DEFAULT_RATIOS
    backbone_weights: str = "imagenet"
    init_model: str | None = None
    unfreeze_blocks: int = 0
    augment: bool = False
    tensorboard: bool = False
    cache_dir: str | None = field(default_factory=lambda: str(features_lib.default_cache_dir()))
    limit_per_class: int | None = None
    # -- multi-source training (training/multitrain.py, issue 10) --
    extra_sources: tuple[str, ...] = ()
    uav_images: str | None = None
    uav_masks: str | None = None
    uav_split: str | None = None          # uav_split.json to reuse (default: a new seeded split by photo)
    head: str = "linear"                  # "linear": the recipe's Dropout+Dense on pooled; "mlp": hidden layer
    head_layers: tuple[str, ...] = ()     # earlier layers whose mean the head reads (multi-source only)
    hidden: int = 256
    augmentation: str = "mixed"           # multi-source: none | geometric | full | mixed
    train_per_class: int | None = 2500    # multi-source: Özgenel train patches per class
    val_per_class: int | None = 600       # multi-source: Özgenel val patches per class for the head's history
    uav_crops_per_photo: int = 40

    @property
    def end_to_end(self) -> bool:
        return self.unfreeze_blocks > 0 or self.augment

    @property
    def multi_source(self) -> bool:
        """More than the one labelled folder, or a head that reads more than ``pooled``."""
        return bool(self.extra_sources or self.uav_images or self.head != "linear" or self.head_layers)


def train(cfg: TrainConfig) -> dict:
    """Run the whole recipe and return the model card (also written to ``cfg.out``)."""
    if cfg.multi_source:
        from training.train_multi import train_multi

        return train_multi(cfg)

    start = time.perf_counter()
    out, data, split = runs.begin(cfg)
    model, backbone = _initial_model(cfg, data.classes)
    model_lib.set_trainable(model, cfg.unfreeze_blocks)
    log.info("training on %s", {k: v["total"] for k, v in split.counts().items()})

    fit = _fit_end_to_end if cfg.end_to_end else _fit_on_features
    history, extraction = fit(model, split, cfg)
    model.save(out / MODEL_FILE)
    train_seconds = time.perf_counter() - start

    shipped = model_lib.load_model(out / MODEL_FILE)
    metrics, test_pred = runs.score_splits(shipped, split, cfg.data_dir)
    split.save(out / SPLIT_FILE)
    images, labels, probs = runs.grid_examples(cfg.data_dir, split, test_pred)
    onnx_diff = export_onnx(shipped, out / ONNX_FILE, check_inputs=images if len(images) else None)
    _write_plots(out, history, metrics, images, labels, probs, split.classes)

    card = card_lib.build(cfg, split, backbone, history, extraction, metrics, train_seconds, onnx_diff,
                          model_lib.weights_fingerprint(model_lib.backbone_layers(shipped)))
    write_card(out, card)
    # The in-domain check describes this model's features, so it is refitted with every model.
    from training.domain_fit import fit_domain

    fit_domain(out / MODEL_FILE, cfg.data_dir, out / SPLIT_FILE, out)
    _export_int8(out / MODEL_FILE, cfg.data_dir)  # issue 15: the INT8 model, if it passes its gate
    return read_card(out)


def _export_int8(model_path: Path, data_dir: str) -> None:
    """``crackq export --int8`` on the new model; a model too small to calibrate or failing the gate ships
    FP32 only (workers then serve FP32), with a warning."""
    from training import quantize

    try:
        report = quantize.export_int8(model_path, data_dir)
        log.info("INT8 model %s: gate %s", report.path, report.holdout.to_dict())
    except (quantize.GateFailed, ValueError) as exc:
        quantize.int8_onnx_path(model_path).unlink(missing_ok=True)
        log.warning("no INT8 model: %s", exc)


def _initial_model(cfg: TrainConfig, classes):
    """A fresh classifier on ``cfg.backbone_weights``, or the ``--init-model`` one with its head weights."""
    if not cfg.init_model:
        weights = None if cfg.backbone_weights in ("", "none") else cfg.backbone_weights
        return model_lib.build_model(weights), model_lib.backbone_source(weights)
    model = model_lib.load_model(cfg.init_model)
    init_card = Path(cfg.init_model).with_name(CARD_FILE)
    backbone = {"source": "init model", "note": "backbone of the --init-model model"}
    if init_card.exists():
        doc = json.loads(init_card.read_text(encoding="utf-8"))
        if tuple(doc["classes"]) != tuple(classes):
            raise ValueError(f"classes {list(classes)} differ from the init model's {doc['classes']}")
        backbone = doc.get("backbone", {}).get("weights", backbone)
    return model, backbone


def _compile(model, cfg: TrainConfig) -> None:
    import keras

    model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def _callbacks(cfg: TrainConfig) -> list:
    import importlib.util

    import keras

    if not cfg.tensorboard:
        return []
    if importlib.util.find_spec("tensorboard") is None:  # tensorflow-cpu does not always pull it in
        raise RuntimeError("--tensorboard needs the tensorboard package: pip install tensorboard")
    return [keras.callbacks.TensorBoard(log_dir=str(Path(cfg.out) / "logs"))]


def _fit_on_features(model, split: Split, cfg: TrainConfig):
    """Extract (or load cached) features of train+val once, then fit only the head on them."""
    files = split.files["train"] + split.files["val"]
    with bar("backbone features", len(files)) as advance:
        feats = features_lib.extract(model, cfg.data_dir, files, cfg.cache_dir, advance)
    warn_skipped(feats.bad)
    split.drop(feats.bad)
    head = model_lib.head_model(model)
    _compile(head, cfg)
    x_train, y_train = feats.rows(split.files["train"]), split.labels("train")
    val = (feats.rows(split.files["val"]), split.labels("val")) if split.files["val"] else None
    history = head.fit(x_train, y_train, batch_size=cfg.batch_size, epochs=cfg.epochs, validation_data=val,
                       shuffle=True, verbose=2, callbacks=_callbacks(cfg))
    extraction = {"mode": "cached-features", "cached": feats.cached, "seconds": round(feats.seconds, 2),
                  "images_per_second": feats.images_per_second and round(feats.images_per_second, 1)}
    return _plain(history.history), extraction


def _fit_end_to_end(model, split: Split, cfg: TrainConfig):
    """Decode train+val into memory once, then fit the whole model through tf.data."""
    import tensorflow as tf

    def dataset(name: str, training: bool):
        images, kept = decode_all(cfg.data_dir, split, name)
        ds = tf.data.Dataset.from_tensor_slices((images, split.labels(name)))
        if training:
            ds = ds.shuffle(len(kept), seed=cfg.seed, reshuffle_each_iteration=True)
        ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y))
        if training and cfg.augment:
            ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE)

    if cfg.unfreeze_blocks and cfg.learning_rate > 1e-4:
        log.warning("unfreezing backbone blocks at learning rate %g can wreck the pretrained features; "
                    "fine-tuning usually wants ~1e-5 (and --init-model for a trained head)", cfg.learning_rate)
    train_ds = dataset("train", True)
    val_ds = dataset("val", False) if split.files["val"] else None
    _compile(model, cfg)
    history = model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, verbose=2,
                        shuffle=False,  # the dataset reshuffles itself each epoch
                        callbacks=_callbacks(cfg))
    return _plain(history.history), {"mode": "end-to-end", "augment": cfg.augment,
                                     "unfreeze_blocks": cfg.unfreeze_blocks}


def decode_all(root: str, split: Split, name: str):
    """All readable images of one split as a uint8 array; unreadable ones are dropped from the split."""
    files = split.files[name]
    images = np.zeros((len(files), model_lib.INPUT_SIZE, model_lib.INPUT_SIZE, 3), np.uint8)
    ok = np.zeros(len(files), bool)
    bad: list[dict] = []
    with bar(f"decode {name}", len(files)) as advance:
        for positions, batch in iter_batches(root, files, runs.EVAL_BATCH, bad):
            images[positions], ok[positions] = batch, True
            advance(len(positions))
    warn_skipped(bad)
    split.drop(bad)
    return images[ok], split.files[name]


def augment(image, label):
    """Random flips, a random multiple of 90° and ±10 % brightness on float 0–255 pixels:
    a crack is a crack in any orientation and light."""
    import tensorflow as tf

    image = tf.image.random_flip_left_right(image)
    image = tf.image.random_flip_up_down(image)
    image = tf.image.rot90(image, k=tf.random.uniform([], 0, 4, dtype=tf.int32))
    return tf.clip_by_value(image + tf.random.uniform([], -25.5, 25.5), 0, 255), label


def _write_plots(out: Path, history, metrics, images, labels, probs, classes) -> None:
    plots.training_curves(history, out / "plots" / "training_curves.png")
    if "test" in metrics:
        plots.confusion_matrix(metrics["test"]["confusion_matrix"], classes, out / "plots" / "confusion_matrix.png")
        plots.prediction_grid(images, labels, probs, classes, out / "plots" / "test_predictions.png")


def _plain(history: dict) -> dict:
    return {k: [float(v) for v in values] for k, values in history.items()}
