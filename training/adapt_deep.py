"""The optional second stage of ``crackq adapt``: fine-tune the top backbone blocks as well as the head.

A head on frozen features can only re-weigh what the backbone already sees;
on imagery far from the training set that is not enough.  Training the top
blocks is normally too slow for a CPU, but everything below the cut
(``block_13_project_BN``, 5×5×160 at 160 px) stays frozen, so its
activations are computed once per tile view and cached, and only blocks
14-16, ``Conv_1`` and the head are trained, on 5×5 maps: seconds per epoch.
BatchNorm layers stay frozen (inference mode, :func:`training.model.set_trainable`).

The head it trains is the adapted head (:func:`training.adapt_head.linear_head`),
started from the frozen-feature fit; the earlier-layer means it also reads lie
below the cut, so they enter the trained part as fixed inputs, taken from the
cached feature rows.  It is cross-validated on the same folds as the head, and
under ``auto`` it is kept only when its cross-validated balanced accuracy beats
the head's.  It imports :mod:`training.adapt_fit` and
:mod:`training.adapt_head`, never :mod:`training.adapt` (which imports it).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.adapt_fit import (balanced_weights, dihedral, estimate, fit_head, folds_of, score_folds,
                                training_set)
from training.adapt_head import linear_head

CUT_LAYER = "block_13_project_BN"
AUTO_BLOCKS = 2
EPOCHS = 6
BATCH = 64
LEARNING_RATE = 2e-4


@dataclass
class DeepResult:
    blocks: int
    kept: bool
    cv: dict
    head_cv: float
    weights: dict = field(default_factory=dict)    # layer name -> weights of every trainable layer
    replay_test_probs: np.ndarray | None = None
    pooled: dict = field(default_factory=dict)     # "new", "replay_train", "replay_val", "replay_test" -> pooled
    seconds: float = 0.0

    def apply(self, model) -> None:
        for name, weights in self.weights.items():
            model.get_layer(name).set_weights(weights)

    def summary(self) -> dict:
        return {"blocks": self.blocks, "kept": self.kept, "cut_layer": CUT_LAYER, "epochs": EPOCHS,
                "learning_rate": LEARNING_RATE, "cv_balanced_accuracy": round(self.cv["balanced_accuracy"], 4),
                "head_only_cv_balanced_accuracy": round(self.head_cv, 4), "seconds": round(self.seconds, 1)}


def maybe_unfreeze(cfg, new, replay, head, head_cv: dict, progress) -> DeepResult:
    """Cross-validate the top-blocks fine-tune; fit it on everything when kept.

    ``head``: ``{"C": ..., "columns": ...}`` of the frozen-feature head it starts from.
    """
    import time

    import keras

    from training.model import OUTPUT_LAYER, load_model, set_trainable

    started = time.perf_counter()
    blocks = AUTO_BLOCKS if cfg.unfreeze_blocks == "auto" else int(cfg.unfreeze_blocks)
    keras.utils.set_random_seed(cfg.seed)
    layers = tuple(cfg.head_layers)
    cut = _cut_activations(load_model(cfg.init_model), new, replay, cfg)
    progress(f"unfreeze {blocks} block(s): activations at {CUT_LAYER} ready in {time.perf_counter() - started:.0f}s")

    def build():
        model = linear_head(load_model(cfg.init_model), layers)
        set_trainable(model, blocks)
        ins = [model.get_layer(CUT_LAYER).output] + [model.get_layer(f"mean_{n}").output for n in layers]
        return model, keras.Model(ins, model.output)

    def train(rows):
        model, top = build()
        h = fit_head(*training_set(new, rows, replay, cfg.replay_weight), head["C"], head["columns"])
        model.get_layer(OUTPUT_LAYER).set_weights([np.stack([-h.w / 2, h.w / 2], 1).astype(np.float32),
                                                   np.array([-h.b / 2, h.b / 2], np.float32)])
        x, y, w = _training_arrays(cut, new, rows, replay, cfg.replay_weight, layers)
        top.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss="sparse_categorical_crossentropy")
        top.fit(x, y, sample_weight=w * len(w) / w.sum(), batch_size=BATCH, epochs=EPOCHS, shuffle=True, verbose=0)
        return model, top

    new_inputs = [cut["new"][0]] + _means(new.views[0], layers)
    folds = folds_of(new, cfg.folds, cfg.seed)
    oof = np.zeros(len(new.y))
    for k, held in enumerate(folds):
        _, top = train(np.setdiff1d(np.arange(len(new.y)), held))
        oof[held] = top.predict([x[held] for x in new_inputs], batch_size=256, verbose=0)[:, 1]
        progress(f"unfreeze: fold {k + 1}/{len(folds)} done")
    cv = score_folds(new.y, folds, oof)
    kept = cfg.unfreeze_blocks != "auto" or estimate(cv) > estimate(head_cv)
    progress(f"unfreeze {blocks} block(s): cross-validated balanced accuracy {cv['balanced_accuracy']:.3f} "
             f"(head only {head_cv['balanced_accuracy']:.3f}): {'kept' if kept else 'not kept'}")
    result = DeepResult(blocks, kept, cv, estimate(head_cv))
    if kept:
        model, top = train(np.arange(len(new.y)))
        result.weights = {layer.name: layer.get_weights() for layer in model.layers if layer.trainable and layer.weights}
        pooled = keras.Model(model.get_layer(CUT_LAYER).output, model.get_layer("pooled").output)
        result.pooled["new"] = pooled.predict(cut["new"][0], batch_size=256, verbose=0)
        for name in ("train", "val", "test"):
            if replay is not None and len(cut[f"replay_{name}"]):
                result.pooled[f"replay_{name}"] = pooled.predict(cut[f"replay_{name}"], batch_size=256, verbose=0)
        if replay is not None and len(cut["replay_test"]):
            result.replay_test_probs = top.predict([cut["replay_test"]] + _means(replay.test, layers),
                                                   batch_size=256, verbose=0)[:, 1]
    result.seconds = time.perf_counter() - started
    return result


def _means(rows: np.ndarray, layers: tuple[str, ...]) -> list[np.ndarray]:
    """The earlier-layer means the head reads, cut out of feature rows (one array per layer)."""
    from training.multisource import column_layout

    layout = column_layout()
    return [rows[..., layout[n][0]:layout[n][1]] for n in layers]


def _training_arrays(cut: dict, new, rows, replay, replay_weight: float, layers: tuple[str, ...]):
    views = cut["new"][:, rows]
    x = [[views.reshape(-1, *views.shape[2:])]
         + [m.reshape(-1, m.shape[-1]) for m in _means(new.views[:, rows], layers)]]
    y = [np.tile(new.y[rows], views.shape[0])]
    w = [balanced_weights(y[0], 1.0)]
    if replay is not None and len(cut["replay_train"]) and replay_weight > 0:
        x.append([cut["replay_train"]] + _means(replay.train, layers))
        y.append(replay.y_train)
        w.append(balanced_weights(replay.y_train, replay_weight))
    inputs = [np.concatenate(parts) for parts in zip(*x)]
    return inputs if len(inputs) > 1 else inputs[0], np.concatenate(y), np.concatenate(w)


def _cut_activations(model, new, replay, cfg) -> dict:
    """Activations at the cut for every view of the new tiles and for the replay images (cached on disk)."""
    import keras

    from training.data import iter_batches
    from training.model import inference_fn, weights_fingerprint, backbone_layers

    bottom = inference_fn(keras.Model(model.inputs, model.get_layer(CUT_LAYER).output))
    views = dihedral(new.images) if new.views.shape[0] > 1 else [new.images]
    out = {"new": np.stack([_run(bottom, v) for v in views])}
    fingerprint = weights_fingerprint(backbone_layers(model)[:_index(model, CUT_LAYER) + 1])
    for name in ("train", "val", "test"):
        files = replay.files[name] if replay is not None else []
        out[f"replay_{name}"] = _cached(fingerprint, replay.source["dir"] if replay else "", files, cfg.cache_dir,
                                        lambda fs: _run_files(bottom, replay.source["dir"], fs, iter_batches))
    return out


def _index(model, name: str) -> int:
    return [layer.name for layer in model.layers].index(name)


def _run(fn, images: np.ndarray) -> np.ndarray:
    return np.concatenate([fn(images[i:i + 64].astype(np.float32)) for i in range(0, len(images), 64)])


def _run_files(fn, root, files, iter_batches) -> np.ndarray:
    parts = [fn(b.astype(np.float32)) for _, b in iter_batches(root, files, 64, [])]
    return np.concatenate(parts) if parts else np.zeros((0, 5, 5, 160), np.float32)


def _cached(fingerprint: str, root: str, files: list[str], cache_dir, compute) -> np.ndarray:
    if not files:
        return np.zeros((0, 5, 5, 160), np.float32)
    path = None
    if cache_dir:
        key = hashlib.sha256(json.dumps([fingerprint, CUT_LAYER, os.path.realpath(root), files]).encode()).hexdigest()
        path = Path(cache_dir) / "adapt" / f"cut-{key}.npy"
        if path.exists():
            return np.load(path)
    acts = compute(files)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path.with_suffix(".tmp.npy"), acts)
        os.replace(path.with_suffix(".tmp.npy"), path)
    return acts
