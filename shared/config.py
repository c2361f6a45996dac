"""Every crackq setting, in one place.

Each setting has one default here, can be set by a ``CRACKQ_*`` environment
variable, and may be overridden by a CLI flag (the CLIs pass flags to
:meth:`Settings.load`).  Workers, producer and training all read the same
object, so a value never has two sources of truth.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from shared.checks import check_tiling
from shared.model_card import MODEL_FILE

ENV_PREFIX = "CRACKQ_"
#: Values of the ``precision`` setting; "" = chosen by device (``shared.inference.resolve_precision``).
PRECISIONS = ("", "int8", "fp32", "fp16")

#: The repository root when installed in editable mode (the default set-up).
PROJECT_ROOT = Path(__file__).resolve().parent.parent
#: The model that ships with the project (trained by ``crackq train``).
DEFAULT_MODEL = PROJECT_ROOT / "models" / MODEL_FILE


def _split_roots(value: str) -> tuple[str, ...]:
    """Data roots from ``CRACKQ_DATA_ROOTS``: comma- or os.pathsep-separated; ``s3://bucket/prefix/`` kept as is.

    ``:`` (os.pathsep on POSIX) also separates roots, except where it starts ``://``,
    so ``/data:/more``, ``/data,s3://survey-bucket/`` and ``/data:s3://survey-bucket/`` all work.
    """
    separators = "," + (r"|:(?!//)" if os.pathsep == ":" else "|" + re.escape(os.pathsep))
    parts = (p.strip() for p in re.split(separators, value))
    return tuple(p if p.lower().startswith("s3://") else os.path.abspath(p) for p in parts if p)


def _parse_bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    """Runtime settings shared by producer, worker and training.

    Field metadata ``env`` names the environment variable; ``help`` is shown
    by ``crackq settings`` and documented in ``.env.example``.
    """

    redis_url: str = field(default="", metadata={
        "help": "Redis URL used as broker and job store (redis://, rediss://, unix://). "
                "Empty: `crackq run` starts a private Redis; other commands use redis://localhost:6379/0."})
    model: str = field(default=str(DEFAULT_MODEL), metadata={
        "help": "Path of the trained Keras model (.keras); its .onnx export and model card sit beside it."})
    backend: str = field(default="onnx", metadata={
        "gpu": "tf",
        "help": "Inference backend of workers: onnx (ONNX Runtime, fastest on CPU) or tf (TensorFlow). "
                "Default on a GPU device: tf, unless a precision is set (a precision means ONNX Runtime)."})
    device: str = field(default="cpu", metadata={"help": "cpu or gpu (GPU: one worker process per GPU)."})
    gpu_count: int = field(default=0, metadata={
        "help": "GPUs a gpu worker spreads its processes over (process i uses GPU i mod count). "
                "0: `crackq worker` counts them (CUDA_VISIBLE_DEVICES, nvidia-smi)."})
    # ---- precision (issue 15) ----
    precision: str = field(default="", metadata={
        "help": "Model precision of onnx workers: int8 (the INT8 model beside the FP32 ONNX), fp32, or fp16 "
                "(GPU). Empty: by device -- int8 on CPU when the INT8 model of the current FP32 ONNX passed the "
                "accuracy gate on every labelled test set (`crackq export --int8` records it), else fp32."})
    # ---- end precision ----
    backbone_weights: str = field(default="imagenet", metadata={
        "help": "MobileNetV2 backbone weights for training: 'imagenet' (downloaded by Keras) or a .h5 path."})
    batch_size: int = field(default=8, metadata={
        "gpu": 128,
        "help": "Images (or tiles) per forward pass in a worker (default on a GPU device: 128)."})
    chunk_size: int = field(default=64, metadata={"help": "Images per queued task (chunk)."})
    result_ttl: int = field(default=7 * 24 * 3600, metadata={
        "help": "Seconds that a job and its results live in Redis after their last update."})
    data_roots: tuple[str, ...] = field(default=(), metadata={
        "help": "Folders and s3://bucket/prefix/ URLs (comma- or os.pathsep-separated) workers may read images "
                "from; any other bucket or prefix is refused. Empty: the worker's working directory."})
    threshold: float = field(default=0.5, metadata={
        "help": "crack_probability at or above which an image (or tile) is labelled crack."})
    tile_size: int = field(default=227, metadata={
        "help": "Images larger than this (px) are cut into tiles of this size; 0 disables tiling."})
    tile_overlap: int = field(default=0, metadata={"help": "Overlap between neighbouring tiles (px)."})
    scales: tuple[int, ...] = field(default=(1,), metadata={
        "parse": "scales",
        "help": "Comma-separated tiling scales of large photos: 1 = tiles of tile_size, 2 = of half of it "
                "(each resized to the model input); a region's crack probability combines the scales "
                "(docs/drone.md: accuracy and cost per scale; default 1: most accurate at threshold 0.5, "
                "5x cheaper than 1,2)."})
    max_pixels: int = field(default=150_000_000, metadata={
        "help": "Images with more pixels than this are refused with an error record (decompression bombs)."})
    max_file_bytes: int = field(default=512 * 1024 * 1024, metadata={
        "help": "Files larger than this are refused with an error record."})
    raster_window: int = field(default=4096, metadata={
        "help": "GeoTIFFs (and TIFFs larger than this squared) are read by windows of about this many px a side "
                "(whole tiles), one window per task item, so a large orthomosaic spreads over all workers."})
    queue: str = field(default="crackq", metadata={"help": "Celery queue name."})
    visibility_timeout: int = field(default=3600, metadata={
        "help": "Seconds before an unacknowledged chunk (its worker died) is delivered again."})
    task_time_limit: int = field(default=1800, metadata={
        "help": "Hard time limit of one chunk (s); the soft limit is 90% of it. Must be < visibility_timeout."})
    max_retries: int = field(default=3, metadata={"help": "Retries of a chunk after a transient error."})
    lease_seconds: int = field(default=30, metadata={
        "help": "Lifetime of a chunk's lease: a chunk delivered this long ago whose worker stopped renewing "
                "its lease (every third of it) is put back on the queue by any live worker or `crackq wait`."})
    max_deliveries: int = field(default=3, metadata={
        "help": "Times a chunk may be started without finishing (its worker died each time) before its "
                "images get error records instead of another run."})
    max_tiles: int = field(default=4096, metadata={
        "help": "Tiles per image above which the image is refused with an error record (bounds memory)."})
    redis_retry_seconds: float = field(default=20.0, metadata={
        "help": "Seconds a Redis command keeps retrying a lost connection (Redis restarting) before it fails; "
                "a chunk that still fails is retried by Celery with backoff (CRACKQ_MAX_RETRIES)."})
    threads: int = field(default=0, metadata={"help": "Inference threads per worker process (0: automatic)."})
    decode_threads: int = field(default=2, metadata={"help": "Image decoding threads per worker process."})
    metrics_port: int = field(default=0, metadata={
        "help": "Port of the worker's Prometheus /metrics endpoint (0: off): one per `crackq worker`, "
                "summing its pool processes."})
    log_level: str = field(default="INFO", metadata={"help": "Worker log level."})

    @classmethod
    def load(cls, **overrides) -> "Settings":
        """Defaults, then ``CRACKQ_*`` environment variables, then non-None overrides."""
        values = {}
        for f in fields(cls):
            raw = os.environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _convert(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        _device_defaults(values)
        if isinstance(values.get("scales"), (str, list)):
            values["scales"] = parse_scales(values["scales"])
        if isinstance(values.get("data_roots"), str):
            values["data_roots"] = _split_roots(values["data_roots"])
        return cls(**values).validated()

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def validated(self) -> "Settings":
        if self.backend not in {"onnx", "tf"}:
            raise ValueError(f"backend must be 'onnx' or 'tf', not {self.backend!r}")
        if self.device not in {"cpu", "gpu"}:
            raise ValueError(f"device must be 'cpu' or 'gpu', not {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of int8, fp32, fp16 or empty (by device), not {self.precision!r}")
        if self.precision in {"int8", "fp16"} and self.backend != "onnx":
            raise ValueError(f"precision {self.precision} needs backend onnx (TensorFlow serves fp32)")
        if self.chunk_size < 1 or self.batch_size < 1:
            raise ValueError("chunk_size and batch_size must be at least 1")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError("threshold must be between 0 and 1")
        if self.task_time_limit >= self.visibility_timeout:
            raise ValueError("task_time_limit must be below visibility_timeout, or a slow chunk is delivered twice")
        if self.raster_window < 256:
            raise ValueError("raster_window must be at least 256 px")
        check_tiling(self.tile_size, self.tile_overlap)
        if self.max_tiles < 1 or self.max_deliveries < 1:
            raise ValueError("max_tiles and max_deliveries must be at least 1")
        if self.lease_seconds < 3:
            raise ValueError("lease_seconds must be at least 3 (renewed every third of it)")
        if not self.scales or any(not isinstance(v, int) or v < 1 for v in self.scales):
            raise ValueError(f"scales must be positive integers, e.g. 1,2 (got {self.scales!r})")
        return self

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or "redis://localhost:6379/0"

    @property
    def effective_data_roots(self) -> tuple[str, ...]:
        return self.data_roots or (os.path.abspath(os.getcwd()),)

    @property
    def soft_time_limit(self) -> int:
        return max(1, int(self.task_time_limit * 0.9))


def _device_defaults(values: dict) -> None:
    """A GPU device's defaults (field metadata ``gpu``) for every field not set by variable or flag.

    One place decides them, so ``CRACKQ_DEVICE=gpu`` and ``--device gpu`` serve alike.  A precision
    asks for ONNX Runtime, so it keeps the ``onnx`` backend.
    """
    if values.get("device") != "gpu":
        return
    for f in fields(Settings):
        if "gpu" in f.metadata and f.name not in values:
            if f.name == "backend" and values.get("precision"):
                continue
            values[f.name] = f.metadata["gpu"]


def default(name: str):
    """The default of setting ``name`` (as declared above, before environment and flags)."""
    return Settings.__dataclass_fields__[name].default


def default_concurrency(settings: "Settings | None" = None) -> int:
    """Worker processes when none is given: one per core on CPU (docs/performance.md), one on a GPU device."""
    if settings is not None and settings.device == "gpu":
        return 1
    return max(1, os.cpu_count() or 1)


def parse_scales(value) -> tuple[int, ...]:
    """``"1,2"`` (or a sequence) -> (1, 2): sorted, unique, each a positive integer."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        scales = tuple(sorted({int(str(p).strip()) for p in parts if str(p).strip()}))
    except ValueError:
        raise ValueError(f"scales must be comma-separated positive integers, e.g. 1,2 (got {value!r})") from None
    if not scales or scales[0] < 1:
        raise ValueError(f"scales must be comma-separated positive integers, e.g. 1,2 (got {value!r})")
    return scales


def _convert(f: dataclasses.Field, raw: str):
    if f.metadata.get("parse") == "scales":
        return parse_scales(raw)
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind.startswith("tuple"):
        return _split_roots(raw)
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "bool":
        return _parse_bool(raw)
    return raw


def describe() -> list[tuple[str, str, str]]:
    """(ENV_NAME, default, help) rows: the documentation of every setting."""
    rows = []
    for f in fields(Settings):
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        rows.append((ENV_PREFIX + f.name.upper(), str(default), f.metadata.get("help", "")))
    return rows
