"""Scoring a classifier on a labelled folder: predictions plus small, pure metric functions.

Crack (class index 1) is the positive class.  The metric functions take
plain numpy arrays so tests can check them against hand-computed examples;
:func:`evaluate_folder` is what ``crackq evaluate`` and ``crackq train`` run.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from shared.model_card import read_card
from training.data import Split, iter_batches, labels_of, list_labelled, warn_skipped

log = logging.getLogger(__name__)

ECE_BINS = 15


def confusion_matrix(y_true, y_pred) -> np.ndarray:
    """2×2 counts ``[[tn, fp], [fn, tp]]``: rows are the true class, columns the predicted one."""
    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    cm = np.zeros((2, 2), np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def rates(cm) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of the positive class from a confusion matrix (0 when undefined)."""
    (tn, fp), (fn, tp) = np.asarray(cm, dtype=float)
    n = tn + fp + fn + tp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1}


def expected_calibration_error(probs, y_true, n_bins: int = ECE_BINS) -> float:
    """ECE on the predicted class's confidence: Σ_bins |bin| / n · |accuracy(bin) − mean confidence(bin)|.

    Bins are ``n_bins`` equal-width intervals of [0, 1], right-closed
    ((0, 1/15], …, (14/15, 1]), so a confidence of exactly 1 lands in the last bin.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true)
    if len(y_true) == 0:
        return 0.0
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def roc_auc(y_true, crack_score) -> float | None:
    """ROC-AUC of the crack probability; None when only one class is present."""
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        return None
    return float(roc_auc_score(y_true, crack_score))


def score(y_true, probs) -> dict:
    """Every reported metric for ``probs`` (N, 2) against integer labels ``y_true``."""
    probs = np.asarray(probs)
    cm = confusion_matrix(y_true, probs.argmax(axis=1))
    return {**rates(cm), "roc_auc": roc_auc(y_true, probs[:, 1]),
            "ece": expected_calibration_error(probs, y_true),
            "confusion_matrix": cm.tolist(), "n": int(len(y_true))}


def predict_files(model, root: str, files, batch_size: int, progress=None):
    """``(probs, kept_files, bad)``: crack probabilities of the readable ``files`` through the whole model."""
    from training.model import inference_fn

    fn = inference_fn(model)
    probs = np.zeros((len(files), 2), np.float32)
    ok = np.zeros(len(files), bool)
    bad: list[dict] = []
    for positions, images in iter_batches(root, list(files), batch_size, bad):
        probs[positions] = fn(images)
        ok[positions] = True
        if progress:
            progress(len(positions))
    return probs[ok], [f for f, keep in zip(files, ok) if keep], bad


def model_classes(model_path: str | os.PathLike) -> tuple[str, ...] | None:
    """Class names recorded in the model card beside the model, if there is one."""
    card = read_card(model_path)
    return tuple(card["classes"]) if "classes" in card else None


def select_files(data_dir: str, split: str | None = None, split_file: str | None = None):
    """``(classes, files)`` to score: a whole labelled folder, or one split recorded in ``split_file``."""
    if split is None:
        data = list_labelled(data_dir)
        return data.classes, list(data.files)
    if split_file is None:
        raise ValueError("--split needs --split-file (the split.json written by crackq train)")
    recorded = Split.load(split_file)
    return recorded.classes, recorded.files[split]


def evaluate_folder(model, data_dir: str, files, classes, batch_size: int, progress=None) -> dict:
    """Score ``model`` on ``files`` of ``data_dir``; unreadable images are skipped with a warning."""
    probs, kept, bad = predict_files(model, data_dir, files, batch_size, progress)
    warn_skipped(bad)
    result = score(labels_of(classes, kept), probs)
    result["skipped"] = len(bad)
    return result
