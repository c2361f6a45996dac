"""The INT8 model: static, per-channel QDQ quantization of the FP32 ONNX export, and the gate it must pass.

Why INT8: on a CPU the model is most of a worker's work, and ONNX Runtime's
INT8 kernels (VNNI / AVX-512) run MobileNetV2 1.7-1.9x faster than FP32
(docs/performance.md).  Why *static* and *per-channel*: dynamic quantization
leaves the convolutions' activations in FP32 (no gain on a conv net), and
per-tensor weight scales lose the depthwise layers, whose channels differ in
range by orders of magnitude.

How it is made (``crackq export --int8``, and the end of ``crackq train``):

1. calibration images are drawn from the **training** split of ``split.json``
   (seeded, balanced per class) and decoded by ``shared.preprocessing.load_input``,
   exactly as training and serving decode;
2. ``onnxruntime.quantization.quant_pre_process`` (shape inference, graph
   optimisation) then ``quantize_static`` (QDQ format, int8 weights
   per channel, int8 activations) with the :data:`DEFAULT_METHOD` calibrator;
3. **the gate**: another disjoint set of training images (the calibration
   hold-out, never a test split) runs through both models; the INT8 model is
   written only when its accuracy is within :data:`ACCURACY_POINTS` of FP32 and
   its crack probabilities within :data:`PROB_MEAN_TOLERANCE` (mean) and
   :data:`PROB_P99_TOLERANCE` (99th percentile) of FP32's.  Otherwise nothing is
   written and :class:`GateFailed` says why.

The INT8 file records the sha256 of the FP32 ONNX it was made from (ONNX
metadata), so a worker never serves an INT8 model left over from an older
model (``shared.inference``).  Calibration method and the ops left in FP32
were chosen by measurement on the calibration hold-out (``benchmarks/int8.py``;
numbers in docs/performance.md).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from shared.preprocessing import INPUT_SIZE, load_input
from shared.model_card import (INT8_DEFAULT_KEY, INT8_SOURCE_KEY, file_sha256, int8_onnx_path, onnx_path,
                               read_card, write_card)

log = logging.getLogger(__name__)

#: Calibration images (from the training split): 600 agreed best with FP32 on the calibration hold-out
#: (mean |dp| 0.0045, 0 flips in 1,000; 200: 0.0048, 1 flip; 100: 0.0051, 2 flips; docs/performance.md).
CALIBRATION_IMAGES = 600
#: Calibration hold-out images (also from the training split, disjoint from calibration): the export gate.
HOLDOUT_IMAGES = 1000
#: Calibrator (``minmax``, ``entropy`` or ``percentile``), chosen on the calibration hold-out.
DEFAULT_METHOD = "minmax"
#: Ops left in FP32, chosen on the calibration hold-out (see :func:`excluded_nodes`).
DEFAULT_EXCLUDE = "features"
#: Keep ReLU6 (Clip) ops and calibrate their outputs' range, instead of folding them into a fixed [0, 6] range.
CALIBRATED_RELU6 = False
#: The gate: INT8 accuracy within this many percentage points of FP32's ...
ACCURACY_POINTS = 0.2
#: ... and |p_int8 - p_fp32| of the crack probability at most this on average ...
PROB_MEAN_TOLERANCE = 0.01
#: ... and at most this for 99 % of the images.
PROB_P99_TOLERANCE = 0.10
SEED = 15


class GateFailed(RuntimeError):
    """The INT8 model disagrees with FP32 beyond the gate; ``agreement`` says by how much."""

    def __init__(self, message: str, agreement: "Agreement"):
        super().__init__(message)
        self.agreement = agreement


@dataclass(frozen=True)
class Agreement:
    """How INT8 compares with FP32 on one labelled set (crack = 1)."""

    n: int
    accuracy_fp32: float
    accuracy_int8: float
    mean_abs_diff: float
    p99_abs_diff: float
    max_abs_diff: float
    label_flips: int

    @property
    def accuracy_points(self) -> float:
        return 100.0 * (self.accuracy_int8 - self.accuracy_fp32)

    def failures(self) -> list[str]:
        out = []
        if abs(self.accuracy_points) > ACCURACY_POINTS + 1e-9:
            out.append(f"accuracy {100 * self.accuracy_int8:.2f} % vs FP32 {100 * self.accuracy_fp32:.2f} % "
                       f"(differs by {abs(self.accuracy_points):.2f} points > {ACCURACY_POINTS})")
        if self.mean_abs_diff > PROB_MEAN_TOLERANCE:
            out.append(f"mean |p_int8 - p_fp32| {self.mean_abs_diff:.4f} > {PROB_MEAN_TOLERANCE}")
        if self.p99_abs_diff > PROB_P99_TOLERANCE:
            out.append(f"99th percentile |p_int8 - p_fp32| {self.p99_abs_diff:.4f} > {PROB_P99_TOLERANCE}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def to_dict(self) -> dict:
        return {**{k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()},
                "passed": self.passed}


def compare(p_fp32: np.ndarray, p_int8: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> Agreement:
    """Agreement of two crack-probability vectors on the same images with ``labels`` (bool/0-1)."""
    p_fp32, p_int8 = np.asarray(p_fp32, np.float64), np.asarray(p_int8, np.float64)
    labels = np.asarray(labels).astype(bool)
    diff = np.abs(p_int8 - p_fp32)
    return Agreement(
        n=int(len(labels)),
        accuracy_fp32=float(np.mean((p_fp32 >= threshold) == labels)),
        accuracy_int8=float(np.mean((p_int8 >= threshold) == labels)),
        mean_abs_diff=float(diff.mean()), p99_abs_diff=float(np.percentile(diff, 99)),
        max_abs_diff=float(diff.max()),
        label_flips=int(np.sum((p_fp32 >= threshold) != (p_int8 >= threshold))))


# ---- calibration data --------------------------------------------------------------------------------
def calibration_files(train_files: list[str], n_calibration: int = CALIBRATION_IMAGES,
                      n_holdout: int = HOLDOUT_IMAGES, seed: int = SEED) -> tuple[list[str], list[str]]:
    """Two disjoint, class-balanced, seeded samples of the training split: calibration and its hold-out."""
    by_class: dict[str, list[str]] = {}
    for rel in sorted(train_files):
        by_class.setdefault(rel.split("/", 1)[0], []).append(rel)
    rng = np.random.default_rng(seed)
    calibration, holdout = [], []
    for i, cls in enumerate(sorted(by_class)):
        members = [by_class[cls][j] for j in rng.permutation(len(by_class[cls]))]
        share = lambda n: n // len(by_class) + (1 if i < n % len(by_class) else 0)  # noqa: E731
        a, b = share(n_calibration), share(n_holdout)
        if a + b > len(members):
            raise ValueError(f"class {cls} has {len(members)} training images, fewer than {a} + {b} needed")
        calibration += members[:a]
        holdout += members[a:a + b]
    return calibration, holdout


#: Share of the calibration set (and of the hold-out) drawn from uav-concrete training-photo tiles when the
#: model trained on them: the calibration must see the activation ranges of both sources (docs/performance.md).
UAV_SHARE = 0.5
#: uav-concrete hold-out tiles (from the training photos not used for calibration): gated like the Özgenel one.
UAV_HOLDOUT_IMAGES = 600


def uav_train_tiles(uav_dir: str | os.PathLike, train_photos: list[str], n_calibration: int, n_holdout: int,
                    seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Calibration inputs, hold-out inputs and hold-out labels from uav-concrete **training** photos.

    The photos are split in two seeded halves (calibration / hold-out: no photo on both sides), cut
    into the training grid tiles (``training.sources.grid_tiles``: 224/112/64 px, as the model's uav
    training tiles), and sampled class-balanced.
    """
    from training.sources import GRID_SIZES, grid_tiles, mask_pairs

    root = Path(uav_dir)
    pairs = mask_pairs(root / "images", root / "masks")
    rng = np.random.default_rng(seed + 1)
    out = []
    for stems, n in zip(uav_calibration_photos([p for p in train_photos if p in pairs], seed),
                        (n_calibration, n_holdout)):
        tiles = grid_tiles(pairs, sorted(stems), GRID_SIZES, max_negatives_per_photo=6, seed=seed)
        pick = []
        for label, count in ((1, n // 2), (0, n - n // 2)):
            members = np.flatnonzero(tiles.labels == label)
            if count > len(members):
                raise ValueError(f"uav training photos give {len(members)} tiles of class {label}, "
                                 f"fewer than the {count} needed")
            pick += list(rng.permutation(members)[:count])
        pick = np.sort(np.array(pick, int))
        out.append((tiles.images[pick], tiles.labels[pick].astype(bool)))
    return out[0][0], out[1][0], out[1][1]


def uav_calibration_photos(train_photos: list[str], seed: int = SEED) -> tuple[list[str], list[str]]:
    """Seeded, disjoint halves of the uav training photos: (calibration photos, hold-out photos)."""
    photos = sorted(train_photos)
    order = [photos[i] for i in np.random.default_rng(seed).permutation(len(photos))]
    return order[:len(order) // 2], order[len(order) // 2:]


def uav_photo_split(model_path) -> dict[str, list[str]] | None:
    """The model's uav-concrete photo split (``uav_split.json`` beside it), None when it has none."""
    from training.sources import UAV_SPLIT_FILE, load_photo_split

    path = Path(model_path).with_name(UAV_SPLIT_FILE)
    return load_photo_split(path) if path.exists() else None


def load_inputs(root: str | os.PathLike, files: list[str], size: int = INPUT_SIZE) -> np.ndarray:
    """uint8 (N, size, size, 3) model inputs, decoded as training and serving decode."""
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        arrays = list(pool.map(lambda rel: load_input(os.path.join(root, rel), size), files))
    return np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)


def labels_for(files: list[str], positive: str = "Positive") -> np.ndarray:
    return np.array([rel.split("/", 1)[0] == positive for rel in files])


# ---- running and making models -----------------------------------------------------------------------
def onnx_outputs(path: str | os.PathLike, inputs: np.ndarray, batch: int = 32,
                 threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities (N, 2), features (N, D))`` of an ONNX model on uint8 inputs, on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    probs, feats = [], []
    for start in range(0, len(inputs), batch):
        p, f = session.run(["probabilities", "features"],
                           {name: inputs[start:start + batch].astype(np.float32)})
        probs.append(p)
        feats.append(f)
    return np.concatenate(probs), np.concatenate(feats)


class _Reader:
    """``CalibrationDataReader`` over uint8 inputs, in batches (float32, as the model takes them)."""

    def __init__(self, input_name: str, inputs: np.ndarray, batch: int = 16):
        # Equal batches: the histogram calibrators stack them (a short last batch would not fit).
        batch = next(b for b in (batch, 10, 8, 5, 4, 2, 1) if len(inputs) % b == 0)
        self._batches = iter([{input_name: inputs[i:i + batch].astype(np.float32)}
                              for i in range(0, len(inputs), batch)])

    def get_next(self):
        return next(self._batches, None)


#: ``exclude`` choices of :func:`excluded_nodes` (``+``-joined parts; ``none`` = quantize everything).
EXCLUDE_PARTS = ("features", "head", "late", "stem", "early", "early6")


def excluded_nodes(model_path: str | os.PathLike, exclude: str) -> list[str]:
    """Node names to leave in FP32: the union of the ``+``-joined parts of ``exclude``.

    ``features``: the ops that compute the in-domain statistics and the head's
    inputs (spatial means and std of earlier layers, the pooled embedding, their
    concatenations) -- cheap reductions whose inputs then stay exact to their INT8
    source.  ``head``: the classifier head (its hidden and output MatMuls,
    bias adds, ReLU, softmax).  ``late``: the last blocks (13-16 and the final
    1x1 conv), whose activations the head reads.  ``stem``: the rescaling, the
    first conv and block 0; ``early``: those and blocks 1-2; ``early6``: up to block 5.
    ``none``: quantize everything the quantizer can.
    """
    import onnx

    parts = set(exclude.split("+"))
    if parts == {"none"}:
        return []
    unknown = parts - set(EXCLUDE_PARTS)
    if unknown:
        raise ValueError(f"exclude parts must be among {EXCLUDE_PARTS} or 'none', not {sorted(unknown)}")
    graph = onnx.load(str(model_path)).graph
    feature_ops = {"GlobalAveragePool", "ReduceMean", "Sub", "Sqrt", "Squeeze", "Concat", "Unsqueeze"}
    # Blocks by position in the (topologically sorted) graph: the 1x1 convs carry generated names
    # (``Conv__563``), so a block starts at the conv just before its first named op.
    names = [node.name for node in graph.node]
    late_from = _block_start(names, "block_13_")
    early_to = {"stem": _block_start(names, "block_1_"), "early": _block_start(names, "block_3_"),
                "early6": _block_start(names, "block_6_")}
    early_to = max([early_to[p] for p in parts if p in early_to], default=0)
    out = []
    for i, node in enumerate(graph.node):
        stats = (node.op_type in feature_ops or "reduce_std" in node.name or "reduce_variance" in node.name
                 or node.name.endswith("features_1/concat"))
        head = "probabilities" in node.name or "head_" in node.name
        conv_path = node.op_type in ("Conv", "Clip", "Add", "Relu", "Pad", "Mul")
        chosen = (("features" in parts and stats) or ("head" in parts and head)
                  or ("late" in parts and i >= late_from and conv_path and not head)
                  or (i < early_to and conv_path))
        if chosen:
            out.append(node.name)
    return out


def _block_start(names: list[str], block: str) -> int:
    """Index of the first node of ``block`` (the conv just before its first named op); len(names) if absent."""
    first = next((i for i, name in enumerate(names) if block in name), len(names))
    return max(0, first - 1) if first < len(names) else first


def quantize(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calibration: np.ndarray,
             method: str = DEFAULT_METHOD, exclude: str = DEFAULT_EXCLUDE, activations: str = "uint8",
             calibrated_relu6: bool = CALIBRATED_RELU6, per_channel: bool = True, reduce_range: bool = False,
             quant_format: str = "qdq", percentile: float = 99.999, relu6_percentile: float | None = None) -> None:
    """Write the INT8 model of ``fp32_path`` calibrated on ``calibration`` (uint8 inputs).

    The defaults are the shipped recipe; the other knobs exist so that
    ``benchmarks/int8_variants.py`` can measure the alternatives with the same code.
    ``relu6_percentile``: quantize each ReLU6 output over [0, that percentile of its calibration values]
    (:func:`relu6_ranges`) instead of the [0, 6] every calibrator ends up with.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ValueError(f"calibration method must be one of {sorted(methods)}, not {method!r}")
    with tempfile.TemporaryDirectory(prefix="crackq-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        name = onnx.load(str(prepared)).graph.input[0].name
        overrides = relu6_ranges(prepared, calibration, relu6_percentile) if relu6_percentile else {}
        quantize_static(
            str(prepared), str(out_path), _Reader(name, calibration),
            quant_format=QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator,
            per_channel=per_channel, reduce_range=reduce_range,
            activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=methods[method], nodes_to_exclude=excluded_nodes(prepared, exclude),
            extra_options={"CalibMovingAverage": False, "ActivationSymmetric": False,
                           "QDQKeepRemovableActivations": calibrated_relu6,
                           "CalibPercentile": percentile,
                           **({"TensorQuantOverrides": overrides} if overrides else {})})
    set_metadata(out_path, {INT8_SOURCE_KEY: file_sha256(fp32_path)})


def relu6_ranges(prepared: Path, calibration: np.ndarray, percentile: float, max_images: int = 128,
                 batch: int = 16) -> dict:
    """``TensorQuantOverrides`` giving each ReLU6 (Clip) output, and the conv output it is fused into, the range
    [0, mean over batches of the ``percentile`` of its FP32 values].

    Why: every ReLU6 output saturates at 6 somewhere in any calibration set, so MinMax (and the
    histogram calibrators) quantize it in steps of 6/255 = 0.024 -- coarser than most activations of a
    smooth, low-contrast drone tile, which is where INT8 lost its agreement with FP32.
    """
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(prepared))
    clips = [(n.input[0], n.output[0]) for n in proto.graph.node if n.op_type == "Clip"]
    known = {o.name for o in proto.graph.output}
    for _, out in clips:
        if out not in known:
            proto.graph.output.add().name = out
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    x = calibration[::max(1, len(calibration) // max_images)][:max_images]
    tops: dict[str, list[float]] = {out: [] for _, out in clips}
    for start in range(0, len(x), batch):
        values = session.run([out for _, out in clips], {input_name: x[start:start + batch].astype(np.float32)})
        for (_, out), v in zip(clips, values):
            tops[out].append(float(np.percentile(v.ravel()[::3], percentile)))
    overrides = {}
    for src, out in clips:
        rmax = float(np.clip(np.mean(tops[out]), 1e-3, 6.0))
        for tensor in (src, out):
            overrides[tensor] = [{"rmin": np.float32(0.0), "rmax": np.float32(rmax)}]
    return overrides


def set_metadata(path: str | os.PathLike, values: dict[str, str]) -> None:
    """Set ONNX ``metadata_props`` entries (what workers read to decide whether to serve the model)."""
    import onnx

    proto = onnx.load(str(path))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    for key, value in [*kept, *values.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def source_sha256(int8_path: str | os.PathLike) -> str | None:
    """The FP32 ONNX sha256 recorded in an INT8 model (None when it records none)."""
    import onnx

    proto = onnx.load(str(int8_path), load_external_data=False)
    return next((p.value for p in proto.metadata_props if p.key == INT8_SOURCE_KEY), None)


# ---- crackq export --int8 ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Int8Report:
    path: str
    method: str
    exclude: str
    calibration_images: int
    holdout: Agreement
    domain: dict | None = None
    test_gate: dict | None = None
    cpu_default: bool = False
    #: Further calibration hold-outs (``uav-holdout``: tiles of uav training photos), each gated like ``holdout``.
    extra_holdouts: dict | None = None
    calibration_sources: dict | None = None

    @property
    def holdouts(self) -> dict[str, Agreement]:
        return {"holdout": self.holdout, **(self.extra_holdouts or {})}

    def to_dict(self) -> dict:
        tolerances = {"accuracy_points": ACCURACY_POINTS, "prob_mean": PROB_MEAN_TOLERANCE,
                      "prob_p99": PROB_P99_TOLERANCE}
        return {"file": Path(self.path).name, "method": self.method, "fp32_ops": self.exclude,
                "calibration_images": self.calibration_images, "calibration_split": "train",
                "calibration_sources": self.calibration_sources or {"ozgenel": self.calibration_images},
                "gate": {"set": "calibration hold-out (train split)", **self.holdout.to_dict(),
                         "tolerances": tolerances},
                "gate_extra": {name: {"set": "uav-concrete tiles of training photos not used for calibration",
                                      **a.to_dict()} for name, a in (self.extra_holdouts or {}).items()},
                "test_gate": {name: a.to_dict() for name, a in (self.test_gate or {}).items()},
                "cpu_default": self.cpu_default,
                "domain": self.domain}


def resolve_data_dir(data_dir: str | None, split_data_dir: str, split_file: Path) -> Path:
    """``--data-dir``, else the split's recorded folder (as given, or relative to the model's repository)."""
    candidates = [data_dir] if data_dir else [split_data_dir, str(split_file.parent.parent / split_data_dir)]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise FileNotFoundError(f"training images not found (tried {', '.join(map(str, candidates))}): "
                            "pass --data-dir")


def export_int8(model_path: str | os.PathLike, data_dir: str | None = None, split_file: str | None = None,
                method: str = DEFAULT_METHOD, exclude: str = DEFAULT_EXCLUDE,
                n_calibration: int = CALIBRATION_IMAGES, n_holdout: int = HOLDOUT_IMAGES,
                out_path: str | os.PathLike | None = None, fit_domain: bool = True,
                uav_dir: str | os.PathLike | None = None, n_uav_holdout: int = UAV_HOLDOUT_IMAGES,
                calibration_set: str = "training") -> Int8Report:
    """Quantize the FP32 ONNX beside ``model_path`` and write it only if it passes the gate.

    ``calibration_set="training"`` (the default): a model trained on uav-concrete tiles too
    (``uav_split.json`` beside it, photos found) is calibrated on both sources of its training split
    (:data:`UAV_SHARE` of the images from uav training photos) and gated on both hold-outs.
    ``"ozgenel"``: Özgenel training patches only, gated on their hold-out only (the uav-concrete
    test photos still decide whether it is the CPU default).  Raises :class:`GateFailed` (nothing written) when
    a calibration hold-out disagrees beyond the tolerances.  A model that passes is written; it
    becomes the CPU workers' default only when it also passes the gate on every labelled test set
    (:func:`gate_sets`), which is recorded in its ONNX metadata (``INT8_DEFAULT_KEY``) and in the
    model card.
    """
    from training.data import Split

    fp32 = onnx_path(model_path)
    if not fp32.exists():
        raise FileNotFoundError(f"{fp32} not found: export the FP32 ONNX first (`crackq export {model_path}`)")
    split_path = Path(split_file) if split_file else Path(model_path).with_name("split.json")
    split = Split.load(split_path)
    root = resolve_data_dir(data_dir, split.data_dir, split_path)
    positive = _positive_class(model_path, split.classes)
    uav = Path(uav_dir) if uav_dir else root.parent / "uav-concrete"
    if calibration_set not in ("training", "ozgenel"):
        raise ValueError(f"calibration_set must be 'training' or 'ozgenel', not {calibration_set!r}")
    photos = uav_photo_split(model_path) if calibration_set == "training" and (uav / "images").is_dir() else None
    n_uav = int(round(n_calibration * UAV_SHARE)) if photos else 0
    calib_files, holdout_files = calibration_files(split.files["train"], n_calibration - n_uav, n_holdout)
    out = Path(out_path) if out_path else int8_onnx_path(model_path)
    size = _input_size(model_path)
    tmp = out.with_name(out.name + ".tmp")
    try:
        calibration = load_inputs(root, calib_files, size)
        holdouts = {"holdout": (load_inputs(root, holdout_files, size), labels_for(holdout_files, positive))}
        if photos:
            uav_cal, uav_x, uav_y = uav_train_tiles(uav, photos["train"], n_uav, n_uav_holdout)
            calibration = np.concatenate([calibration, uav_cal])
            holdouts["uav-holdout"] = (uav_x, uav_y)
        quantize(fp32, tmp, calibration, method, exclude)
        agreements = evaluate_holdouts(fp32, tmp, holdouts)
        failed = {name: a.failures() for name, a in agreements.items() if not a.passed}
        if failed:
            raise GateFailed("INT8 model refused, nothing written: " + "; ".join(
                f"on the calibration {'hold-out' if name == 'holdout' else name} ({agreements[name].n} training "
                f"images) " + "; ".join(f) for name, f in failed.items()), agreements[next(iter(failed))])
        test_gate = evaluate_gate(fp32, tmp, gate_sets(model_path, root, uav_dir, size))
        cpu_default = bool(test_gate) and all(a.passed for a in test_gate.values())
        set_metadata(tmp, {INT8_DEFAULT_KEY: "true" if cpu_default else "false"})
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    domain = fit_int8_domain(out, root, split, Path(model_path).parent, size) if fit_domain else None
    sources = {"ozgenel": len(calib_files), **({"uav-train-photos": n_uav} if n_uav else {})}
    report = Int8Report(str(out), method, exclude, len(calibration), agreements.pop("holdout"), domain, test_gate,
                        cpu_default, agreements, sources)
    _record_in_card(model_path, report)
    return report


def fit_int8_domain(int8_path: Path, root: Path, split, out_dir: Path, size: int = INPUT_SIZE) -> dict | None:
    """Fit ``domain.int8.npz``: the in-domain description of the INT8 model's own features.

    Same recipe, images and threshold rule as ``domain.npz`` (training/domain_fit.py); only the
    features differ.  Returns the card entry (None when the FP32 model has no description either).
    """
    from shared.domain import FILE_NAME, INT8_FILE_NAME, DomainScorer
    from training.domain_fit import TRAIN_SAMPLE, balanced_sample, fit, summary

    fp32_scorer = DomainScorer.load(out_dir)
    if fp32_scorer is None:
        (out_dir / INT8_FILE_NAME).unlink(missing_ok=True)
        return None
    uav = root.parent / "uav-concrete"
    photos = uav_photo_split(out_dir / "split.json") if (uav / "images").is_dir() else None
    if fp32_scorer.min_margin > 0 and photos:
        return _fit_int8_domain_multi(int8_path, root, split, out_dir, uav, photos, fp32_scorer, size)
    features = {name: onnx_outputs(int8_path, load_inputs(root, files, size))[1]
                for name, files in (("train", balanced_sample(split.files["train"], TRAIN_SAMPLE, 0)),
                                    ("val", split.files["val"]), ("test", split.files["test"]))}
    scorer = fit(features["train"], features["val"], fp32_scorer.meta.get("backbone_fingerprint"))
    scorer.meta["fitted_for"] = int8_path.name
    scorer.save(out_dir / INT8_FILE_NAME)
    entry = summary(scorer, features["val"], features["test"], out_dir / INT8_FILE_NAME)
    entry["fp32_description"] = FILE_NAME
    return entry


def _fit_int8_domain_multi(int8_path: Path, root: Path, split, out_dir: Path, uav: Path, photos: dict,
                           fp32_scorer, size: int) -> dict:
    """``domain.int8.npz`` for a multi-source model: the recipe of its ``domain.npz``
    (``training.domain_fit.fit_domain_sets``) on the INT8 model's outputs.

    Fitted on 1,500 Özgenel training patches + 1,500 uav training-photo grid tiles (balanced per class),
    threshold = the largest per-source 99th percentile on the validation sets (Özgenel val + uav
    val-photo grid tiles), then the smallest prediction margin giving every validation source >= 96 %
    accuracy on what passes.  Without this, an INT8 description of Özgenel patches alone called 2.5 % of
    the uav validation tiles in domain (FP32: 99 %; docs/performance.md).
    """
    from shared.domain import FILE_NAME, INT8_FILE_NAME, DomainScorer
    from training.domain_fit import (METHOD_MULTI, PER_SOURCE_TRAIN, SourceRows, balanced_sample, choose_margin,
                                     fit, selective, summary)
    from training.sources import GRID_SIZES, grid_tiles, mask_pairs

    pairs = mask_pairs(uav / "images", uav / "masks")

    def rows(source, x, labels):
        p, f = onnx_outputs(int8_path, x)
        return SourceRows(source, p[:, 1], f, np.asarray(labels).astype(int))

    def uav_rows(which, limit=None):
        tiles = grid_tiles(pairs, [p for p in photos[which] if p in pairs], GRID_SIZES)
        idx = np.arange(len(tiles))
        if limit is not None and len(idx) > limit:
            rng = np.random.default_rng(0)
            idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(tiles.labels == c))[:limit // 2]
                                          for c in (0, 1)]))
        return rows("uav", tiles.images[idx], tiles.labels[idx])

    def oz_rows(files):
        return rows("ozgenel", load_inputs(root, files, size), labels_for(files))

    train = [oz_rows(balanced_sample(split.files["train"], PER_SOURCE_TRAIN, 0)), uav_rows("train", PER_SOURCE_TRAIN)]
    val = [oz_rows(split.files["val"]), uav_rows("val")]
    test = [oz_rows(split.files["test"]), uav_rows("test")]
    val_x = np.concatenate([r.features for r in val])
    scorer = fit(np.concatenate([r.features for r in train]), val_x, fp32_scorer.meta.get("backbone_fingerprint"),
                 val_groups=[r.source for r in val for _ in range(len(r.labels))])
    scorer.meta["min_margin"] = choose_margin(scorer, val)
    scorer.meta["method"] = METHOD_MULTI
    scorer.meta["fitted_for"] = int8_path.name
    scorer = DomainScorer(scorer.meta, scorer.arrays)
    scorer.save(out_dir / INT8_FILE_NAME)
    entry = summary(scorer, val_x, np.zeros((0, val_x.shape[1])), out_dir / INT8_FILE_NAME)
    entry.update({"method": METHOD_MULTI, "min_margin": scorer.min_margin, "fp32_description": FILE_NAME,
                  "fitted_on": {"split": "train", "rows": int(sum(len(r.labels) for r in train)),
                                "per_source": {r.source: int(len(r.labels)) for r in train}},
                  "by_source": {name: {r.source: selective(scorer, r) for r in sets}
                                for name, sets in (("val", val), ("test", test))}})
    entry["test_in_domain_rate"] = entry["by_source"]["test"]["ozgenel"]["coverage"]
    entry["test_images"] = int(len(test[0].labels))
    return entry


def _positive_class(model_path, classes) -> str:
    card = _card(model_path)
    return card.get("positive_class") or (classes[-1] if classes else "Positive")


def _input_size(model_path) -> int:
    return int(_card(model_path).get("input", {}).get("size", [INPUT_SIZE])[0])


def _card(model_path) -> dict:
    return read_card(model_path)


def _record_in_card(model_path, report: Int8Report) -> None:
    card = read_card(model_path)
    if not card:
        return
    card["int8"] = report.to_dict()
    write_card(model_path, card)


# ---- the labelled sets of the accuracy gate (tests/test_int8.py, benchmarks/int8.py) ----------------
def evaluate_gate(fp32: Path, int8: Path, sets: dict) -> dict[str, Agreement]:
    """:class:`Agreement` of INT8 with FP32 on each ``name -> (inputs, labels)`` set."""
    return {name: compare(onnx_outputs(fp32, x)[0][:, 1], onnx_outputs(int8, x)[0][:, 1], y)
            for name, (x, y) in sets.items() if len(x)}


def evaluate_holdouts(fp32: Path, int8: Path, sets: dict) -> dict[str, Agreement]:
    """The export gate's :class:`Agreement` on each calibration hold-out (same measure as the test gate)."""
    return {name: compare(onnx_outputs(fp32, x)[0][:, 1], onnx_outputs(int8, x)[0][:, 1], y)
            for name, (x, y) in sets.items() if len(x)}


def gate_sets(model_path, concrete_root: Path, uav_dir=None, size: int = INPUT_SIZE,
              per_class: int | None = None, uav_photos: int | None = None, uav_split: str = "test") -> dict:
    """The labelled TEST sets: the Özgenel test split of ``split.json`` and the uav-concrete test photos.

    uav-concrete photos: the ``uav_split`` photos of the model's ``uav_split.json`` (``val`` is for
    choosing a recipe, ``test`` only for the gate); without one, the photos its split.json does not
    name.  Two sets are cut from them: ``uav-concrete`` (tiles cut as workers cut them, the default
    227-px grid) and ``uav-concrete-grid`` (the 224/112/64-px grid of the model card's uav metrics,
    ~65 tiles a photo: a 0.2-point tolerance is ~6 tiles there, under one tile on the first set).
    ``per_class`` / ``uav_photos`` take evenly spaced subsets (the fast test); None: everything.
    uav-concrete is looked for beside the Özgenel folder unless ``uav_dir`` is given; missing: left out.
    """
    doc = json.loads(Path(model_path).with_name("split.json").read_text(encoding="utf-8"))
    split = doc["files"]
    classes = set(doc.get("classes", ["Negative", "Positive"]))
    test = [f for f in split["test"] if f.split("/", 1)[0] in classes]
    if per_class:
        by_class: dict[str, list[str]] = {}
        for rel in sorted(test):
            by_class.setdefault(rel.split("/", 1)[0], []).append(rel)
        test = [f for m in by_class.values() for f in m[::max(1, len(m) // per_class)][:per_class]]
    sets = {"ozgenel-test": (load_inputs(concrete_root, test, size), labels_for(test))}
    uav = Path(uav_dir) if uav_dir else Path(concrete_root).parent / "uav-concrete"
    if (uav / "images").is_dir():
        sets.update(uav_sets(model_path, uav, uav_split, size, uav_photos))
    return sets


def uav_sets(model_path, uav: Path, which: str = "test", size: int = INPUT_SIZE,
             photos_max: int | None = None) -> dict:
    """``uav-concrete`` (worker tiles) and ``uav-concrete-grid`` sets of the model's ``which`` photos."""
    from training.sources import GRID_SIZES, grid_tiles, mask_pairs

    photo_split = uav_photo_split(model_path)
    files = sorted(os.listdir(uav / "images"))
    if photo_split is not None:
        chosen = set(photo_split[which])
        photos = [p for p in files if Path(p).stem in chosen]
    else:
        split = json.loads(Path(model_path).with_name("split.json").read_text(encoding="utf-8"))["files"]
        trained = {Path(f).stem for name in ("train", "val") for f in split.get(name, [])}
        photos = [p for p in files if Path(p).stem not in trained]
    if photos_max:
        photos = photos[::max(1, len(photos) // photos_max)][:photos_max]
    out = {"uav-concrete": uav_tiles(uav, photos, size)}
    grid = grid_tiles(mask_pairs(uav / "images", uav / "masks"), [Path(p).stem for p in photos], GRID_SIZES)
    out["uav-concrete-grid"] = (grid.images, grid.labels.astype(bool))
    return out


#: uav-concrete tiles: crack when at least this share of the tile's mask is crack, no crack when none is;
#: tiles in between (a few crack pixels at an edge) are ambiguous and left out.
UAV_CRACK_SHARE = 0.005


def uav_tiles(uav_dir: str | os.PathLike, photos: list[str] | None = None, size: int = INPUT_SIZE,
              tile: int = 227) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs and labels of the unambiguous tiles of uav-concrete photos, cut as workers cut them.

    ``photos``: file names in ``uav_dir/images`` (default: all, sorted).  Labels come from the masks
    (``masks/NAME.png``, 255 = crack) over the same boxes.
    """
    from PIL import Image

    from shared.preprocessing import prepare_image

    root = Path(uav_dir)
    photos = photos if photos is not None else sorted(os.listdir(root / "images"))
    inputs, labels = [], []
    for name in photos:
        prepared = prepare_image(str(root / "images" / name), size=size, tile=tile)
        with Image.open(root / "masks" / (Path(name).stem + ".png")) as m:
            mask = np.asarray(m.convert("L")) > 127
        boxes = prepared.boxes or [None]
        for x, box in zip(prepared.inputs, boxes):
            share = mask.mean() if box is None else mask[box.y:box.y + box.h, box.x:box.x + box.w].mean()
            if share >= UAV_CRACK_SHARE or share == 0:
                inputs.append(x)
                labels.append(share >= UAV_CRACK_SHARE)
    return (np.stack(inputs) if inputs else np.zeros((0, size, size, 3), np.uint8)), np.array(labels, bool)
