"""Pooled backbone features (the head's inputs), computed once per (backbone, file list) and cached on disk.

With a frozen backbone every epoch would push the same images through the
same 2.2 M frozen weights; computing the 1280-d ``pooled`` features once and
training only the head on them turns an hour of CPU time into a minute.
The cache lives outside the repository (``~/.cache/crackq`` by default) and is
keyed by the backbone's weights fingerprint, the input preprocessing and the
exact file list (paths, sizes, modification times), so a stale entry cannot be hit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.preprocessing import INPUT_SIZE, RESAMPLE
from training import model as model_lib
from training.data import iter_batches, list_sha256

log = logging.getLogger(__name__)

EXTRACT_BATCH = 64


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "crackq"


@dataclass
class Features:
    """Features of ``files`` in order; ``ok[i]`` is False where the image could not be read."""

    files: list[str]
    features: np.ndarray
    ok: np.ndarray
    bad: list[dict]
    seconds: float = 0.0
    cached: bool = False

    def rows(self, files) -> np.ndarray:
        """Feature rows of ``files`` (which must all be readable)."""
        index = {f: i for i, f in enumerate(self.files)}
        return self.features[[index[f] for f in files]]

    @property
    def images_per_second(self) -> float | None:
        return float(self.ok.sum() / self.seconds) if self.seconds and not self.cached else None


def cache_key(backbone_sha: str, root: str, files: list[str], head_inputs: str = "pooled") -> str:
    """sha256 of everything the features depend on (``head_inputs``: which layers the head reads)."""
    stats = []
    for f in files:
        st = os.stat(os.path.join(root, f))
        stats.append(f"{f}\t{st.st_size}\t{st.st_mtime_ns}")
    doc = {"backbone": backbone_sha, "size": INPUT_SIZE, "resample": str(RESAMPLE),
           "root": os.path.realpath(root), "files": list_sha256(files), "stats": list_sha256(stats)}
    if head_inputs != "pooled":  # keys of pooled-only caches stay as they were
        doc["head_inputs"] = head_inputs
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def extract(model, root: str, files: list[str], cache_dir: str | os.PathLike | None = None,
            progress=None) -> Features:
    """Pooled features of ``files`` (via the cache when possible).

    ``progress`` is an optional callable ``advance(n_images)`` for a progress bar.
    """
    backbone_sha = model_lib.weights_fingerprint(model_lib.backbone_layers(model))
    features_model = model_lib.feature_model(model)
    dim = int(features_model.output.shape[-1])
    head_inputs = "pooled" if dim == model_lib.FEATURES_DIM else ",".join(
        layer.name for layer in model.layers if layer.name.startswith("mean_"))
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "features" / f"{cache_key(backbone_sha, root, files, head_inputs)}.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as npz:
                bad = json.loads(str(npz["bad"]))
                log.info("features from cache %s", path)
                if progress:
                    progress(len(files))
                return Features(list(files), npz["features"], npz["ok"], bad, cached=True)

    fn = model_lib.inference_fn(features_model)
    feats = np.zeros((len(files), dim), np.float32)
    ok = np.zeros(len(files), bool)
    bad: list[dict] = []
    start = time.perf_counter()
    for positions, images in iter_batches(root, files, EXTRACT_BATCH, bad):
        feats[positions] = fn(images)
        ok[positions] = True
        if progress:
            progress(len(positions))
    seconds = time.perf_counter() - start
    if progress and bad:
        progress(len(bad))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, features=feats, ok=ok, bad=np.array(json.dumps(bad)))
        os.replace(tmp, path)
    return Features(list(files), feats, ok, bad, seconds)
