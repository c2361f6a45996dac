"""A model's files and its card: the one place that names them and reads them.

Training writes a model folder (``crackq train``, ``crackq adapt``); workers,
the producer's labelling page and ``crackq evaluate`` read it.  The file names
and the card's fields they rely on are defined here once, so a rename cannot
leave one reader behind.

A model folder holds ``MODEL_FILE`` (Keras), its FP32 ONNX export
(:func:`onnx_path`), maybe an INT8 export (:func:`int8_onnx_path`), the
card (``CARD_FILE``), the split it was trained on (``SPLIT_FILE``) and the
in-domain description (``domain.npz``, :mod:`shared.domain`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

MODEL_FILE = "crackq_mobilenetv2.keras"
ONNX_FILE = "crackq_mobilenetv2.onnx"
CARD_FILE = "model_card.json"
SPLIT_FILE = "split.json"
#: What a model folder ships, in the order ``crackq adapt`` copies it.
MODEL_ARTIFACTS = (MODEL_FILE, ONNX_FILE, CARD_FILE, SPLIT_FILE)

#: ONNX metadata key of an INT8 model: the sha256 of the FP32 ONNX it was quantized from.
INT8_SOURCE_KEY = "crackq.fp32_onnx_sha256"
#: ONNX metadata key of an INT8 model: "true" when it passed the accuracy gate on every labelled test set,
#: the condition for CPU workers to serve it by default.
INT8_DEFAULT_KEY = "crackq.cpu_default"

#: Side of the square model input (the recipe's 160×160); a card's ``input.size`` overrides it.
INPUT_SIZE = 160
#: Class folder names that mean "crack" in a card's ``classes`` (when it names no ``positive_class``).
CRACK_CLASS_NAMES = ("Positive", "positive", "crack", "Crack", "cracked")


def card_path(model_path: str | os.PathLike) -> Path:
    """The card beside a model file (``.keras`` or ``.onnx``), or inside a model folder."""
    path = Path(model_path)
    return path / CARD_FILE if path.is_dir() else path.with_name(CARD_FILE)


def read_card(model_path: str | os.PathLike) -> dict:
    """The card of ``model_path`` ({} when there is none: a hand-exported model still serves)."""
    path = card_path(model_path)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def write_card(model_path: str | os.PathLike, card: dict) -> Path:
    path = card_path(model_path)
    path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return path


def onnx_path(model_path: str | os.PathLike) -> Path:
    """The FP32 ONNX export of ``model_path`` (``.keras``): same folder, same stem, ``.onnx``."""
    return Path(model_path).with_suffix(".onnx")


def int8_onnx_path(model_path: str | os.PathLike) -> Path:
    """The INT8 (QDQ) ONNX model made from :func:`onnx_path` by ``crackq export --int8``."""
    path = onnx_path(model_path)
    return path.with_name(path.stem + ".int8.onnx")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def card_threshold(card: dict, default: float = 0.5) -> float:
    """The decision threshold a card records (``threshold.value``, chosen by ``crackq adapt``), else ``default``."""
    entry = card.get("threshold")
    if isinstance(entry, dict):
        entry = entry.get("value")
    return float(entry) if isinstance(entry, (int, float)) and not isinstance(entry, bool) else default


def crack_index(card: dict) -> int:
    """The column of ``probabilities`` that means crack: ``positive_class``, else a crack-like class name."""
    classes = card.get("classes", ["Negative", "Positive"])
    positive = card.get("positive_class")
    if positive in classes:
        return classes.index(positive)
    return next((i for i, c in enumerate(classes) if c in CRACK_CLASS_NAMES), len(classes) - 1)


@dataclass(frozen=True)
class ModelInfo:
    """What a server of the model needs to know about it, read from its card."""

    name: str
    input_size: int
    crack_index: int
    card: dict
    directory: Path

    @classmethod
    def from_model_path(cls, model_path: str | os.PathLike) -> "ModelInfo":
        path = Path(model_path)
        card = read_card(path)
        name = f"{card.get('name', path.stem)}:{card.get('version', '0')}"
        size = card.get("input", {}).get("size", [card.get("input_size", INPUT_SIZE)])[0]
        return cls(name=name, input_size=int(size), crack_index=crack_index(card), card=card,
                   directory=path.parent)

    def threshold(self, default: float = 0.5) -> float:
        return card_threshold(self.card, default)
