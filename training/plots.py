"""The three PNGs of a training run: learning curves, test confusion matrix, test prediction grid."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def training_curves(history: dict, path: str | os.PathLike) -> None:
    """Loss and accuracy per epoch, train vs validation."""
    plt = _pyplot()
    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, history[key], "o-", label="train")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], "o-", label="validation")
        ax.set(xlabel="epoch", ylabel=key, title=key)
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def confusion_matrix(cm, classes, path: str | os.PathLike, title: str = "test split") -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay(np.asarray(cm), display_labels=list(classes)).plot(ax=ax, cmap="Blues", colorbar=False)
    ax.set_title(f"Confusion matrix ({title})")
    _save(fig, path)


def prediction_grid(images, y_true, probs, classes, path: str | os.PathLike, cols: int = 8) -> None:
    """Thumbnails titled ``pred (p) / true``; wrong predictions in red."""
    plt = _pyplot()
    rows = max(1, int(np.ceil(len(images) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 2.0 + 0.4))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, img, true, p in zip(np.ravel(axes), images, y_true, probs):
        pred = int(np.argmax(p))
        ax.imshow(img)
        ax.set_title(f"{classes[pred]} {p[pred]:.2f}\ntrue {classes[true]}", fontsize=7,
                     color="red" if pred != true else "black")
    fig.suptitle("Test predictions (red = wrong)")
    _save(fig, path)


def _save(fig, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    fig.clear()
    _pyplot().close(fig)
