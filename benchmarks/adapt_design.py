"""Design experiments of ``crackq adapt``'s head (docs/drone.md, "Design choices"): on VALIDATION photos only.

    python -m benchmarks.adapt_design extract BASE_MODEL.keras rows.npz     # ~2 min: rows of uav tiles + replay
    python -m benchmarks.adapt_design variants rows.npz 100 pooled,multi,all 2   # budgets, variants, seeds

``extract`` cuts the 227 px tiles of uav-concrete (as benchmarks.adaptation), and stores the feature rows
(:mod:`training.multisource` layout) of the 8 views of every TRAIN-photo tile (the pool) and of every
VAL-photo tile, plus an Özgenel replay train sample (1000) and val sample (600), through BASE_MODEL.
``variants`` picks n pool tiles (uncertain / random), fits a head variant with the recipe's core
(:mod:`training.adapt_fit`: balancing, replay, C by grouped CV, threshold), and scores the uav VAL tiles
and the Özgenel val sample.  Variant syntax: ``COLUMNS[:rw=W][:C=C][:stack=S]`` with COLUMNS one of
pooled, multi (pooled + block_13 + block_10 means), multi6 (+ block_6), all (every row column); rw: replay
weight; C: fixed strength (no CV); stack: the base model's logit as an extra column, times S.
The uav TEST photos are never read.
"""

from __future__ import annotations

import sys


def extract(argv):
    """Rows of uav tiles (pool: 8 views; val: 1) and Özgenel replay samples through a base model, to an npz."""
    import json, os, sys, time
    from collections import defaultdict
    from pathlib import Path
    import numpy as np
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from benchmarks.adaptation import tiles_from_masks, UAV
    from producer.candidates import photo_inputs
    from shared.config import Settings
    from shared.preprocessing import Box
    from training.adapt import dihedral

    base, out = argv[0], argv[1]
    settings = Settings.load(); size = settings.tile_size
    tiles = tiles_from_masks(UAV, size, 0.002)
    split = json.load(open(str(Path(__file__).resolve().parents[1] / "models" / "uav_split.json")))["photos"]
    which = {p: s for s, ps in split.items() for p in ps}
    part = np.array([which[Path(t["photo"]).stem] for t in tiles])
    y = np.array([t["crack"] for t in tiles], int)
    by_photo = defaultdict(list)
    for i, t in enumerate(tiles):
        by_photo[t["photo"]].append(i)
    inputs = np.zeros((len(tiles), 160, 160, 3), np.uint8)
    for photo, idx in by_photo.items():
        inputs[idx] = photo_inputs(photo, [Box(tiles[i]["x"], tiles[i]["y"], tiles[i]["w"], tiles[i]["h"]) for i in idx], size, settings)
    import keras
    from training.model import load_model, inference_fn
    from training import multisource as ms
    m = load_model(base)
    ext = ms.extractor(m)
    both0 = inference_fn(keras.Model(m.inputs, {"p": m.output, "r": ext.output}))
    both = lambda x: (lambda o: (o["p"], o["r"]))(both0(x))
    def run(x):
        P, R = [], []
        for i in range(0, len(x), 64):
            p, r = both(x[i:i+64].astype(np.float32)); P.append(p[:, 1]); R.append(r)
        return np.concatenate(P), np.concatenate(R).astype(np.float32)
    t0 = time.time()
    sel = {s: np.flatnonzero(part == s) for s in ("train", "val")}
    res = {}
    p, r = run(inputs[sel["val"]]); res["val_p"], res["val_rows"] = p, r
    views = dihedral(inputs[sel["train"]])
    vr = []
    for k, v in enumerate(views):
        p, r = run(v); vr.append(r)
        if k == 0: res["pool_p"] = p
    res["pool_views"] = np.stack(vr).astype(np.float16)
    print("uav rows", time.time() - t0, flush=True)
    from training.data import Split, iter_batches, labels_of
    from training.domain_fit import balanced_sample
    sp = Split.load(Path(base).with_name("split.json"))
    root = str(UAV.parent / "concrete")
    for name, files in (("rep_train", balanced_sample(sp.files["train"], 1000, 0)), ("rep_val", balanced_sample(sp.files["val"], 600, 0))):
        R, P = [], []
        for pos, b in iter_batches(root, files, 64, []):
            p, r = run(b); R.append(r); P.append(p)
        res[name] = np.concatenate(R); res[name + "_y"] = labels_of(sp.classes, files); res[name + "_p"] = np.concatenate(P)
    print("replay rows", time.time() - t0, flush=True)
    np.savez(out, y=y, part=part, photos=np.array([Path(t["photo"]).stem for t in tiles]),
             pool_idx=sel["train"], val_idx=sel["val"], **res)



def variants(argv):
    """Head variants on the rows of :func:`extract`, scored on uav VAL tiles and the Özgenel val sample."""
    import json, time
    import numpy as np
    from types import SimpleNamespace as NS
    from training import adapt_fit as af
    from training import multisource as ms
    from shared.picking import pick_random, pick_uncertain

    d = dict(np.load(argv[0]))
    budgets = [int(b) for b in argv[1].split(",")]
    variants = argv[2].split(",")
    seeds = int(argv[3]) if len(argv) > 3 else 2
    y, photos = d["y"], d["photos"]
    pool, val = d["pool_idx"], d["val_idx"]
    views = d["pool_views"].astype(np.float32)
    L = ms.column_layout()
    cols = {"pooled": af.pooled_columns(),
            "multi": ms.head_columns(ms.HeadConfig(extra=("block_13_expand_relu", "block_10_expand_relu"))),
            "multi6": ms.head_columns(ms.HeadConfig(extra=("block_13_expand_relu", "block_10_expand_relu", "block_6_expand_relu"))),
            "all": np.arange(views.shape[-1])}
    print("base: uav val", round(af.balanced_accuracy(y[val], d["val_p"], 0.5), 4),
          "ozg val", round(af.balanced_accuracy(d["rep_val_y"], d["rep_val_p"], 0.5), 4), flush=True)

    def logit(p): p = np.clip(p, 1e-6, 1 - 1e-6); return np.log(p / (1 - p))

    def run(variant, picked, seed):
        spec = dict(kv.split("=") for kv in variant.split(":")[1:])
        colname = variant.split(":")[0]
        rw = float(spec.get("rw", 1.0)); Cs = [float(spec["C"])] if "C" in spec else af.C_GRID
        stack = "stack" in spec
        V = views[:, picked]
        extra_cols = cols[colname]
        def aug(rows, p):  # stacking: base logit as an extra column
            return np.concatenate([rows, logit(p)[:, None] * float(spec.get("stack", 1))], 1) if stack else rows
        if stack:
            V = np.concatenate([V, np.repeat(logit(d["pool_p"][picked])[None, :, None] * float(spec["stack"]), V.shape[0], 0)], 2)
            extra_cols = np.concatenate([extra_cols, [views.shape[-1]]])
        new = NS(views=V, y=y[pool][picked], groups=photos[pool][picked], grouped=True)
        new.grouped = len(set(new.groups[new.y == 0])) >= 5 and len(set(new.groups[new.y == 1])) >= 5
        rep = NS(train=aug(d["rep_train"], d["rep_train_p"]), y_train=d["rep_train_y"])
        folds = af.folds_of(new, 5, seed)
        trials = {}
        for c in Cs:
            f = lambda rows, c=c: af.fit_head(*af.training_set(new, rows, rep, rw), c, extra_cols).prob
            trials[c] = af.cross_validate(new, folds, f) if len(Cs) > 1 else None
        c = max(Cs, key=lambda c: (af.estimate(trials[c]), -abs(np.log10(c)))) if len(Cs) > 1 else Cs[0]
        head = af.fit_head(*af.training_set(new, np.arange(len(new.y)), rep, rw), c, extra_cols)
        t = af.choose_threshold(new.y, trials[c]) if trials[c] else 0.5
        pv = head.prob(aug(d["val_rows"], d["val_p"]))
        po = head.prob(aug(d["rep_val"], d["rep_val_p"]))
        return {"C": c, "t": round(t, 3), "uav_val": af.balanced_accuracy(y[val], pv, t), "uav_val_05": af.balanced_accuracy(y[val], pv, 0.5),
                "ozg_val": float(np.mean((po >= t) == d["rep_val_y"].astype(bool))),
                "cv": af.estimate(trials[c]) if trials[c] else None}

    res = []
    for n in budgets:
        for strat in ("uncertain", "random"):
            for seed in range(seeds):
                if strat == "random":
                    picked = np.array(pick_random(len(pool), n, seed))
                else:
                    if seed > 0: continue  # deterministic
                    picked = np.array(pick_uncertain(d["pool_p"], views[0, :, :1280], list(photos[pool]), n, 0.5))
                yy = y[pool][picked]
                if min(np.bincount(yy, minlength=2)) < 4: continue
                for v in variants:
                    t0 = time.time(); r = run(v, picked, seed)
                    r.update(n=n, strategy=strat, seed=seed, variant=v, s=round(time.time() - t0, 1)); res.append(r)
                    print(json.dumps({k: (round(x, 4) if isinstance(x, float) else x) for k, x in r.items()}), flush=True)
    print("\nsummary (mean over seeds): variant n strategy uav_val ozg_val")
    import collections
    g = collections.defaultdict(list)
    for r in res: g[(r["variant"], r["n"], r["strategy"])].append(r)
    for k, rs in sorted(g.items()):
        print(k, round(np.mean([r["uav_val"] for r in rs]), 4), round(np.mean([r["uav_val_05"] for r in rs]), 4), round(np.mean([r["ozg_val"] for r in rs]), 4))



if __name__ == "__main__":
    {"extract": extract, "variants": variants}[sys.argv[1]](sys.argv[2:])
