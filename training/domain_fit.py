"""Fit the in-domain check of a trained model (``crackq domain-fit MODEL DATA_DIR``; also run by ``crackq train``).

The description (:mod:`shared.domain`) is fitted on a seeded, class-balanced
sample of the TRAIN split, its z-scores and threshold are set on the
VALIDATION split (99th percentile: about 1 % of familiar images flagged), and
the TEST split measures how many held-out images it passes.  Features come
from the model's ONNX export through the workers' own inference code (``shared.inference``), so they
are exactly the ones workers will score.

Outputs, beside the model: ``domain.npz`` (a few MB) and a ``domain`` entry in
``model_card.json`` (method, threshold, validation false-alarm rate, test
pass rate, file name and sha256).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np

from shared.domain import FILE_NAME, FORMAT, Component, DomainScorer
from shared.model_card import read_card, write_card
from shared.serving import feature_layout

log = logging.getLogger(__name__)

TRAIN_SAMPLE = 3000     # training images described (also the size of the nearest-neighbour bank)
KNN_K = 5               # distance to the 5th nearest training image: robust to a single look-alike
PCA_DIMS = 256          # pooled embedding axes kept for the nearest-neighbour search
QUANTILE = 0.99         # threshold: 99th percentile of validation scores (~1 % false alarms)
MIN_TRAIN, MIN_VAL = 20, 5
METHOD = ("mean z-score of log distances: kNN (k=5, cosine, PCA-256) on pooled features + "
          "Mahalanobis (Ledoit-Wolf) on per-channel mean/std of block_3_expand_relu and block_6_expand_relu; "
          "threshold at the 99th percentile of the validation split")


def fit_domain(model_path: str | os.PathLike, data_dir: str | os.PathLike, split_file: str | os.PathLike,
               out_dir: str | os.PathLike, *, train_sample: int = TRAIN_SAMPLE, seed: int = 0,
               batch_size: int = 64) -> dict | None:
    """Fit, save ``out_dir/domain.npz`` and record it in ``out_dir/model_card.json``; return the card entry.

    Returns None (and removes a stale description) when the split is too small to describe.
    """
    from training.data import Split

    out = Path(out_dir)
    split = Split.load(split_file)
    train_files = balanced_sample(split.files["train"], train_sample, seed)
    if len(train_files) < MIN_TRAIN or len(split.files["val"]) < MIN_VAL:
        log.warning("too few images to describe the training domain (%d train, %d val; need %d and %d): "
                    "results will have in_domain = null", len(train_files), len(split.files["val"]),
                    MIN_TRAIN, MIN_VAL)
        _forget(out)
        return None
    classifier = onnx_classifier(model_path, batch_size)
    train = features_of(classifier, data_dir, train_files, "domain: train features")
    val = features_of(classifier, data_dir, split.files["val"], "domain: validation features")
    test = features_of(classifier, data_dir, split.files["test"], "domain: test features")
    scorer = fit(train, val, backbone_fingerprint=_card(out).get("backbone", {}).get("weights_fingerprint"))
    out.mkdir(parents=True, exist_ok=True)
    scorer.save(out / FILE_NAME)
    entry = summary(scorer, val, test, out / FILE_NAME)
    _record(out, entry)
    return entry


def fit(train: np.ndarray, val: np.ndarray, backbone_fingerprint: str | None = None, k: int = KNN_K,
        pca_dims: int = PCA_DIMS, quantile: float = QUANTILE, val_groups=None) -> DomainScorer:
    """The description of ``train`` features (N, D), calibrated on ``val`` features (M, D)."""
    from sklearn.covariance import LedoitWolf

    layout = feature_layout()
    if train.shape[1] != layout[-1][2]:
        raise ValueError(f"features have {train.shape[1]} columns, expected {layout[-1][2]}: re-export the "
                         "model's ONNX (`crackq export MODEL`) so it carries the texture statistics")
    arrays: dict[str, np.ndarray] = {}
    specs = []
    for name, start, stop in layout:
        x = train[:, start:stop].astype(np.float64)
        if name == "pooled":
            name = "pooled-knn"
            unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            mean = unit.mean(axis=0)
            _, _, vt = np.linalg.svd(unit - mean, full_matrices=False)
            projection = vt[: min(pca_dims, len(x) - 1)].T
            bank = (unit - mean) @ projection
            bank /= np.maximum(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
            arrays.update({f"{name}/mean": mean, f"{name}/projection": projection, f"{name}/bank": bank})
            specs.append(dict(name=name, kind="knn", start=start, stop=stop, k=k))
        else:
            cov = LedoitWolf().fit(x).covariance_
            whiten = np.linalg.cholesky(np.linalg.inv(cov))
            arrays.update({f"{name}/mean": x.mean(axis=0), f"{name}/whiten": whiten})
            specs.append(dict(name=name, kind="gauss", start=start, stop=stop))
    # Calibrate each distance on the validation split, then the threshold of their mean z-score.
    draft = DomainScorer(_meta(specs, [(0.0, 1.0)] * len(specs), 1.0, train.shape[1], backbone_fingerprint),
                         arrays)
    logs = np.log(np.maximum(draft.distances(val), 1e-12))
    stats = [(float(c.mean()), float(max(c.std(), 1e-6))) for c in logs.T]
    scorer = DomainScorer(_meta(specs, stats, 1.0, train.shape[1], backbone_fingerprint), arrays)
    raw = scorer.raw_scores(val)
    if val_groups is None:
        threshold = float(np.quantile(raw, quantile))
    else:  # every source keeps at most 1 - quantile of its validation images flagged
        groups = np.asarray(val_groups)
        threshold = max(float(np.quantile(raw[groups == g], quantile)) for g in np.unique(groups))
    if threshold <= 0:
        raise ValueError("validation scores are degenerate (threshold <= 0): too few or identical images")
    # The saved file holds the bank/projection in float16: calibrate what will be loaded.
    return _round_trip(DomainScorer(_meta(specs, stats, threshold, train.shape[1], backbone_fingerprint), arrays))


def _round_trip(scorer: DomainScorer) -> DomainScorer:
    arrays = {k: v.astype(np.float16).astype(np.float32) if k.endswith(("/bank", "/projection")) else v
              for k, v in scorer.arrays.items()}
    return DomainScorer(scorer.meta, arrays)


def _meta(specs, stats, threshold, dim, fingerprint) -> dict:
    components = [Component(**s, log_mean=m, log_std=sd).to_dict() for s, (m, sd) in zip(specs, stats)]
    return {"format": FORMAT, "method": METHOD, "feature_dim": int(dim), "threshold": threshold,
            "quantile": QUANTILE, "components": components, "backbone_fingerprint": fingerprint,
            "min_margin": 0.0}


def summary(scorer: DomainScorer, val: np.ndarray, test: np.ndarray, path: Path) -> dict:
    """The model card's ``domain`` entry."""
    from shared.model_card import file_sha256

    dummy = np.zeros(0)
    val_flagged = float(np.mean(~scorer.score(val, dummy)[1].astype(bool)))
    entry = {
        "method": METHOD,
        "file": path.name,
        "sha256": file_sha256(path),
        "threshold": round(scorer.threshold, 6),
        "score": "domain_score = mean z-score / threshold: ~0 typical, <= 1 in domain, > 1 unfamiliar",
        "fitted_on": {"split": "train", "images": int(scorer.arrays["pooled-knn/bank"].shape[0])},
        "calibrated_on": {"split": "val", "images": int(len(val))},
        "validation_false_alarm_rate": round(val_flagged, 4),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if len(test):
        entry["test_in_domain_rate"] = round(float(np.mean(scorer.score(test, dummy)[1].astype(bool))), 4)
        entry["test_images"] = int(len(test))
    return entry


def balanced_sample(files: list[str], n: int, seed: int) -> list[str]:
    """Up to ``n`` files, the same number from each class folder where possible (seeded, sorted)."""
    by_class: dict[str, list[str]] = {}
    for f in sorted(files):
        by_class.setdefault(f.split("/", 1)[0], []).append(f)
    rng = np.random.default_rng(seed)
    per_class = max(1, n // max(1, len(by_class)))
    chosen = []
    for members in by_class.values():
        chosen += [members[i] for i in sorted(rng.permutation(len(members))[:per_class])]
    return sorted(chosen)


def onnx_classifier(model_path, batch_size: int):
    """The ONNX classifier for ``model_path`` exactly as workers serve it (same loader, same features)."""
    from shared.config import Settings
    from shared.inference import load_classifier

    return load_classifier(Settings.load(model=str(model_path), backend="onnx", batch_size=batch_size))


def features_of(classifier, root, files: list[str], label: str = "features") -> np.ndarray:
    """``features`` of the readable ``files`` (decoded exactly as in training), in order."""
    from training.data import iter_batches, warn_skipped
    from training.progress import bar

    parts, bad = [], []
    with bar(label, len(files)) as advance:
        for _, images in iter_batches(str(root), files, classifier.batch_size, bad,
                                      size=classifier.info.input_size):
            parts.append(classifier.predict(images)[1])
            advance(len(images))
    warn_skipped(bad)
    return np.concatenate(parts) if parts else np.zeros((0, feature_layout()[-1][2]), np.float32)


def _card(out: Path) -> dict:
    return read_card(out)


def _record(out: Path, entry: dict) -> None:
    """The description's summary into the model card of ``out`` (when there is one)."""
    card = _card(out)
    if card:
        card["domain"] = entry
        card.setdefault("files", {})["domain"] = FILE_NAME
        write_card(out, card)


def _forget(out: Path) -> None:
    """Remove a description left from an earlier model in ``out``, so it can never be applied to this one."""
    (out / FILE_NAME).unlink(missing_ok=True)
    card = _card(out)
    card.get("files", {}).pop("domain", None)
    if card.pop("domain", None) is not None:
        write_card(out, card)


@click.command(name="domain-fit")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--split-file", type=click.Path(exists=True, dir_okay=False),
              help="split.json of the model's training run [default: beside MODEL].")
@click.option("--train-sample", default=TRAIN_SAMPLE, show_default=True, type=click.IntRange(MIN_TRAIN),
              help="Training images to describe.")
def domain_fit(model, data_dir, split_file, train_sample):
    """Fit MODEL's in-domain check on its training split of DATA_DIR (writes domain.npz beside MODEL)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    split_file = split_file or str(Path(model).with_name("split.json"))
    if not Path(split_file).exists():
        raise click.UsageError(f"{split_file} not found: give --split-file (written by crackq train)")
    entry = fit_domain(model, data_dir, split_file, Path(model).parent, train_sample=train_sample)
    if entry is None:
        raise click.ClickException("split too small: no in-domain description written")
    click.echo(f"wrote {Path(model).parent / FILE_NAME}: threshold {entry['threshold']:.4f}, validation false "
               f"alarms {entry['validation_false_alarm_rate']:.2%}, held-out test images in domain "
               f"{entry.get('test_in_domain_rate', float('nan')):.2%}")


# -- several sources, and the prediction's margin (issue 10) --------------------------------
SELECTIVE_TARGET = 0.96   # validation accuracy on what passes, per source (test target: 0.95)
MARGINS = np.round(np.arange(0.0, 0.46, 0.01), 2)
PER_SOURCE_TRAIN = 1500   # training rows described per source


@dataclass
class SourceRows:
    """Served outputs of one source and split: crack probability, features, true labels."""

    source: str
    probs: np.ndarray
    features: np.ndarray
    labels: np.ndarray


def served_rows(classifier, spec, limit: int | None = None, seed: int = 0) -> SourceRows:
    """Build ``spec``'s images and run them through the worker's classifier (optionally a balanced sample)."""
    image_set = spec.build()
    idx = np.arange(len(image_set))
    if limit is not None and len(idx) > limit:
        rng = np.random.default_rng(seed)
        per = limit // 2
        idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(image_set.labels == c))[:per]
                                      for c in (0, 1)]))
    probs, feats = classifier.predict(image_set.images[idx])
    return SourceRows(spec.source, probs, feats, image_set.labels[idx])


def choose_margin(scorer: DomainScorer, val: list[SourceRows], target: float = SELECTIVE_TARGET) -> float:
    """The smallest margin at which every validation source's selective accuracy reaches ``target``."""
    for margin in MARGINS:
        ok = True
        for rows in val:
            familiar = scorer.raw_scores(rows.features) / scorer.threshold <= 1.0
            passed = familiar & (np.abs(rows.probs - 0.5) >= margin)
            if passed.sum() >= 20 and np.mean((rows.probs[passed] >= 0.5) == rows.labels[passed]) < target:
                ok = False
                break
        if ok:
            return float(margin)
    return float(MARGINS[-1])


def selective(scorer: DomainScorer, rows: SourceRows) -> dict:
    """Coverage (share flagged in domain), selective accuracy (on those) and plain accuracy of one set."""
    _, passed = scorer.score(rows.features, rows.probs)
    passed = passed.astype(bool)
    correct = (rows.probs >= 0.5) == rows.labels
    return {"n": int(len(correct)), "accuracy": round(float(correct.mean()), 4) if len(correct) else None,
            "coverage": round(float(passed.mean()), 4) if len(correct) else None,
            "selective_accuracy": round(float(correct[passed].mean()), 4) if passed.any() else None}


def fit_domain_sets(model_path, out_dir, sets: dict, classes, *, per_source_train: int = PER_SOURCE_TRAIN,
                    seed: int = 0, target: float = SELECTIVE_TARGET, batch_size: int = 64) -> dict | None:
    """Fit the in-domain check on the train sets of every source, calibrate distance threshold and
    margin on their val sets, measure coverage and selective accuracy per source on the test sets."""
    out = Path(out_dir)
    classifier = onnx_classifier(model_path, batch_size)
    rows = {name: [served_rows(classifier, spec, per_source_train if name == "train" else None, seed)
                   for spec in sets.get(name, [])] for name in ("train", "val", "test")}
    train = np.concatenate([r.features for r in rows["train"]]) if rows["train"] else np.zeros((0, 1))
    val = np.concatenate([r.features for r in rows["val"]]) if rows["val"] else np.zeros((0, 1))
    if len(train) < MIN_TRAIN or len(val) < MIN_VAL:
        log.warning("too few images to describe the training domain: results will have in_domain = null")
        _forget(out)
        return None
    groups = [r.source for r in rows["val"] for _ in range(len(r.labels))]
    scorer = fit(train, val, backbone_fingerprint=_card(out).get("backbone", {}).get("weights_fingerprint"),
                 val_groups=groups)
    scorer.meta["min_margin"] = choose_margin(scorer, rows["val"], target)
    scorer.meta["method"] = METHOD_MULTI
    scorer = DomainScorer(scorer.meta, scorer.arrays)
    out.mkdir(parents=True, exist_ok=True)
    scorer.save(out / FILE_NAME)
    entry = summary(scorer, val, np.zeros((0, val.shape[1])), out / FILE_NAME)
    entry["method"] = METHOD_MULTI
    entry["min_margin"] = scorer.min_margin
    entry["selective_target_on_val"] = target
    entry["fitted_on"] = {"split": "train", "rows": int(len(train)),
                          "per_source": {r.source: int(len(r.labels)) for r in rows["train"]}}
    entry["by_source"] = {name: {r.source: selective(scorer, r) for r in rows[name]} for name in ("val", "test")}
    first_test = rows["test"][0] if rows["test"] else None  # the main labelled folder (DATA_DIR)
    if first_test is not None:
        entry["test_in_domain_rate"] = entry["by_source"]["test"][first_test.source]["coverage"]
        entry["test_images"] = int(len(first_test.labels))
    _record(out, entry)
    return entry


METHOD_MULTI = (METHOD.replace("threshold at the 99th percentile of the validation split",
                               "threshold: the largest per-source 99th percentile on the validation sets")
                + "; in domain also needs |p - 0.5| >= min_margin (smallest margin giving every validation "
                  f"source >= {SELECTIVE_TARGET:.0%} accuracy on what passes)")
