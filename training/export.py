"""ONNX export of the serving model, checked against Keras before it is accepted.

Workers run the ONNX file with ONNX Runtime by default, so an export that
silently disagrees with the Keras model would change every result.  The
export therefore runs both on the same inputs and raises
:class:`ExportMismatch` when any probability differs by ``TOLERANCE`` or more.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from shared.serving import serving_model
from training.model import INPUT_NAME, inference_fn

OPSET = 17
TOLERANCE = 1e-4


class ExportMismatch(RuntimeError):
    """ONNX Runtime and Keras disagree on the exported model."""


def export_onnx(model, out_path: str | os.PathLike, check_inputs: np.ndarray | None = None) -> float:
    """Write ``serving_model(model)`` to ``out_path`` (float32 NHWC 0–255 input named ``image``;
    outputs ``probabilities`` and ``features``) and return the verified max abs probability difference.
    """
    import tensorflow as tf

    serving = serving_model(model)
    spec = [tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name=INPUT_NAME)]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf2onnx's numpy-2 shims warn on import
        serving.export(str(out_path), format="onnx", input_signature=spec, opset_version=OPSET, verbose=False)
    _name_batch_axis(out_path)
    if check_inputs is None:
        check_inputs = np.random.default_rng(0).uniform(0, 255, (8, *model.input_shape[1:]))
    return verify(serving, out_path, check_inputs)


def _name_batch_axis(path: Path) -> None:
    """Call the dynamic first axis ``batch`` (tf2onnx names it ``unk__N``)."""
    import onnx

    proto = onnx.load(str(path))
    for value in [*proto.graph.input, *proto.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def verify(serving, onnx_path: str | os.PathLike, inputs: np.ndarray) -> float:
    """Max abs difference of ``probabilities`` between ONNX Runtime and Keras; raises when ≥ TOLERANCE."""
    import onnxruntime as ort

    inputs = np.asarray(inputs, dtype=np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    if sorted(names) != ["features", "probabilities"] or session.get_inputs()[0].name != INPUT_NAME:
        raise ExportMismatch(f"unexpected ONNX signature: input {session.get_inputs()[0].name}, outputs {names}")
    onnx_out = dict(zip(names, session.run(None, {INPUT_NAME: inputs})))
    keras_out = inference_fn(serving)(inputs)
    diff = float(np.abs(onnx_out["probabilities"] - keras_out["probabilities"]).max())
    if not diff < TOLERANCE:
        raise ExportMismatch(f"ONNX Runtime and Keras probabilities differ by {diff:.3g} (limit {TOLERANCE})")
    return diff
