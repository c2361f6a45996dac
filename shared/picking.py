"""Which tiles a person should label first: uncertain ones, spread over photos and over what they show.

A survey has tens of thousands of tiles and a person labels a few hundred.
Random tiles are mostly plain concrete the model already gets right, so most
labels teach it nothing.  :func:`pick_uncertain` instead

1. keeps the candidates whose crack probability is nearest the decision
   threshold (the ones the model is unsure about: a label there moves the
   decision boundary), ``POOL_FACTOR`` times as many as asked for, no photo
   giving more than half the budget, and
2. among them runs a k-centre greedy walk over the L2-normalised pooled
   features (each step takes the candidate farthest from everything picked
   so far), weighted by uncertainty and divided by how many tiles of the same
   photo were already taken, so the picks cover different-looking surfaces
   and different photos instead of thirty near-identical stains.

The order matters: the first picks are the most useful, so a labeller who
stops early has labelled the best tiles.  :func:`pick_random` is the old
behaviour (seeded, for teams that want an unbiased sample to measure on).
"""

from __future__ import annotations

import numpy as np

STRATEGIES = ("uncertain", "random")
#: Candidates kept for the diversity walk, as a multiple of the tiles asked for.
POOL_FACTOR = 4


def uncertainty(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """1 at the threshold, 0 at the confident end (0 or 1), linear in between."""
    probs = np.asarray(probs, dtype=np.float64)
    span = np.where(probs >= threshold, max(1.0 - threshold, 1e-9), max(threshold, 1e-9))
    return 1.0 - np.clip(np.abs(probs - threshold) / span, 0.0, 1.0)


def pick_random(count: int, n: int, seed: int = 0) -> list[int]:
    """``n`` distinct indices of ``range(count)`` drawn with ``seed`` (all of them, shuffled, if n >= count)."""
    order = np.random.default_rng(seed).permutation(count)
    return [int(i) for i in order[:n]]


def pick_uncertain(probs: np.ndarray, features: np.ndarray | None, groups, n: int, threshold: float = 0.5,
                   pool_factor: int = POOL_FACTOR) -> list[int]:
    """Indices of ``n`` tiles to label, most useful first.

    ``features`` (N, D) are the tiles' pooled backbone features (None: rank by
    uncertainty and photo only); ``groups`` (N,) names each tile's photo.
    """
    probs = np.asarray(probs, dtype=np.float64)
    n = min(n, len(probs))
    if n <= 0:
        return []
    unc = uncertainty(probs, threshold)
    groups = np.asarray(groups if groups is not None else np.zeros(len(probs)))
    pool = _pool(unc, groups, min(len(probs), n * pool_factor), max(1, -(-n // 2)))
    groups = groups[pool]
    _, group_ids = np.unique(groups, return_inverse=True)
    if features is None:
        feats = np.zeros((len(pool), 1))
    else:
        feats = np.asarray(features, dtype=np.float64)[pool]
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    return [int(pool[i]) for i in _k_centre(feats, unc[pool], group_ids, n)]


def _pool(unc: np.ndarray, groups: np.ndarray, size: int, per_group: int) -> np.ndarray:
    """``size`` of the ``2 * size`` most uncertain tiles, taken photo by photo in rounds of ``per_group``
    (one photo of a stained wall must not fill the pool while other photos have candidates)."""
    order = np.argsort(-unc, kind="stable")[:2 * size]
    seen: dict = {}
    rounds = np.empty(len(order), np.int64)
    for k, i in enumerate(order):
        rounds[k] = seen.get(groups[i], 0) // per_group
        seen[groups[i]] = seen.get(groups[i], 0) + 1
    return order[np.lexsort((np.arange(len(order)), rounds))][:size]


def _k_centre(feats: np.ndarray, unc: np.ndarray, group_ids: np.ndarray, n: int) -> list[int]:
    """Greedy k-centre with an uncertainty weight and a per-photo penalty; first pick = most uncertain."""
    taken_per_group = np.zeros(group_ids.max() + 1)
    chosen = [int(np.argmax(unc))]
    mindist = np.linalg.norm(feats - feats[chosen[0]], axis=1)
    taken_per_group[group_ids[chosen[0]]] += 1
    free = np.ones(len(feats), bool)
    free[chosen[0]] = False
    # A distance of 0 (features off, or duplicates) still lets uncertainty and photo spread decide.
    while len(chosen) < n:
        score = (mindist + 1e-3) * (0.5 + unc) / (1.0 + taken_per_group[group_ids])
        score[~free] = -np.inf
        i = int(np.argmax(score))
        chosen.append(i)
        free[i] = False
        taken_per_group[group_ids[i]] += 1
        mindist = np.minimum(mindist, np.linalg.norm(feats - feats[i], axis=1))
    return chosen
