"""The in-domain check: does an image (or tile) look like the imagery the model was trained on?

A crack classifier trained on one kind of concrete is confidently wrong on
others, so every result carries ``in_domain`` and ``domain_score``, computed
from the same forward pass as the prediction (the ``features`` output of
:mod:`shared.serving`).

How the score is made (measured against alternatives in ``benchmarks/domain.py``,
numbers in ``docs/drone.md``).  Three distances, each to the training images:

* ``pooled-knn``: cosine distance to the k-th nearest training image in the
  pooled (1280-d) embedding, L2-normalised and reduced to its main PCA axes
  (what the image *shows*);
* one Mahalanobis distance per texture-statistics block (per-channel mean and
  std of an early and a middle backbone layer; how the surface *looks*:
  grain, scale, sharpness, colour).

Each distance is logged and turned into a z-score with its mean and spread on
the validation split; the image's raw score is the mean of those z-scores,
and the threshold is the raw score's 99th percentile on the validation split
(about 1 % of familiar images flagged).  ``domain_score`` is raw / threshold:
about 0 for a typical training image, ``<= 1`` in domain, larger = less familiar.

**Confidence** (issue 10): imagery can look familiar and still be imagery the
model often gets wrong.  A model fitted with ``min_margin`` > 0 also requires
the prediction's margin ``|p - 0.5|`` to reach ``min_margin`` (chosen on the
VALIDATION sets of every training source, so that accuracy on what passes is
at least the target there): ``in_domain`` means "familiar *and* decided", while
``domain_score`` stays the familiarity alone.

The description lives in ``domain.npz`` beside the model (written by
``training/domain_fit.py``); a model without one gets ``in_domain = None``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FILE_NAME = "domain.npz"
#: The description fitted on the INT8 model's features (issue 15): INT8 moves the texture statistics
#: by 4-11 %, far outside the FP32 description's tight Gaussians, so INT8 workers use their own.
INT8_FILE_NAME = "domain.int8.npz"


def file_name(precision: str = "fp32") -> str:
    """The in-domain description a worker serving ``precision`` uses (fp16 is close enough to fp32)."""
    return INT8_FILE_NAME if precision == "int8" else FILE_NAME
FORMAT = 1
_EPS = 1e-12


@dataclass(frozen=True)
class Component:
    """One distance: its feature columns ``[start, stop)``, kind ``knn`` or ``gauss``, and its
    validation statistics of log-distance (``log_mean``, ``log_std``) used to z-score it."""

    name: str
    kind: str
    start: int
    stop: int
    log_mean: float
    log_std: float
    k: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class DomainScorer:
    """A fitted in-domain description: components with their arrays, and the threshold."""

    def __init__(self, meta: dict, arrays: dict[str, np.ndarray]):
        self.meta = meta
        self.feature_dim = int(meta["feature_dim"])
        self.threshold = float(meta["threshold"])
        self.min_margin = float(meta.get("min_margin", 0.0))
        self.components = [Component(**c) for c in meta["components"]]
        self.arrays = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
        self._warned = False

    # -- files -----------------------------------------------------------
    @classmethod
    def load(cls, model_dir: str | Path, precision: str = "fp32") -> "DomainScorer | None":
        """The description beside a model for ``precision``, or None when it has none (or one made for
        another backbone)."""
        path = Path(model_dir) / file_name(precision)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            arrays = {k: npz[k] for k in npz.files if k != "meta"}
        if meta.get("format") != FORMAT:
            log.warning("%s has format %s (expected %s): in-domain check off", path, meta.get("format"), FORMAT)
            return None
        fingerprint = _card_fingerprint(Path(model_dir))
        if fingerprint and meta.get("backbone_fingerprint") and fingerprint != meta["backbone_fingerprint"]:
            log.warning("%s was fitted for another backbone: in-domain check off (refit with crackq domain-fit)",
                        path)
            return None
        return cls(meta, arrays)

    def save(self, path: str | Path) -> None:
        arrays = {k: v.astype(np.float16) if k.endswith(("/bank", "/projection")) else v
                  for k, v in self.arrays.items()}
        np.savez_compressed(path, meta=np.array(json.dumps(self.meta)), **arrays)

    # -- scoring ---------------------------------------------------------
    def distances(self, features: np.ndarray) -> np.ndarray:
        """(N, components) raw distances of ``features`` (N, feature_dim)."""
        x = np.asarray(features, dtype=np.float32)
        return np.stack([self._distance(c, x[:, c.start:c.stop]) for c in self.components], axis=1)

    def raw_scores(self, features: np.ndarray) -> np.ndarray:
        """Mean over components of the z-scored log distance (before dividing by the threshold)."""
        z = [(np.log(np.maximum(d, _EPS)) - c.log_mean) / c.log_std
             for c, d in zip(self.components, self.distances(features).T)]
        return np.mean(z, axis=0)

    def score(self, features: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(domain_score, in_domain)`` per row.  ``probs`` (crack probability per row) is used when the
        description has a ``min_margin``: a row is in domain only if familiar and ``|p - 0.5| >= min_margin``."""
        n = len(features)
        if n == 0:
            return np.zeros(0), np.zeros(0, dtype=object)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            if not self._warned:
                log.warning("model features have %s columns but the in-domain description expects %d "
                            "(re-export the ONNX with `crackq export`): in-domain check off",
                            features.shape[1:], self.feature_dim)
                self._warned = True
            return np.full(n, np.nan), np.full(n, None, dtype=object)
        scores = self.raw_scores(features) / self.threshold
        familiar = scores <= 1.0
        if self.min_margin > 0 and probs is not None and len(probs) == n:
            familiar &= np.abs(np.asarray(probs, dtype=np.float64).reshape(n) - 0.5) >= self.min_margin
        return scores, familiar

    def _distance(self, c: Component, x: np.ndarray) -> np.ndarray:
        a = self.arrays
        if c.kind == "knn":
            y = _unit((_unit(x) - a[f"{c.name}/mean"]) @ a[f"{c.name}/projection"])
            similarity = y @ a[f"{c.name}/bank"].T
            k = min(c.k, similarity.shape[1])
            return 1.0 - np.partition(similarity, -k, axis=1)[:, -k]
        if c.kind == "gauss":
            z = (x.astype(np.float64) - a[f"{c.name}/mean"]) @ a[f"{c.name}/whiten"].astype(np.float64)
            return np.einsum("ij,ij->i", z, z)
        raise ValueError(f"unknown component kind {c.kind!r}")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)


def _card_fingerprint(model_dir: Path) -> str | None:
    from shared.model_card import read_card

    try:
        return read_card(model_dir)["backbone"]["weights_fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
