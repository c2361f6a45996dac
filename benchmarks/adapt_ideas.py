"""Ideas past the frozen-feature ceiling of ``crackq adapt``, measured on uav VALIDATION photos only
(docs/drone.md, "Past the frozen ceiling").  None is shipped; this file keeps them reproducible.

    python -m benchmarks.adapt_ideas adabn BASE.keras OUT.keras uav|mix   # BN statistics re-estimated
    python -m benchmarks.adapt_design extract OUT.keras rows.npz          # then the usual design rows
    python -m benchmarks.adapt_ideas rounds rows.npz 25,50,100,200 random,uncertain,coreset,rounds 2
    python -m benchmarks.adapt_ideas nonlinear rows.npz                   # k-NN / label spreading

``adabn``: every backbone BatchNorm's moving statistics replaced by their values on the unlabelled
tiles of the uav TRAIN photos (``mix``: plus as many Özgenel training patches), running the model in
training mode batch by batch with a running mean (momentum 1 - 1/k).  ``rounds``: 25 random picks,
then rounds of 25 chosen by ``shared.picking.pick_uncertain`` on a head refitted to the labels so far.
The uav TEST photos are never read.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace as NS

import numpy as np

MULTI = ("block_13_expand_relu", "block_10_expand_relu")


def adabn(argv):
    """Write a copy of a base model whose BatchNorm statistics come from unlabelled uav train-photo tiles."""
    import os
    import shutil
    from collections import defaultdict
    from pathlib import Path
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from benchmarks.adaptation import UAV, tiles_from_masks
    from producer.candidates import photo_inputs
    from shared.config import Settings
    from shared.preprocessing import Box

    base, out, mode = argv[0], argv[1], argv[2]
    settings = Settings.load()
    split = json.loads((Path(__file__).resolve().parents[1] / "models" / "uav_split.json").read_text())["photos"]
    tiles = [t for t in tiles_from_masks(UAV, settings.tile_size, 0.002) if Path(t["photo"]).stem in set(split["train"])]
    by_photo = defaultdict(list)
    for i, t in enumerate(tiles):
        by_photo[t["photo"]].append(i)
    x = np.zeros((len(tiles), 160, 160, 3), np.uint8)
    for photo, idx in by_photo.items():
        x[idx] = photo_inputs(photo, [Box(tiles[i]["x"], tiles[i]["y"], tiles[i]["w"], tiles[i]["h"]) for i in idx],
                              settings.tile_size, settings)
    if mode == "mix":
        from training.data import Split, iter_batches
        from training.domain_fit import balanced_sample
        sp = Split.load(Path(base).with_name("split.json"))
        files = balanced_sample(sp.files["train"], len(x), 1)
        x = np.concatenate([x, *[b.astype(np.uint8) for _, b in iter_batches(str(UAV.parent / "concrete"), files, 64, [])]])
    x = x[np.random.default_rng(0).permutation(len(x))]
    import keras
    from training.model import backbone_layers, load_model
    model = load_model(base)
    bns = [layer for layer in backbone_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in bns:
        layer.trainable = True
    for k, start in enumerate(range(0, len(x) - 127, 128), 1):
        for layer in bns:
            layer.momentum = 1.0 - 1.0 / k
        model(x[start:start + 128].astype(np.float32), training=True)
    for layer in bns:
        layer.trainable, layer.momentum = False, 0.99
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    for name in ("split.json", "model_card.json"):
        shutil.copy(Path(base).with_name(name), Path(out).with_name(name))
    print(f"{len(bns)} BatchNorm layers re-estimated on {len(x)} tiles -> {out}")


def _rows(path):
    from training import multisource as ms
    d = dict(np.load(path))
    d["cols"] = ms.head_columns(ms.HeadConfig(extra=MULTI))
    d["views"] = d["pool_views"].astype(np.float32)
    return d


def _fit(d, picked, cv, seed=0):
    """The recipe's core on ``picked`` pool tiles (C and threshold by grouped CV when ``cv``)."""
    from training import adapt_fit as af
    y, photos = d["y"][d["pool_idx"]], d["photos"][d["pool_idx"]]
    new = NS(views=d["views"][:, picked], y=y[picked], groups=photos[picked])
    new.grouped = len(set(new.groups[new.y == 0])) >= 5 and len(set(new.groups[new.y == 1])) >= 5
    rep = NS(train=d["rep_train"], y_train=d["rep_train_y"])
    every = np.arange(len(new.y))
    if not cv:
        return af.fit_head(*af.training_set(new, every, rep, 1.0), 0.03, d["cols"]), 0.5
    folds, trials = af.folds_of(new, 5, seed), {}
    for c in af.C_GRID:
        trials[c] = af.cross_validate(new, folds, lambda rows, c=c: af.fit_head(
            *af.training_set(new, rows, rep, 1.0), c, d["cols"]).prob)
    c = max(af.C_GRID, key=lambda c: (af.estimate(trials[c]), -abs(np.log10(c))))
    return af.fit_head(*af.training_set(new, every, rep, 1.0), c, d["cols"]), af.choose_threshold(new.y, trials[c])


def rounds(argv):
    """Picking strategies (random, one-shot uncertain, pure k-centre, refit rounds) over label budgets."""
    from shared.picking import _k_centre, pick_random, pick_uncertain
    from training import adapt_fit as af

    d = _rows(argv[0])
    budgets, strategies = [int(b) for b in argv[1].split(",")], argv[2].split(",")
    seeds = int(argv[3]) if len(argv) > 3 else 2
    pool, val = d["pool_idx"], d["val_idx"]
    ypool, gpool = d["y"][pool], d["photos"][pool]
    feats = d["views"][0, :, :1280]

    def coreset(n):
        unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        return _k_centre(unit, np.full(len(unit), 0.5), np.unique(gpool, return_inverse=True)[1], n)

    def refit_rounds(n, seed, step=25):
        picked = list(pick_random(len(pool), step, seed))
        while len(picked) < n:
            head, _ = _fit(d, np.array(picked), cv=False)
            free = np.setdiff1d(np.arange(len(pool)), picked)
            sub = pick_uncertain(head.prob(d["views"][0])[free], feats[free], list(gpool[free]),
                                 min(step, n - len(picked)), 0.5)
            picked += [int(free[i]) for i in sub]
        return picked

    summary: dict = {}
    for strategy in strategies:
        for seed in range(1 if strategy in ("uncertain", "coreset") else seeds):
            for n in budgets:
                picked = np.array({"random": lambda: pick_random(len(pool), n, seed),
                                   "uncertain": lambda: pick_uncertain(d["pool_p"], feats, list(gpool), n, 0.5),
                                   "coreset": lambda: coreset(n),
                                   "rounds": lambda: refit_rounds(n, seed)}[strategy]())
                head, t = _fit(d, picked, cv=True, seed=seed)
                row = {"strategy": strategy, "seed": seed, "n": n, "crack": int(ypool[picked].sum()),
                       "uav_val": round(af.balanced_accuracy(d["y"][val], head.prob(d["val_rows"]), t), 4),
                       "ozg_val": round(float(np.mean((head.prob(d["rep_val"]) >= t) == d["rep_val_y"].astype(bool))), 4)}
                print(json.dumps(row), flush=True)
                summary.setdefault((strategy, n), []).append(row["uav_val"])
    for key, values in sorted(summary.items()):
        print(key, round(float(np.mean(values)), 4))


def nonlinear(argv):
    """k-NN with every pool tile labelled, and label spreading over pool + val tiles from 100/200 labels."""
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.semi_supervised import LabelSpreading
    from shared.picking import pick_random
    from training import adapt_fit as af

    d = _rows(argv[0])
    pool, val = d["pool_idx"], d["val_idx"]
    p, v = d["views"][0][:, d["cols"]], d["val_rows"][:, d["cols"]]
    mean, std = p.mean(0), p.std(0) + 1e-6
    pca = PCA(64, random_state=0).fit(np.concatenate([(p - mean) / std, (v - mean) / std]))
    p, v = pca.transform((p - mean) / std), pca.transform((v - mean) / std)
    yp, yv = d["y"][pool], d["y"][val]
    for k in (5, 15, 31):
        knn = KNeighborsClassifier(k, weights="distance").fit(p, yp)
        print("knn, all pool labels, k", k, round(af.balanced_accuracy(yv, knn.predict_proba(v)[:, 1], 0.5), 4))
    for n in (100, 200):
        for seed in (0, 1):
            picked = np.array(pick_random(len(pool), n, seed))
            labels = np.full(len(pool) + len(val), -1)
            labels[picked] = yp[picked]
            for gamma in (0.01, 0.03, 0.1):
                ls = LabelSpreading(kernel="rbf", gamma=gamma, alpha=0.2, max_iter=100)
                ls.fit(np.concatenate([p, v]) / 8.0, labels)
                pv = np.nan_to_num(ls.label_distributions_[len(pool):, 1], nan=0.5)
                print("spreading", n, seed, gamma, round(af.balanced_accuracy(yv, pv, 0.5), 4))


if __name__ == "__main__":
    {"adabn": adabn, "rounds": rounds, "nonlinear": nonlinear}[sys.argv[1]](sys.argv[2:])
