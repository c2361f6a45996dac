"""The shipped model's ONNX export, loaded for the producer side (labelling page, tile picking).

Workers use the full loader (``shared/inference.py``: precision, providers, a
TensorFlow backend), but ``producer/`` must not import ``worker/``; the
labelling page and ``crackq tiles export --strategy uncertain`` need only
"probability and pooled features of these tile inputs", which is this small
module.  It runs the same ``.onnx`` file with the same inputs
(:func:`shared.preprocessing.tiles_to_inputs`), so the probability a labeller
sees is the one a worker would serve.  The decision threshold is the model
card's ``threshold`` (written by ``crackq adapt``) when there is one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from shared.model_card import ModelInfo, card_threshold, onnx_path
from shared.serving import POOLED_DIM


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

        path = onnx_path(model_path)
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: export it with `crackq export {model_path}`")
        info = ModelInfo.from_model_path(model_path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return cls(session, info.crack_index, info.input_size, info.card)

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
