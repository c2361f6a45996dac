"""The shipped model's ONNX export, loaded for the producer side (labelling page, tile picking).

Workers have their own loader (``worker/inference.py``, with metrics and a
TensorFlow backend), but ``producer/`` must not import ``worker/``; the
labelling page and ``crackq tiles export --strategy uncertain`` need only
"probability and pooled features of these tile inputs", which is this small
module.  It runs the same ``.onnx`` file with the same inputs
(:func:`shared.preprocessing.tiles_to_inputs`), so the probability a labeller
sees is the one a worker would serve.  The decision threshold is the model
card's ``threshold`` (written by ``crackq adapt``) when there is one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.preprocessing import INPUT_SIZE
from shared.serving import POOLED_DIM

CRACK_CLASS_NAMES = ("Positive", "positive", "crack", "Crack", "cracked")


def card_threshold(card: dict, default: float = 0.5) -> float:
    """The decision threshold a model card records (``threshold.value``), else ``default``."""
    entry = card.get("threshold")
    if isinstance(entry, dict):
        entry = entry.get("value")
    return float(entry) if isinstance(entry, (int, float)) else default


def read_card(model_path: str | os.PathLike) -> dict:
    path = Path(model_path).with_name("model_card.json")
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


@dataclass
class OnnxModel:
    """``predict(uint8 N×S×S×3) -> (crack probability (N,), pooled features (N, 1280))``."""

    session: object
    crack_index: int
    input_size: int
    card: dict
    batch_size: int = 32

    @classmethod
    def load(cls, model_path: str | os.PathLike, threads: int = 0) -> "OnnxModel":
        import onnxruntime as ort

        onnx_path = Path(model_path).with_suffix(".onnx")
        if not onnx_path.exists():
            raise FileNotFoundError(f"{onnx_path} not found: export it with `crackq export {model_path}`")
        card = read_card(model_path)
        classes = card.get("classes", ["Negative", "Positive"])
        positive = card.get("positive_class")
        crack_index = (classes.index(positive) if positive in classes else
                       next((i for i, c in enumerate(classes) if c in CRACK_CLASS_NAMES), len(classes) - 1))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        size = card.get("input", {}).get("size", [INPUT_SIZE])[0]
        return cls(session, crack_index, int(size), card)

    def threshold(self, default: float = 0.5) -> float:
        return card_threshold(self.card, default)

    def predict(self, images: np.ndarray, pooled_only: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and features; ``pooled_only=False`` keeps the texture statistics too (all served
        ``features`` columns, as the in-domain check reads them)."""
        width = POOLED_DIM if pooled_only else None
        probs, feats = [], []
        for start in range(0, len(images), self.batch_size):
            batch = np.asarray(images[start:start + self.batch_size], dtype=np.float32)
            p, f = self.session.run(["probabilities", "features"], {"image": batch})
            probs.append(p[:, self.crack_index])
            feats.append(f[:, :width])
        if not probs:
            return np.zeros((0,), np.float32), np.zeros((0, width or 0), np.float32)
        return np.concatenate(probs), np.concatenate(feats)
