"""How well does ``in_domain`` separate familiar from unfamiliar imagery?  Shipped check vs baselines, one run.

For each set of images the table gives the share flagged out of domain (for
the held-out TEST split of the concrete data: the share passed as in domain).
Every method is thresholded at the 99th percentile of its scores on the
VALIDATION split (about 1 % false alarms), so the columns are comparable:

* ``baseline``: plain Mahalanobis distance on the 1280 pooled features
  (empirical covariance, pseudo-inverse), the check the issue measured;
* ``pooled kNN``, ``texture stats``: the shipped check's parts on their own;
* ``shipped``: the shipped check (``models/domain.npz``, as workers load it);
* ``shipped+conf``: the shipped check plus the prediction's uncertainty as a
  fourth z-scored term (tested, not shipped: see the table).

The unfamiliar sets are generated (benchmarks/common/imagery.py) from TEST-split patches
(concrete at other scales, blurred, recoloured, inverted, grooved, worn to the
aggregate) and from code (asphalt, brick, wood, foliage, sky, noise).  The
table also gives the model's share of "crack" answers and its accuracy where a
set's true label is known, to show where a flag matters.

    python benchmarks/domain.py [--per-set 200] [--model models/crackq_mobilenetv2.keras]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import CONCRETE, REPO
from benchmarks.common.imagery import UNFAMILIAR, unfamiliar_images
from shared.domain import DomainScorer
from shared.preprocessing import resize_to_input
from shared.serving import POOLED_DIM
from training.data import Split
from training.domain_fit import TRAIN_SAMPLE, balanced_sample, features_of, onnx_classifier

QUANTILE = 0.99


def plain_mahalanobis(train: np.ndarray):
    """The baseline: squared Mahalanobis distance with the empirical covariance (pseudo-inverse)."""
    mean = train.mean(axis=0)
    precision = np.linalg.pinv(np.cov(train, rowvar=False))
    return lambda x: np.einsum("ij,jk,ik->i", x - mean, precision, x - mean)


def methods(scorer: DomainScorer, train_pooled: np.ndarray):
    """name -> function(features, probs) -> scores (higher = less familiar)."""
    baseline = plain_mahalanobis(train_pooled.astype(np.float64))
    comps = scorer.components

    def z(features):
        d = np.log(np.maximum(scorer.distances(features), 1e-12))
        return np.stack([(d[:, i] - c.log_mean) / c.log_std for i, c in enumerate(comps)], axis=1)

    texture = [i for i, c in enumerate(comps) if c.kind == "gauss"]
    return {
        "baseline": lambda f, p: baseline(f[:, :POOLED_DIM].astype(np.float64)),
        "pooled kNN": lambda f, p: z(f)[:, 0],
        "texture stats": lambda f, p: z(f)[:, texture].mean(axis=1),
        "shipped": lambda f, p: scorer.score(f, p)[0],
        "shipped+conf": None,  # filled in below: needs validation statistics of the confidence term
    }


def uncertainty(probs: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(0.5 - np.abs(probs - 0.5), 1e-6))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO / "models" / "crackq_mobilenetv2.keras"))
    ap.add_argument("--data", default=str(CONCRETE))
    ap.add_argument("--per-set", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "domain.json"))
    args = ap.parse_args()

    model_dir = Path(args.model).parent
    scorer = DomainScorer.load(model_dir)
    if scorer is None:
        sys.exit(f"no in-domain description in {model_dir}: run `crackq domain-fit {args.model} {args.data}`")
    split = Split.load(model_dir / "split.json")
    classifier = onnx_classifier(args.model, 64)
    start = time.perf_counter()

    train_files = balanced_sample(split.files["train"], TRAIN_SAMPLE, 0)  # what the shipped check was fitted on
    train = features_of(classifier, args.data, train_files, "train features")
    sets = {"validation": _labelled(classifier, args.data, split.files["val"]),
            "test (held out)": _labelled(classifier, args.data, split.files["test"])}
    patches = [Path(args.data) / f for f in split.files["test"]]
    for name in UNFAMILIAR:
        images, labels = unfamiliar_images(name, args.per_set, patches, args.seed)
        batch = np.stack([resize_to_input(im, classifier.info.input_size) for im in images])
        probs, feats = classifier.predict(batch)
        sets[name] = (feats, probs, np.array([-1 if y is None else y for y in labels]))

    table = methods(scorer, train[:, :POOLED_DIM])
    val_f, val_p, _ = sets["validation"]
    u_mean, u_std = uncertainty(val_p).mean(), uncertainty(val_p).std()
    table["shipped+conf"] = lambda f, p: (scorer.raw_scores(f) * len(scorer.components)
                                          + (uncertainty(p) - u_mean) / u_std) / (len(scorer.components) + 1)
    thresholds = {m: float(np.quantile(fn(val_f, val_p), QUANTILE)) for m, fn in table.items()}
    rows = []
    for name, (feats, probs, labels) in sets.items():
        row = {"set": name, "n": int(len(feats))}
        held_out = name in ("validation", "test (held out)")
        for m, fn in table.items():
            flagged = fn(feats, probs) > thresholds[m]
            row[m] = float(np.mean(~flagged if held_out else flagged))
        crack = probs >= 0.5
        known = labels >= 0
        row["model says crack"] = float(crack.mean())
        row["model accuracy"] = float(np.mean(crack[known] == labels[known])) if known.any() else None
        rows.append(row)
    seconds = time.perf_counter() - start
    _print(rows, list(table), seconds, scorer)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "thresholds": thresholds, "per_set": args.per_set,
                               "seconds": round(seconds, 1)}, indent=1))


def _labelled(classifier, root, files):
    from training.data import iter_batches

    feats, probs, labels = [], [], []
    for positions, images in iter_batches(root, files, classifier.batch_size, []):
        p, f = classifier.predict(images)
        feats.append(f)
        probs.append(p)
        labels += [int(files[i].startswith("Positive/")) for i in positions]
    return np.concatenate(feats), np.concatenate(probs), np.array(labels)


def _print(rows, names, seconds, scorer) -> None:
    print(f"\nin-domain check, threshold = 99th percentile of validation scores for every method "
          f"({seconds:.0f} s)\n")
    print("| set | n | " + " | ".join(names) + " | model says crack | model accuracy |")
    print("|---|---:|" + "---:|" * len(names) + "---:|---:|")
    for r in rows:
        held_out = r["set"] in ("validation", "test (held out)")
        cells = [f"{r[m]:.1%}" + (" pass" if held_out else "") for m in names]
        acc = "n/a" if r["model accuracy"] is None else f"{r['model accuracy']:.1%}"
        print(f"| {r['set']} | {r['n']} | " + " | ".join(cells) + f" | {r['model says crack']:.1%} | {acc} |")
    unfamiliar = [r for r in rows if r["set"] not in ("validation", "test (held out)")]
    print("| **mean over unfamiliar sets (flagged)** | | "
          + " | ".join(f"**{np.mean([r[m] for r in unfamiliar]):.1%}**" for m in names) + " | | |")


if __name__ == "__main__":
    main()
