"""INT8 with its FP32 head refitted to INT8 features: the step after calibration, measured on choosing sets
(docs/performance.md, "Refitting the head on INT8 features").  Not shipped: no variant passes the gate.

    .venv/bin/python -m benchmarks.int8_refit [--exclude features+head+early]

The INT8 model (``mix`` calibration of :mod:`benchmarks.int8_variants`, ``--exclude`` ops in FP32, the
head among them) is made; then the FP32 and INT8 head inputs (``head_features``: pooled + block-13/10
means) are collected on the calibration images and their 7 other dihedral views (training split only),
and the head's FP32 weights are replaced by

* ``affine``: each head-input column mapped to FP32's by least squares (``x ~ a * x_int8 + b``), folded
  into the first MatMul and its bias;
* ``distil``: from the affine head, the 2-layer head trained (Adam, MSE on the FP32 logits, 10 %
  of the rows held out for early stopping) on INT8 inputs.

Each is scored against FP32 on the sets of :func:`benchmarks.int8_variants.build_sets` (never a test set).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import REPO
from benchmarks.int8_variants import build_sets
from shared.model_card import onnx_path
from training import quantize
from training.adapt_fit import dihedral

HEAD_INPUT = "crackq_serving_1/head_features_1/concat:0"
HEAD_WEIGHTS = ("crackq_serving_1/head_hidden_1/Cast/ReadVariableOp:0",
                "crackq_serving_1/head_hidden_1/BiasAdd/ReadVariableOp:0",
                "crackq_serving_1/probabilities_1/Cast/ReadVariableOp:0",
                "crackq_serving_1/probabilities_1/BiasAdd/ReadVariableOp:0")


def head_inputs(path: Path, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """The head's input rows of an ONNX model (the tensor exposed as an extra output)."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    proto.graph.output.add().name = HEAD_INPUT
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run([HEAD_INPUT], {name: x[i:i + batch].astype(np.float32)})[0]
                           for i in range(0, len(x), batch)]).astype(np.float64)


def affine(h_int8: np.ndarray, h_fp32: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column least-squares ``a, b`` with ``h_fp32 ~ a * h_int8 + b`` (a = 1 for constant columns)."""
    var = h_int8.var(0)
    cov = ((h_int8 - h_int8.mean(0)) * (h_fp32 - h_fp32.mean(0))).mean(0)
    a = np.where(var > 1e-9, cov / np.maximum(var, 1e-9), 1.0)
    return a, h_fp32.mean(0) - a * h_int8.mean(0)


def logits(h, w1, b1, w2, b2):
    return np.maximum(h @ w1 + b1, 0) @ w2 + b2


def distil(weights, h_in: np.ndarray, target: np.ndarray, seed: int = 0):
    """The 2-layer head, started from ``weights``, trained to give ``target`` logits from ``h_in``."""
    import keras

    order = np.random.default_rng(seed).permutation(len(h_in))
    train, hold = order[: int(0.9 * len(order))], order[int(0.9 * len(order)):]
    model = keras.Sequential([keras.Input((h_in.shape[1],)), keras.layers.Dense(weights[0].shape[1], activation="relu"),
                              keras.layers.Dense(2)])
    model.layers[0].set_weights([weights[0].astype(np.float32), weights[1].astype(np.float32)])
    model.layers[1].set_weights([weights[2].astype(np.float32), weights[3].astype(np.float32)])
    model.compile(keras.optimizers.Adam(1e-4), "mse")
    model.fit(h_in[train].astype(np.float32), target[train], validation_data=(h_in[hold].astype(np.float32), target[hold]),
              epochs=60, batch_size=128, verbose=0,
              callbacks=[keras.callbacks.EarlyStopping(patience=6, restore_best_weights=True)])
    (w1, b1), (w2, b2) = model.layers[0].get_weights(), model.layers[1].get_weights()
    return w1, b1, w2, b2


def with_head(int8: Path, out: Path, weights) -> None:
    """A copy of the INT8 model whose (FP32) head initializers are ``weights``."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(int8))
    found = 0
    for init in proto.graph.initializer:
        if init.name in HEAD_WEIGHTS:
            w = weights[HEAD_WEIGHTS.index(init.name)]
            init.CopyFrom(numpy_helper.from_array(np.asarray(w, np.float32), init.name))
            found += 1
    if found != len(HEAD_WEIGHTS):
        raise RuntimeError("the head was quantized: exclude 'head' from quantization to refit it")
    onnx.save(proto, str(out))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO / "models" / "crackq_mobilenetv2.keras"))
    ap.add_argument("--exclude", default="features+head", help="Ops left in FP32 (must include 'head').")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "int8_refit.jsonl"))
    args = ap.parse_args(argv)
    fp32 = onnx_path(args.model)
    calibration, sets = build_sets(args.model, REPO.parent / "shared" / "data" / "concrete",
                                   REPO.parent / "shared" / "data" / "uav-concrete")
    folder = Path(tempfile.mkdtemp(prefix="crackq-int8-refit-"))
    int8 = folder / "plain.onnx"
    quantize.quantize(fp32, int8, calibration["mix"], exclude=args.exclude)
    rows = np.concatenate(dihedral(calibration["mix"]))
    h_fp32, h_int8 = head_inputs(fp32, rows), head_inputs(int8, rows)
    import onnx
    from onnx import numpy_helper
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in onnx.load(str(int8)).graph.initializer}
    w1, b1, w2, b2 = (inits[k] for k in HEAD_WEIGHTS)
    a, b = affine(h_int8, h_fp32)
    fixed = (a[:, None] * w1, b1 + b @ w1, w2, b2)
    d1, c1, d2, c2 = distil(fixed, h_int8 * a + b, logits(h_fp32, w1, b1, w2, b2).astype(np.float32))
    learnt = (a[:, None] * d1, c1 + b @ d1, d2, c2)
    with_head(int8, folder / "affine.onnx", fixed)
    with_head(int8, folder / "distil.onnx", learnt)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    refs = {k: quantize.onnx_outputs(fp32, x)[0][:, 1] for k, (x, _) in sets.items()}
    for name in ("plain", "affine", "distil"):
        row = {"variant": f"mix/minmax/{args.exclude}/{name}", "refit_rows": len(rows)}
        for k, (x, y) in sets.items():
            agreement = quantize.compare(refs[k], quantize.onnx_outputs(folder / f"{name}.onnx", x)[0][:, 1], y)
            row[k] = agreement.to_dict()
            print(f"{row['variant']:45s} {k:13s} {100 * agreement.accuracy_int8:6.2f} vs FP32 "
                  f"{100 * agreement.accuracy_fp32:6.2f}  mean dp {agreement.mean_abs_diff:.4f}  "
                  f"p99 {agreement.p99_abs_diff:.3f}  flips {agreement.label_flips}  "
                  f"{'pass' if agreement.passed else 'FAIL'}", flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
