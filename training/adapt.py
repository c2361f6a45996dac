"""Fine-tune the shipped model on a few hundred labelled tiles of a new survey (``crackq adapt``).

``crackq train NEW_DIR --init-model MODEL`` used to run the full recipe on
~100 tiles: a head trained for a few epochs on them alone, forgetting the
original imagery and keeping the 0.5 threshold.  With 50-300 labels every
label has to count, so this recipe:

* **augments** each tile into its 8 flips/quarter-turns (a crack is a crack in
  any orientation) - exact, and free after one forward pass per view;
* **balances** the classes: each class of the new labels carries the same total
  weight, whatever the crack share of the survey;
* **replays** a class-balanced sample of the model's original training split
  (``split.json`` beside the init model) with the same total weight as the new
  labels, so the model keeps what it knew (the Özgenel test split is scored
  after every run);
* fits the head as an L2-regularised logistic regression on the frozen pooled
  features (its strength chosen by cross-validation), which is the model's
  Dense softmax head written in closed form;
* optionally (``--unfreeze-blocks N``, or ``auto``) also fine-tunes the top
  backbone blocks on cached intermediate activations, and keeps that only when
  cross-validation measures it better (see :mod:`training.adapt_deep`);
* **chooses the decision threshold** on the new labels by cross-validation
  (grouped by source photo, so tiles of one photo never sit on both sides) and
  stores it in the model card (``threshold.value``), where workers read it.

The cross-validated balanced accuracy on the new imagery uses, for each fold,
a threshold chosen on the other folds only, so the estimate is not flattered
by the threshold choice.  Features come from the init model's ONNX export
(:mod:`shared.onnx_model`), i.e. exactly what a worker computes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from shared.onnx_model import OnnxModel, card_threshold, read_card
from shared.serving import POOLED_DIM

log = logging.getLogger(__name__)

MODEL_FILE, ONNX_FILE, CARD_FILE, SPLIT_FILE = (
    "crackq_mobilenetv2.keras", "crackq_mobilenetv2.onnx", "model_card.json", "split.json")
MIN_PER_CLASS = 4
#: Inverse regularisation strengths tried by cross-validation.
C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3)
VIEWS = 8


@dataclass
class AdaptConfig:
    """Every option of ``crackq adapt``; the CLI takes its defaults from here."""

    data_dir: str
    out: str
    init_model: str
    replay_dir: str | None = None        # default: the init model's training folder (its card's data.dir)
    replay_split: str | None = None      # default: split.json beside the init model
    replay_size: int = 1000              # images of the original train split mixed in (0: no replay)
    replay_weight: float = 1.0           # their total weight relative to the new labels
    folds: int = 5
    augment: bool = True
    unfreeze_blocks: str = "0"           # "0", "1".."4", or "auto" (try, keep when CV says better)
    seed: int = 0
    cache_dir: str | None = field(default_factory=lambda: str(_default_cache()))
    score_replay_test: bool = True       # accuracy kept on the init model's test split
    threads: int = 0


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "crackq"


@dataclass
class Head:
    """p(crack) = sigmoid(features[:, :1280] @ w + b): the Dense softmax head in closed form."""

    w: np.ndarray
    b: float

    def prob(self, feats: np.ndarray) -> np.ndarray:
        z = feats[:, :POOLED_DIM].astype(np.float64) @ self.w + self.b
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


# ---- data ---------------------------------------------------------------------------------------

@dataclass
class NewLabels:
    files: list[str]
    y: np.ndarray
    groups: np.ndarray
    views: np.ndarray          # (VIEWS or 1, N, D) served features of each view
    grouped: bool              # folds by photo (else by tile: fewer photos than folds)
    init_probs: np.ndarray     # the init model's crack probability of each tile (identity view)
    images: np.ndarray         # (N, S, S, 3) uint8 model inputs (for unfreezing backbone blocks)


def photo_groups(root: str, files: list[str]) -> list[str]:
    """The source photo of each tile: from ``labels.csv`` (crackq label) or ``tiles.csv`` (crackq tiles
    export), else the ``<photo>_x<X>_y<Y>`` file-name pattern, else the file itself."""
    by_name: dict[str, str] = {}
    for manifest, key in (("tiles.csv", "file"), ("labels.csv", "file")):
        path = Path(root) / manifest
        if path.exists():
            with open(path, newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    if row.get(key) and row.get("photo"):
                        by_name[os.path.basename(row[key])] = row["photo"]
    out = []
    for f in files:
        name = os.path.basename(f)
        match = re.match(r"^(.*)_x\d+_y\d+", name)
        out.append(by_name.get(name) or (match.group(1) if match else f))
    return out


def dihedral(images: np.ndarray) -> list[np.ndarray]:
    """The 8 flips / quarter-turns of a batch (N, H, W, 3); the first is the batch itself."""
    out = []
    for flip in (False, True):
        base = images[:, :, ::-1] if flip else images
        for k in range(4):
            out.append(np.ascontiguousarray(np.rot90(base, k, axes=(1, 2))))
    return out


def load_new(model: OnnxModel, cfg: AdaptConfig, classes) -> NewLabels:
    from training.data import iter_batches, list_labelled, warn_skipped

    data = list_labelled(cfg.data_dir)
    if tuple(data.classes) != tuple(classes):
        raise ValueError(f"classes {list(data.classes)} of {cfg.data_dir} differ from the model's {list(classes)}")
    bad: list[dict] = []
    images, kept = [], []
    for positions, batch in iter_batches(cfg.data_dir, list(data.files), 64, bad, size=model.input_size):
        images.append(batch)
        kept += [data.files[i] for i in positions]
    warn_skipped(bad)
    y = data.labels(kept)
    counts = np.bincount(y, minlength=2)
    if counts.min() < MIN_PER_CLASS:
        raise ValueError(f"need at least {MIN_PER_CLASS} labelled tiles per class, found "
                         f"{dict(zip(classes, counts.tolist()))} in {cfg.data_dir}")
    images = np.concatenate(images)
    views = dihedral(images) if cfg.augment else [images]
    runs = [model.predict(v, pooled_only=False) for v in views]
    groups = np.array(photo_groups(cfg.data_dir, kept))
    grouped = len(set(groups[y == 0])) >= cfg.folds and len(set(groups[y == 1])) >= cfg.folds
    return NewLabels(kept, y, groups, np.stack([f for _, f in runs]), grouped, runs[0][0],
                     images)


def cached_features(model: OnnxModel, onnx_sha: str, root: str, files: list[str], cache_dir: str | None,
                    label: str) -> tuple[np.ndarray, list[str]]:
    """Served features of ``files`` under ``root`` (readable ones, in order), cached on disk by content."""
    from training.data import iter_batches, list_sha256, warn_skipped
    from training.progress import bar

    path = None
    if cache_dir:
        key = hashlib.sha256(json.dumps([onnx_sha, os.path.realpath(root), list_sha256(files)]).encode()).hexdigest()
        path = Path(cache_dir) / "adapt" / f"{key}.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as npz:
                return npz["features"], [str(f) for f in npz["files"]]
    parts, kept, bad = [], [], []
    with bar(label, len(files)) as advance:
        for positions, images in iter_batches(root, files, 64, bad, size=model.input_size):
            parts.append(model.predict(images, pooled_only=False)[1])
            kept += [files[i] for i in positions]
            advance(len(positions))
    warn_skipped(bad)
    feats = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, features=feats, files=np.array(kept))
        os.replace(tmp, path)
    return feats, kept


@dataclass
class Replay:
    train: np.ndarray
    y_train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    y_test: np.ndarray
    source: dict
    files: dict                # "train" / "val" / "test" -> files under source["dir"] (same order as features)


def load_replay(model: OnnxModel, onnx_sha: str, cfg: AdaptConfig, init_card: dict) -> Replay | None:
    """A class-balanced sample of the init model's train split (+ val sample, + test split) as features."""
    from training.data import Split, labels_of
    from training.domain_fit import balanced_sample

    split_path = Path(cfg.replay_split or Path(cfg.init_model).with_name(SPLIT_FILE))
    root = resolve_replay_dir(cfg.replay_dir or init_card.get("data", {}).get("dir"))
    if cfg.replay_size <= 0:
        return None
    if not split_path.exists() or root is None:
        raise FileNotFoundError(f"replay data not found (split {split_path}, folder {root}): give --replay-dir "
                                "and --replay-split, or --replay-size 0 to adapt without replay")
    split = Split.load(split_path)
    train_files = balanced_sample(split.files["train"], cfg.replay_size, cfg.seed)
    test_files = split.files["test"] if cfg.score_replay_test else []
    val_files = balanced_sample(split.files["val"], max(200, cfg.replay_size // 2), cfg.seed)
    train, train_kept = cached_features(model, onnx_sha, root, train_files, cfg.cache_dir, "replay: train sample")
    val, val_kept = cached_features(model, onnx_sha, root, val_files, cfg.cache_dir, "replay: val sample")
    test, test_kept = (cached_features(model, onnx_sha, root, test_files, cfg.cache_dir, "replay: test split")
                       if test_files else (np.zeros((0, train.shape[1]), np.float32), []))
    return Replay(train, labels_of(split.classes, train_kept), val, test,
                  labels_of(split.classes, test_kept) if test_kept else np.zeros(0, np.int64),
                  {"dir": str(root), "split_file": str(split_path), "train_images": len(train_kept),
                   "val_images": int(len(val)), "test_images": len(test_kept), "weight": cfg.replay_weight},
                  {"train": train_kept, "val": val_kept, "test": test_kept})


def resolve_replay_dir(path: str | None) -> Path | None:
    """The replay folder as given, or relative to the project root (cards record ``../shared/...``)."""
    from shared.config import PROJECT_ROOT

    if not path:
        return None
    for candidate in (Path(path), PROJECT_ROOT / path):
        if candidate.is_dir():
            return candidate
    return None


# ---- the head -----------------------------------------------------------------------------------

def training_set(new: NewLabels, rows: np.ndarray, replay: Replay | None, replay_weight: float):
    """Features, labels and sample weights: each new class weighs 1/2 in total (over all its views),
    the replay sample ``replay_weight`` in total, also split evenly between classes."""
    x = [new.views[:, rows].reshape(-1, new.views.shape[-1])]
    y = [np.tile(new.y[rows], new.views.shape[0])]
    w = [_balanced(y[0], 1.0)]
    if replay is not None and len(replay.train) and replay_weight > 0:
        x.append(replay.train)
        y.append(replay.y_train)
        w.append(_balanced(replay.y_train, replay_weight))
    return np.concatenate(x)[:, :POOLED_DIM], np.concatenate(y), np.concatenate(w)


def _balanced(y: np.ndarray, total: float) -> np.ndarray:
    counts = np.bincount(y, minlength=2).astype(float)
    present = counts > 0
    per = np.where(present, total / present.sum() / np.maximum(counts, 1), 0.0)
    return per[y]


def fit_head(x: np.ndarray, y: np.ndarray, w: np.ndarray, c: float) -> Head:
    """L2 logistic regression on standardised features, folded back into raw-feature weights."""
    from sklearn.linear_model import LogisticRegression

    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    scale = len(y) / w.sum()  # sklearn's C acts on the summed loss: keep its meaning for any sample count
    lr = LogisticRegression(C=c, max_iter=500, tol=1e-5)
    lr.fit((x - mean) / std, y, sample_weight=w * scale / len(y) * 100)
    coef = lr.coef_[0] / std
    return Head(coef, float(lr.intercept_[0] - coef @ mean))


def folds_of(new: NewLabels, k: int, seed: int) -> list[np.ndarray]:
    """Held-out row indices of each fold: stratified, grouped by photo where there are enough photos."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    k = max(2, min(k, int(np.bincount(new.y).min())))
    rows = np.arange(len(new.y))
    if new.grouped:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        return [test for _, test in splitter.split(rows, new.y, new.groups)]
    return [test for _, test in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(rows, new.y)]


def balanced_accuracy(y: np.ndarray, p: np.ndarray, t: float) -> float:
    pred = p >= t
    recalls = [float(np.mean(pred[y == c] == bool(c))) for c in (0, 1) if np.any(y == c)]
    return float(np.mean(recalls)) if recalls else float("nan")


def best_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold with the highest balanced accuracy on (y, p): midway between neighbouring scores,
    ties broken towards 0.5 (the least surprising choice)."""
    values = np.unique(np.concatenate([p, [0.0, 1.0]]))
    candidates = np.concatenate([[0.5], (values[:-1] + values[1:]) / 2])
    scores = np.array([balanced_accuracy(y, p, t) for t in candidates])
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def _estimate(cv: dict) -> float:
    """Cross-validated balanced accuracy of what ships: tuned threshold when it generalises, else 0.5."""
    return max(cv["balanced_accuracy"], cv["at_0_5"])


def choose_threshold(y: np.ndarray, cv: dict) -> float:
    """The out-of-fold best threshold, but only when that measures better than 0.5.

    ``cv["balanced_accuracy"]`` scores each fold at a threshold tuned on the other folds; when that is
    no better than plain 0.5 on the same out-of-fold probabilities, tuning does not generalise (picked
    tiles crowd the boundary, so their best threshold is noisy) and 0.5 is kept.
    """
    if cv["balanced_accuracy"] <= cv["at_0_5"]:
        return 0.5
    return best_threshold(y, cv["oof"])


def cross_validate(new: NewLabels, replay: Replay | None, cfg: AdaptConfig, fit_fn) -> dict:
    """Out-of-fold probabilities of ``fit_fn(rows) -> predict(features)``; per-fold balanced accuracy at a
    threshold chosen on the *other* folds' out-of-fold probabilities."""
    folds = folds_of(new, cfg.folds, cfg.seed)
    oof = np.zeros(len(new.y))
    for held in folds:
        rows = np.setdiff1d(np.arange(len(new.y)), held)
        oof[held] = fit_fn(rows)(new.views[0, held])
    per_fold = []
    for held in folds:
        rest = np.setdiff1d(np.arange(len(new.y)), held)
        per_fold.append(balanced_accuracy(new.y[held], oof[held], best_threshold(new.y[rest], oof[rest])))
    return {"oof": oof, "balanced_accuracy": float(np.mean(per_fold)), "per_fold": per_fold,
            "folds": len(folds), "at_0_5": balanced_accuracy(new.y, oof, 0.5)}


def head_fitter(new: NewLabels, replay: Replay | None, cfg: AdaptConfig, c: float):
    def fit_rows(rows):
        return fit_head(*training_set(new, rows, replay, cfg.replay_weight), c).prob
    return fit_rows


# ---- the run ------------------------------------------------------------------------------------

def adapt(cfg: AdaptConfig, progress=log.info) -> dict:
    """Fit, choose the threshold, write model + ONNX + card + split + in-domain description; return the card."""
    started = time.perf_counter()
    init_card = read_card(cfg.init_model)
    classes = init_card.get("classes", ["Negative", "Positive"])
    model = OnnxModel.load(cfg.init_model, threads=cfg.threads)
    from training.model import file_sha256

    onnx_sha = file_sha256(Path(cfg.init_model).with_suffix(".onnx"))
    new = load_new(model, cfg, classes)
    progress(f"{len(new.y)} labelled tile(s) ({int(new.y.sum())} crack) from {len(set(new.groups))} photo(s)")
    replay = load_replay(model, onnx_sha, cfg, init_card)
    timings = {"features_seconds": round(time.perf_counter() - started, 1)}

    baseline = balanced_accuracy(new.y, new.init_probs, card_threshold(init_card))  # the init model as served
    progress(f"init model on the new labels: balanced accuracy {baseline:.3f}")
    trials = {}
    for c in C_GRID:
        trials[c] = cross_validate(new, replay, cfg, head_fitter(new, replay, cfg, c))
        progress(f"head C={c:g}: cross-validated balanced accuracy {trials[c]['balanced_accuracy']:.3f}")
    best_c = max(C_GRID, key=lambda c: (_estimate(trials[c]), -abs(np.log10(c))))
    cv = trials[best_c]
    head = fit_head(*training_set(new, np.arange(len(new.y)), replay, cfg.replay_weight), best_c)
    threshold = choose_threshold(new.y, cv)
    deep = None
    if cfg.unfreeze_blocks not in ("0", "", None):
        from training.adapt_deep import maybe_unfreeze

        deep = maybe_unfreeze(cfg, new, replay, {"C": best_c}, cv, progress)
        if deep.kept:
            cv, threshold = deep.cv, choose_threshold(new.y, deep.cv)
            new.views[0, :, :POOLED_DIM] = deep.pooled["new"]
            if replay is not None:
                for name in ("train", "val", "test"):
                    if f"replay_{name}" in deep.pooled:
                        getattr(replay, name)[:, :POOLED_DIM] = deep.pooled[f"replay_{name}"]
    timings["fit_seconds"] = round(time.perf_counter() - started - timings["features_seconds"], 1)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    kept = _kept_accuracy(head, replay, threshold, deep.replay_test_probs if deep and deep.kept else None)
    onnx_diff = write_model(cfg.init_model, head, out, deep, new)
    split = write_split(new, cfg, out, classes)
    card = build_card(cfg, init_card, new, replay, split, head, best_c, cv, baseline, trials, threshold, kept,
                      timings, onnx_diff, deep)
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    _fit_domain(model, onnx_sha, new, replay, split, out, cfg)
    card = json.loads((out / CARD_FILE).read_text(encoding="utf-8"))
    card["adaptation"]["seconds"] = round(time.perf_counter() - started, 1)
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card


def _kept_accuracy(head: Head, replay: Replay | None, threshold: float, probs=None) -> dict | None:
    if replay is None or not len(replay.test):
        return None
    p = head.prob(replay.test) if probs is None else probs
    return {"split": "test", "images": int(len(p)),
            "accuracy": round(float(np.mean((p >= threshold) == replay.y_test.astype(bool))), 4),
            "accuracy_at_0_5": round(float(np.mean((p >= 0.5) == replay.y_test.astype(bool))), 4),
            "balanced_accuracy": round(balanced_accuracy(replay.y_test, p, threshold), 4)}


def write_model(init_model: str, head: Head, out: Path, deep, new: NewLabels) -> float:
    """The init model with the new head (and, when kept, the fine-tuned top blocks), saved and exported."""
    from training.export import export_onnx
    from training.model import OUTPUT_LAYER, load_model

    model = load_model(init_model)
    if deep is not None and deep.kept:
        deep.apply(model)  # top blocks and head, trained together
    else:
        kernel = np.stack([-head.w / 2, head.w / 2], axis=1).astype(np.float32)
        bias = np.array([-head.b / 2, head.b / 2], np.float32)
        model = _linear_head_on_pooled(model, kernel.shape[0])
        model.get_layer(OUTPUT_LAYER).set_weights([kernel, bias])
    model.save(out / MODEL_FILE)
    rng = np.random.default_rng(0)
    check = rng.uniform(0, 255, (4, *model.input_shape[1:])).astype(np.float32)
    return export_onnx(model, out / ONNX_FILE, check_inputs=check)


def _linear_head_on_pooled(model, width: int):
    """``model`` itself when its output layer reads the pooled features; else the same backbone with a new
    Dense softmax on them.

    The adapted head is a logistic regression on the pooled features, so an init model whose head reads
    more (the multi-source MLP head on pooled + earlier-block means) gets its head replaced, not refilled.
    """
    import keras

    from training.model import FEATURES_LAYER, OUTPUT_LAYER

    if model.get_layer(OUTPUT_LAYER).get_weights()[0].shape[0] == width:
        return model
    pooled = model.get_layer(FEATURES_LAYER).output
    probs = keras.layers.Dense(2, activation="softmax", name=OUTPUT_LAYER)(pooled)
    return keras.Model(model.inputs, probs, name=model.name)


def write_split(new: NewLabels, cfg: AdaptConfig, out: Path, classes):
    """``split.json`` of the new labels: one cross-validation fold as ``val`` (it calibrates the in-domain
    check), the rest ``train``; no test split (the accuracy estimate is the cross-validation)."""
    from training.data import Split

    held = set(folds_of(new, cfg.folds, cfg.seed)[0].tolist())
    files = {"train": sorted(f for i, f in enumerate(new.files) if i not in held),
             "val": sorted(f for i, f in enumerate(new.files) if i in held), "test": []}
    split = Split(tuple(classes), cfg.seed, (80, 20, 0), files, None, str(cfg.data_dir))
    split.save(out / SPLIT_FILE)
    return split


def _fit_domain(model, onnx_sha, new: NewLabels, replay: Replay | None, split, out: Path, cfg: AdaptConfig):
    """In-domain description: the replay sample plus the new train tiles, calibrated on a replay val sample
    plus the new val tiles - so both the original imagery and the new survey count as familiar."""
    from shared.domain import FILE_NAME
    from training.domain_fit import fit, summary

    index = {f: i for i, f in enumerate(new.files)}
    tr = new.views[0, [index[f] for f in split.files["train"]]]
    va = new.views[0, [index[f] for f in split.files["val"]]]
    if replay is not None:
        tr, va = np.concatenate([replay.train, tr]), np.concatenate([replay.val, va])
    card = json.loads((out / CARD_FILE).read_text(encoding="utf-8"))
    try:
        scorer = fit(tr, va, backbone_fingerprint=card.get("backbone", {}).get("weights_fingerprint"))
    except ValueError as exc:
        log.warning("no in-domain description: %s", exc)
        return
    scorer.save(out / FILE_NAME)
    test = replay.test if replay is not None else np.zeros((0, tr.shape[1]))
    card["domain"] = summary(scorer, va, test, out / FILE_NAME)
    card["domain"]["fitted_on"] = {"split": "replay train sample + new train tiles", "images": int(len(tr))}
    card["domain"]["calibrated_on"] = {"split": "replay val sample + new val tiles", "images": int(len(va))}
    card.setdefault("files", {})["domain"] = FILE_NAME
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")


def build_card(cfg, init_card, new, replay, split, head, best_c, cv, baseline, trials, threshold, kept, timings,
               onnx_diff, deep) -> dict:
    from training.model import file_sha256

    card = {k: v for k, v in init_card.items() if k not in ("domain", "metrics", "confusion_matrix", "threshold")}
    counts = split.counts()
    oof_pred_acc = balanced_accuracy(new.y, cv["oof"], threshold)
    card.update({
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "init_model": {"path": str(cfg.init_model), "sha256": file_sha256(cfg.init_model)},
        "threshold": {"value": round(threshold, 6),
                      "chosen_on": "new labels: out-of-fold probabilities of "
                                   f"{cv['folds']}-fold cross-validation "
                                   f"({'grouped by source photo' if new.grouped else 'by tile'}), "
                                   "highest balanced accuracy",
                      "note": "workers use it unless a job sets --threshold / CRACKQ_THRESHOLD"},
        "data": {"dir": str(cfg.data_dir), "counts": counts, "split_sha256": split.hashes(), "seed": cfg.seed,
                 "split_file": SPLIT_FILE, "photos": len(set(new.groups.tolist()))},
        "metrics": {
            "new_imagery_cv": {
                "balanced_accuracy": round(_estimate(cv), 4),
                "tuned_threshold_balanced_accuracy": round(cv["balanced_accuracy"], 4),
                "per_fold": [round(v, 4) for v in cv["per_fold"]],
                "balanced_accuracy_at_0_5": round(cv["at_0_5"], 4),
                "balanced_accuracy_oof_at_chosen_threshold": round(oof_pred_acc, 4),
                "init_model_balanced_accuracy": round(baseline, 4),
                "n": int(len(new.y)), "folds": cv["folds"], "grouped_by_photo": new.grouped,
                "how": "each fold scored at a threshold chosen on the other folds' out-of-fold probabilities",
            },
            "replay_test": kept,
        },
        "adaptation": {
            "recipe": "crackq adapt: 8 dihedral views per tile, class-balanced weights, replay of the init model's "
                      "train split, L2 logistic-regression head on frozen pooled features (C by cross-validation)",
            "config": {k: v for k, v in asdict(cfg).items() if k != "cache_dir"},
            "head_C": best_c,
            "cv_by_C": {str(c): round(t["balanced_accuracy"], 4) for c, t in trials.items()},
            "replay": replay.source if replay is not None else None,
            "unfreeze": deep.summary() if deep is not None else {"blocks": 0},
            **timings,
        },
        "files": {**init_card.get("files", {}), "keras": MODEL_FILE, "onnx": ONNX_FILE,
                  "onnx_max_abs_diff_vs_keras": onnx_diff},
    })
    card.setdefault("backbone", {})["unfrozen_blocks"] = deep.blocks if deep is not None and deep.kept else 0
    return card
