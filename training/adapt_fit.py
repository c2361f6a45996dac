"""The numerical core of ``crackq adapt``: views, class balancing, the head, folds, the threshold.

Both stages of the fine-tune use it - the head on frozen features
(:mod:`training.adapt`) and the optional top-blocks stage
(:mod:`training.adapt_deep`) - so it lives apart from both: ``adapt`` imports
``adapt_deep`` and both import this module, and neither imports the other
back (no import cycle).  Nothing here imports TensorFlow.

Rows are the cached feature rows of :mod:`training.multisource` (serving
features, then the spatial means of earlier layers); a :class:`Head` reads
the columns it was fitted on (:data:`HEAD_LAYERS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.serving import POOLED_DIM

#: Inverse regularisation strengths tried by cross-validation.
C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3)
VIEWS = 8


def dihedral(images: np.ndarray) -> list[np.ndarray]:
    """The 8 flips / quarter-turns of a batch (N, H, W, 3); the first is the batch itself."""
    out = []
    for flip in (False, True):
        base = images[:, :, ::-1] if flip else images
        for k in range(4):
            out.append(np.ascontiguousarray(np.rot90(base, k, axes=(1, 2))))
    return out


@dataclass
class Head:
    """p(crack) = sigmoid(rows[:, columns] @ w + b): a Dense softmax head in closed form."""

    w: np.ndarray
    b: float
    columns: np.ndarray          # row columns it reads (pooled first, then earlier-layer means)

    def prob(self, rows: np.ndarray) -> np.ndarray:
        z = rows[:, self.columns].astype(np.float64) @ self.w + self.b
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def pooled_columns() -> np.ndarray:
    return np.arange(POOLED_DIM)


def balanced_weights(y: np.ndarray, total: float) -> np.ndarray:
    """Sample weights summing to ``total``, split evenly between the classes present."""
    counts = np.bincount(y, minlength=2).astype(float)
    present = counts > 0
    per = np.where(present, total / present.sum() / np.maximum(counts, 1), 0.0)
    return per[y]


def training_set(new, rows: np.ndarray, replay, replay_weight: float):
    """Rows, labels and sample weights: each new class weighs 1/2 in total (over all its views), the replay
    sample ``replay_weight`` in total, also split evenly between classes.

    ``new`` has ``views`` (V, N, D) and ``y``; ``replay`` (or None) has ``train`` and ``y_train``.
    """
    x = [new.views[:, rows].reshape(-1, new.views.shape[-1])]
    y = [np.tile(new.y[rows], new.views.shape[0])]
    w = [balanced_weights(y[0], 1.0)]
    if replay is not None and len(replay.train) and replay_weight > 0:
        x.append(replay.train)
        y.append(replay.y_train)
        w.append(balanced_weights(replay.y_train, replay_weight))
    return np.concatenate(x), np.concatenate(y), np.concatenate(w)


def fit_head(x: np.ndarray, y: np.ndarray, w: np.ndarray, c: float, columns: np.ndarray) -> Head:
    """L2 logistic regression on standardised ``x[:, columns]``, folded back into raw-feature weights."""
    from sklearn.linear_model import LogisticRegression

    x = x[:, columns].astype(np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    lr = LogisticRegression(C=c, max_iter=500, tol=1e-5)
    lr.fit((x - mean) / std, y, sample_weight=w / w.sum() * 100)  # C keeps its meaning for any sample count
    coef = lr.coef_[0] / std
    return Head(coef, float(lr.intercept_[0] - coef @ mean), np.asarray(columns))


def folds_of(new, k: int, seed: int) -> list[np.ndarray]:
    """Held-out row indices of each fold: stratified, grouped by photo where there are enough photos."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    k = max(2, min(k, int(np.bincount(new.y).min())))
    rows = np.arange(len(new.y))
    if new.grouped:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        return [test for _, test in splitter.split(rows, new.y, new.groups)]
    return [test for _, test in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(rows, new.y)]


def balanced_accuracy(y: np.ndarray, p: np.ndarray, t: float) -> float:
    pred = p >= t
    recalls = [float(np.mean(pred[y == c] == bool(c))) for c in (0, 1) if np.any(y == c)]
    return float(np.mean(recalls)) if recalls else float("nan")


def best_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold with the highest balanced accuracy on (y, p): midway between neighbouring scores,
    ties broken towards 0.5 (the least surprising choice)."""
    values = np.unique(np.concatenate([p, [0.0, 1.0]]))
    candidates = np.concatenate([[0.5], (values[:-1] + values[1:]) / 2])
    scores = np.array([balanced_accuracy(y, p, t) for t in candidates])
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def estimate(cv: dict) -> float:
    """Cross-validated balanced accuracy of what ships: tuned threshold when it generalises, else 0.5."""
    return max(cv["balanced_accuracy"], cv["at_0_5"])


def choose_threshold(y: np.ndarray, cv: dict) -> float:
    """The out-of-fold best threshold, but only when that measures better than 0.5.

    ``cv["balanced_accuracy"]`` scores each fold at a threshold tuned on the other folds; when that is
    no better than plain 0.5 on the same out-of-fold probabilities, tuning does not generalise (picked
    tiles crowd the boundary, so their best threshold is noisy) and 0.5 is kept.
    """
    if cv["balanced_accuracy"] <= cv["at_0_5"]:
        return 0.5
    return best_threshold(y, cv["oof"])


def score_folds(y: np.ndarray, folds: list[np.ndarray], oof: np.ndarray) -> dict:
    """Per-fold balanced accuracy at a threshold chosen on the *other* folds' out-of-fold probabilities."""
    per_fold = []
    for held in folds:
        rest = np.setdiff1d(np.arange(len(y)), held)
        per_fold.append(balanced_accuracy(y[held], oof[held], best_threshold(y[rest], oof[rest])))
    return {"oof": oof, "balanced_accuracy": float(np.mean(per_fold)), "per_fold": per_fold,
            "folds": len(folds), "at_0_5": balanced_accuracy(y, oof, 0.5)}


def cross_validate(new, folds: list[np.ndarray], fit_fn) -> dict:
    """Out-of-fold probabilities of ``fit_fn(rows) -> predict(rows of the identity view)``, scored by
    :func:`score_folds`."""
    oof = np.zeros(len(new.y))
    for held in folds:
        rows = np.setdiff1d(np.arange(len(new.y)), held)
        oof[held] = fit_fn(rows)(new.views[0, held])
    return score_folds(new.y, folds, oof)
