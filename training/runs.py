"""The steps every training run shares (``crackq train``'s single- and multi-source recipes).

Kept apart from both recipes so neither imports the other: the split, the
scores of the saved model, the examples of the prediction grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.data import Split, iter_batches, list_labelled, make_split, warn_skipped
from training.evaluate import predict_files, score
from training.progress import bar

EVAL_BATCH = 64
GRID_IMAGES = 32


def begin(cfg):
    """``(out folder, labelled folder, split)`` of a run: the folder made, the seed set, the split drawn."""
    import keras

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(cfg.seed)
    data = list_labelled(cfg.data_dir)
    return out, data, make_split(data, cfg.seed, cfg.ratios, cfg.limit_per_class)


def score_splits(model, split: Split, root: str):
    """Metrics of the saved model on val and test images; returns them and the test predictions."""
    metrics, test_pred = {}, None
    for name, key in (("val", "validation"), ("test", "test")):
        files = split.files[name]
        if not files:
            continue
        with bar(f"score {name}", len(files)) as advance:
            probs, kept, bad = predict_files(model, root, files, EVAL_BATCH, advance)
        warn_skipped(bad)
        split.drop(bad)
        metrics[key] = score(split.labels(name), probs)
        if name == "test":
            test_pred = (kept, probs)
    return metrics, test_pred


def grid_examples(root: str, split: Split, test_pred):
    """Up to 32 test images for the prediction grid and the ONNX check: every mistake first, then the rest."""
    if test_pred is None:
        return np.zeros((0,)), np.zeros((0,), int), np.zeros((0, 2))
    files, probs = test_pred
    labels = split.labels("test")
    wrong = np.flatnonzero(probs.argmax(axis=1) != labels)
    right = np.random.default_rng(0).permutation(np.flatnonzero(probs.argmax(axis=1) == labels))
    chosen = np.concatenate([wrong, right])[:GRID_IMAGES]
    images = np.concatenate([b for _, b in iter_batches(root, [files[i] for i in chosen], EVAL_BATCH, [])])
    return images, labels[chosen], probs[chosen]
