"""The model card: everything needed to know what a shipped model is and how it was made.

Workers read ``name``/``version`` (they stamp ``name:version`` into every
result record) and ``classes``; people read the rest.
"""

from __future__ import annotations

import platform
from datetime import datetime, timezone

from shared.preprocessing import INPUT_SIZE

NAME, VERSION = "crackq-mobilenetv2", "1"


def build(cfg, split, backbone: dict, history: dict, extraction: dict, metrics: dict, train_seconds: float,
          onnx_diff: float, backbone_fingerprint: str) -> dict:
    """Assemble the card of one ``crackq train`` run (a JSON-able dict)."""
    from training.export import OPSET
    from shared.model_card import MODEL_FILE, ONNX_FILE, SPLIT_FILE, file_sha256

    test = metrics.get("test", {})
    return {
        "name": NAME,
        "version": VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "classes": list(split.classes),
        "positive_class": split.classes[1],
        "input": {"name": "image", "size": [INPUT_SIZE, INPUT_SIZE, 3], "layout": "NHWC", "dtype": "float32", "range": [0, 255],
                  "preprocessing": "shared.preprocessing.load_input (EXIF-oriented RGB, whole image resized with "
                                   "Pillow bilinear); scaling to [-1, 1] happens inside the model"},
        "architecture": "MobileNetV2 alpha=1.0 (frozen, flat) -> GlobalAveragePooling2D 'pooled' -> "
                        "Dropout(0.2) -> Dense(2, softmax) 'probabilities'",
        "backbone": {"weights": backbone, "weights_fingerprint": backbone_fingerprint,
                     "unfrozen_blocks": cfg.unfreeze_blocks},
        "init_model": ({"path": str(cfg.init_model), "sha256": file_sha256(cfg.init_model)}
                       if cfg.init_model else None),
        "data": {"dir": str(cfg.data_dir), "counts": split.counts(), "split_sha256": split.hashes(),
                 "seed": cfg.seed, "ratios": list(cfg.ratios), "limit_per_class": cfg.limit_per_class,
                 "skipped_images": split.skipped, "split_file": SPLIT_FILE},
        "training": {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate,
                     "optimizer": "Adam", "loss": "sparse categorical cross-entropy", "augment": cfg.augment,
                     "feature_extraction": extraction, "training_time_seconds": round(train_seconds, 1),
                     "history": history},
        "metrics": metrics,
        "confusion_matrix": {"split": "test", "rows": "true", "columns": "predicted",
                             "labels": list(split.classes), "matrix": test.get("confusion_matrix")},
        "files": {"keras": MODEL_FILE, "onnx": ONNX_FILE,
                  "onnx_opset": OPSET, "onnx_max_abs_diff_vs_keras": onnx_diff},
        "versions": _versions(),
    }


def _versions() -> dict:
    import keras
    import tensorflow as tf

    versions = {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__}
    for module in ("numpy", "onnx", "onnxruntime", "tf2onnx", "PIL"):
        try:
            versions[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            pass
    return versions
