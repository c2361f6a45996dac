"""A model loaded for inference exactly as workers serve it: loaded once, warmed up, run in batches.

It lives in ``shared/`` because workers, ``crackq evaluate`` and training (the in-domain fit scores the
ONNX export as served) all need it; workers pass their metrics in as ``on_batch``.

Two interchangeable backends produce the same two outputs (crack probability
and the pooled backbone features used by the in-domain check):

* ``onnx``: ONNX Runtime on the ``.onnx`` export that ships beside the
  ``.keras`` model.  The CPU default: measured on 2 cores, the model alone
  runs 1.6× faster than TensorFlow and the service 1.4×, at a quarter of the
  memory per process (docs/performance.md); a worker that uses it never
  imports TensorFlow.
* ``tf``: TensorFlow on the ``.keras`` model, through one ``tf.function``
  with a fixed input signature (so it is traced once).  On a GPU worker this is
  the path that uses the GPU (memory growth on).

Batches hold at most ``batch_size`` images.  The TensorFlow backend pads every
batch to exactly ``batch_size`` so its ``tf.function`` sees a single input shape
(traced once, no retracing in the hot loop).  ONNX Runtime has a dynamic batch
dimension and no tracing, so it runs the real number of images: a single
image (latency) or a chunk's last partial batch costs no padded work.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from shared.config import Settings
from shared.model_card import (INT8_DEFAULT_KEY, INT8_SOURCE_KEY, ModelInfo, file_sha256, int8_onnx_path,
                               onnx_path)

log = logging.getLogger(__name__)

#: Called after each forward pass with (images in the batch, seconds): workers count them in their metrics.
BatchObserver = Callable[[int, float], None]


class Classifier:
    """Loaded model + batched forward function. Build it with :func:`load_classifier`."""

    def __init__(self, info: ModelInfo, batch_size: int, forward, fixed_shape: bool = True,
                 served: "Served | None" = None, on_batch: BatchObserver | None = None):
        self.info = info
        self.on_batch = on_batch
        self.served = served or Served("fp32", info.directory, "unknown")
        self.batch_size = batch_size
        self.fixed_shape = fixed_shape
        self._forward = forward

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Crack probability (N,) and features (N, D) for uint8 images (N, S, S, 3); any N."""
        probs, feats = [], []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            n = len(batch)
            if self.fixed_shape and n < self.batch_size:
                pad = np.zeros((self.batch_size - n,) + batch.shape[1:], dtype=batch.dtype)
                batch = np.concatenate([batch, pad])
            started = time.perf_counter()
            p, f = self._forward(batch.astype(np.float32, copy=False))
            if self.on_batch is not None:
                self.on_batch(n, time.perf_counter() - started)
            probs.append(p[:n, self.info.crack_index])
            feats.append(f[:n])
        if not probs:
            return np.zeros((0,), np.float32), np.zeros((0, 0), np.float32)
        return np.concatenate(probs), np.concatenate(feats)

    def warm_up(self) -> None:
        size = self.info.input_size
        self.predict(np.zeros((1, size, size, 3), dtype=np.uint8))


def load_classifier(settings: Settings, on_batch: BatchObserver | None = None) -> Classifier:
    """The model of ``settings`` loaded and warmed up, exactly as a worker serves it (backend, precision,
    provider); ``crackq evaluate``, training's in-domain fit and the benchmarks use it too."""
    info = ModelInfo.from_model_path(settings.model)
    if settings.backend == "onnx":
        forward, served = _onnx_forward(settings, info)
        classifier = Classifier(info, settings.batch_size, forward, fixed_shape=False, served=served,
                                on_batch=on_batch)
    else:
        classifier = Classifier(info, settings.batch_size, _tf_forward(settings, info), fixed_shape=True,
                                served=Served("fp32", Path(settings.model), "TensorFlow"), on_batch=on_batch)
    classifier.warm_up()
    log.info("loaded model %s (%s backend, batch %d; %s)", info.name, settings.backend, settings.batch_size,
             classifier.served.describe())
    return classifier


# ---- precision and execution provider (issue 15) ---------------------------------------------------
@dataclass(frozen=True)
class Served:
    """What a worker actually serves: precision, file and execution provider (after every fallback)."""

    precision: str
    path: Path
    provider: str
    note: str = ""

    def describe(self) -> str:
        return f"{self.precision} {self.path.name} on {self.provider}" + (f" ({self.note})" if self.note else "")


def int8_problem(model_path: str, as_default: bool = False) -> str | None:
    """Why the INT8 model beside ``model_path`` cannot be served (None: it can).

    It must exist and record the sha256 of the FP32 ONNX it was made from
    (``crackq export --int8`` writes it only after it passed the accuracy
    gate), so an INT8 file left from an older model is never served.
    """
    import onnxruntime as ort

    path = int8_onnx_path(model_path)
    if not path.exists():
        return f"{path.name} not found (make it with `crackq export --int8 {model_path}`)"
    fp32 = onnx_path(model_path)
    if not fp32.exists():
        return f"{fp32.name} (its FP32 source) not found"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    meta = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).get_modelmeta()
    if meta.custom_metadata_map.get(INT8_SOURCE_KEY) != file_sha256(fp32):
        return f"{path.name} was made from another FP32 model (re-run `crackq export --int8 {model_path}`)"
    if as_default and meta.custom_metadata_map.get(INT8_DEFAULT_KEY) != "true":
        return (f"{path.name} did not pass the accuracy gate on every labelled test set (model_card.json "
                "int8.test_gate); set CRACKQ_PRECISION=int8 to serve it anyway")
    return None


def resolve_precision(settings: Settings) -> tuple[str, Path, str]:
    """``(precision, ONNX file, note)`` for an onnx worker.

    ``CRACKQ_PRECISION`` empty: the device decides -- a CPU worker serves INT8
    when the INT8 model of the current FP32 ONNX is there and passed the
    accuracy gate on every labelled test set (else FP32, with the reason in the note); a GPU worker serves FP32 (FP16 on request:
    INT8 QDQ models gain nothing on the CUDA provider).  ``int8`` asked for
    explicitly and not servable is an error, never a silent FP32.
    """
    fp32 = onnx_path(settings.model)
    if settings.precision == "int8":
        problem = int8_problem(settings.model)
        if problem:
            raise FileNotFoundError(f"CRACKQ_PRECISION=int8: {problem}")
        return "int8", int8_onnx_path(settings.model), ""
    if settings.precision in ("fp32", "fp16"):
        return settings.precision, fp32, ""
    if settings.device == "cpu":
        problem = int8_problem(settings.model, as_default=True)
        return ("fp32", fp32, f"INT8 not used: {problem}") if problem else ("int8", int8_onnx_path(settings.model), "")
    return "fp32", fp32, ""


def _providers(settings: Settings) -> list:
    """CUDA first on a GPU worker when onnxruntime-gpu provides it; the CPU provider always last (fallback)."""
    import onnxruntime as ort

    providers: list = ["CPUExecutionProvider"]
    if settings.device == "gpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels (onnxruntime-gpu[cuda,cudnn])
            try:
                ort.preload_dlls()
            except Exception as exc:  # noqa: BLE001 - system CUDA libraries may still be found
                log.warning("onnxruntime.preload_dlls failed: %s", exc)
        providers.insert(0, ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}))
    return providers


def _fp16_model(path: Path) -> bytes:
    """The FP32 ONNX converted to FP16 (inputs/outputs stay float32; the feature statistics stay FP32)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = onnx.load(str(path))
    keep = [n.name for n in proto.graph.node
            if n.op_type in {"Sub", "Sqrt", "Softmax"} or "reduce_std" in n.name or "reduce_variance" in n.name]
    return convert_float_to_float16(proto, keep_io_types=True, node_block_list=keep).SerializeToString()


def _onnx_forward(settings: Settings, info: ModelInfo):
    import onnxruntime as ort

    path = onnx_path(settings.model)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: export it with `crackq export {settings.model}` "
                                "or use CRACKQ_BACKEND=tf")
    precision, path, note = resolve_precision(settings)
    providers = _providers(settings)
    on_gpu = providers[0] != "CPUExecutionProvider"
    if settings.device == "gpu" and not on_gpu:
        note = "; ".join(filter(None, [note, "no CUDA provider (onnxruntime-gpu and a GPU needed): CPU fallback"]))
    if precision == "fp16" and not on_gpu:
        precision, note = "fp32", "; ".join(filter(None, [note, "fp16 needs the CUDA provider: fp32 on the CPU"]))
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.threads or (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle inference threads sleep instead of busy-waiting: they share the cores with the decode threads
    # (and with other worker processes), which a spinning thread would starve (docs/performance.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = _fp16_model(path) if precision == "fp16" else str(path)
    session = ort.InferenceSession(source, options, providers=providers)
    provider = session.get_providers()[0]
    if settings.device == "gpu" and on_gpu and provider != "CUDAExecutionProvider":
        note = "; ".join(filter(None, [note, "CUDA provider failed to start: CPU fallback"]))
    input_name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    prob_name = next(n for n in names if "prob" in n)
    feat_name = next(n for n in names if "feat" in n)

    def forward(batch: np.ndarray):
        p, f = session.run([prob_name, feat_name], {input_name: batch})
        return p, f

    if note:
        log.warning("model %s: %s", path.name, note)
    return forward, Served(precision, path, provider, note)


def configure_tensorflow(settings: Settings):
    """Import TensorFlow with the worker's thread and GPU settings.

    TensorFlow accepts these only before its runtime starts.  In a worker
    process this is the first thing that touches TensorFlow; in a process
    that already ran TensorFlow (tests, a notebook, the benchmark) the
    runtime keeps its settings and a warning says so, instead of failing.
    """
    import tensorflow as tf

    def apply(what: str, change) -> None:
        try:
            change()
        except RuntimeError as exc:
            log.warning("TensorFlow already initialised in this process; %s unchanged (%s)", what, exc)

    if settings.threads:
        apply("intra-op threads", lambda: tf.config.threading.set_intra_op_parallelism_threads(settings.threads))
        apply("inter-op threads", lambda: tf.config.threading.set_inter_op_parallelism_threads(1))
    for gpu in tf.config.list_physical_devices("GPU"):
        # Several processes (or a process and a training job) can share a GPU only with growth on.
        apply("GPU memory growth", lambda gpu=gpu: tf.config.experimental.set_memory_growth(gpu, True))
    if settings.device == "cpu" and tf.config.list_physical_devices("GPU"):
        apply("visible GPUs", lambda: tf.config.set_visible_devices([], "GPU"))
    return tf


def _tf_forward(settings: Settings, info: ModelInfo):
    tf = configure_tensorflow(settings)
    import keras

    from shared.serving import serving_model

    model = serving_model(keras.models.load_model(settings.model, compile=False))
    size = info.input_size
    spec = tf.TensorSpec([settings.batch_size, size, size, 3], tf.float32)

    @tf.function(input_signature=[spec], reduce_retracing=True)
    def run(batch):
        out = model(batch, training=False)
        return out["probabilities"], out["features"]

    def forward(batch: np.ndarray):
        p, f = run(tf.constant(batch))
        return p.numpy(), f.numpy()

    return forward
