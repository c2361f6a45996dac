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
  features plus the spatial means of ``block_13_expand_relu`` and
  ``block_10_expand_relu`` (what the shipped multi-source head reads; +5-7
  points of balanced accuracy over pooled alone on validation photos of an
  unseen domain, docs/drone.md), its strength chosen by cross-validation; it
  replaces the init model's head (a Dense softmax written in closed form);
* optionally (``--unfreeze-blocks N``, or ``auto``) also fine-tunes the top
  backbone blocks on cached intermediate activations, and keeps that only when
  cross-validation measures it better (see :mod:`training.adapt_deep`);
* **keeps the init model** unchanged when the adapted head's cross-validated
  balanced accuracy is not above the init model's on the new labels (which it
  never saw) - a model that already knows the imagery is not made worse
  (``keep_init``; ``crackq train --init-model`` always trains);
* **chooses the decision threshold** on the new labels by cross-validation
  (grouped by source photo, so tiles of one photo never sit on both sides) and
  stores it in the model card (``threshold.value``), where workers read it; 0.5
  instead when the tuned one costs accuracy on the replay validation sample
  (:func:`guard_threshold`).

The cross-validated balanced accuracy on the new imagery uses, for each fold,
a threshold chosen on the other folds only, so the estimate is not flattered
by the threshold choice.  Feature rows come from one Keras pass of the init
model (:class:`Extractor`, the :mod:`training.multisource` row layout): the
served features (for the in-domain check) and the earlier-layer means (for the
head).  The numerical core (views, balancing, folds, threshold) is
:mod:`training.adapt_fit`, shared with :mod:`training.adapt_deep`.
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

from shared.model_card import (CARD_FILE, MODEL_FILE, ONNX_FILE, SPLIT_FILE, card_threshold,  # noqa: F401
                               file_sha256, onnx_path, read_card, write_card)
from shared.serving import POOLED_DIM
from training.adapt_head import head_columns, linear_head
from training.features import default_cache_dir
from training.adapt_fit import (C_GRID, VIEWS, Head, balanced_accuracy, best_threshold, choose_threshold,  # noqa: F401
                                cross_validate, dihedral, estimate, fit_head, folds_of, training_set)

log = logging.getLogger(__name__)

MIN_PER_CLASS = 4
#: What the adapted head reads by default: pooled features plus the spatial means of the earlier layers the
#: shipped multi-source head reads (chosen on uav-concrete validation photos, docs/drone.md).
HEAD_LAYERS = ("block_13_expand_relu", "block_10_expand_relu")


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
    cache_dir: str | None = field(default_factory=lambda: str(default_cache_dir()))
    score_replay_test: bool = True       # accuracy kept on the init model's test split
    threads: int = 0
    head_layers: tuple[str, ...] = HEAD_LAYERS   # () : the head reads the pooled features only
    keep_init: bool = True               # ship the init model unchanged when adapting does not measure better


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


class Extractor:
    """Crack probability and feature rows of model inputs through the init model (Keras).

    Rows are laid out as :mod:`training.multisource` caches them: the served ``features`` (pooled, then the
    texture statistics the in-domain check reads), then the spatial mean of each earlier layer the
    multi-source head may read.  One forward pass gives all of them.
    """

    def __init__(self, model_path: str):
        import keras

        from training import multisource as ms
        from training.model import backbone_layers, inference_fn, load_model, weights_fingerprint

        model = load_model(model_path)
        self.fingerprint = weights_fingerprint(backbone_layers(model))
        self.layout_version = ms.LAYOUT_VERSION
        self._fn = inference_fn(keras.Model(model.inputs, {"p": model.output, "rows": ms.extractor(model).output}))
        self.input_size = int(model.input_shape[1])

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, rows = [], []
        for start in range(0, len(images), 64):
            out = self._fn(np.asarray(images[start:start + 64], np.float32))
            probs.append(out["p"][:, 1])
            rows.append(out["rows"])
        if not rows:
            return np.zeros(0, np.float32), np.zeros((0, 0), np.float32)
        return np.concatenate(probs), np.concatenate(rows).astype(np.float32)


def load_new(model: Extractor, cfg: AdaptConfig, classes) -> NewLabels:
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
    runs = [model.run(v) for v in views]
    groups = np.array(photo_groups(cfg.data_dir, kept))
    grouped = len(set(groups[y == 0])) >= cfg.folds and len(set(groups[y == 1])) >= cfg.folds
    return NewLabels(kept, y, groups, np.stack([f for _, f in runs]), grouped, runs[0][0],
                     images)


def cached_features(model: Extractor, root: str, files: list[str], cache_dir: str | None,
                    label: str) -> tuple[np.ndarray, list[str]]:
    """Feature rows of ``files`` under ``root`` (readable ones, in order), cached on disk by content and by
    the backbone's weights (rows do not depend on the head)."""
    from training.data import iter_batches, list_sha256, warn_skipped
    from training.progress import bar

    path = None
    if cache_dir:
        key = hashlib.sha256(json.dumps(["rows", model.layout_version, model.fingerprint, os.path.realpath(root),
                                         list_sha256(files)]).encode()).hexdigest()
        path = Path(cache_dir) / "adapt" / f"{key}.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as npz:
                return npz["features"].astype(np.float32), [str(f) for f in npz["files"]]
    parts, kept, bad = [], [], []
    with bar(label, len(files)) as advance:
        for positions, images in iter_batches(root, files, 64, bad, size=model.input_size):
            parts.append(model.run(images)[1])
            kept += [files[i] for i in positions]
            advance(len(positions))
    warn_skipped(bad)
    feats = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, features=feats.astype(np.float16), files=np.array(kept))
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
    y_val: np.ndarray | None = None


def load_replay(model: Extractor, cfg: AdaptConfig, init_card: dict) -> Replay | None:
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
    train, train_kept = cached_features(model, root, train_files, cfg.cache_dir, "replay: train sample")
    val, val_kept = cached_features(model, root, val_files, cfg.cache_dir, "replay: val sample")
    test, test_kept = (cached_features(model, root, test_files, cfg.cache_dir, "replay: test split")
                       if test_files else (np.zeros((0, train.shape[1]), np.float32), []))
    return Replay(train, labels_of(split.classes, train_kept), val, test,
                  labels_of(split.classes, test_kept) if test_kept else np.zeros(0, np.int64),
                  {"dir": str(root), "split_file": str(split_path), "train_images": len(train_kept),
                   "val_images": int(len(val)), "test_images": len(test_kept), "weight": cfg.replay_weight},
                  {"train": train_kept, "val": val_kept, "test": test_kept}, labels_of(split.classes, val_kept))


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

def head_fitter(new: NewLabels, replay: Replay | None, cfg: AdaptConfig, c: float):
    columns = head_columns(cfg.head_layers)

    def fit_rows(rows):
        return fit_head(*training_set(new, rows, replay, cfg.replay_weight), c, columns).prob
    return fit_rows


# ---- the run ------------------------------------------------------------------------------------

def adapt(cfg: AdaptConfig, progress=log.info) -> dict:
    """Fit, choose the threshold, write model + ONNX + card + split + in-domain description; return the card."""
    started = time.perf_counter()
    init_card = read_card(cfg.init_model)
    classes = init_card.get("classes", ["Negative", "Positive"])
    model = Extractor(cfg.init_model)
    new = load_new(model, cfg, classes)
    progress(f"{len(new.y)} labelled tile(s) ({int(new.y.sum())} crack) from {len(set(new.groups))} photo(s)")
    replay = load_replay(model, cfg, init_card)
    timings = {"features_seconds": round(time.perf_counter() - started, 1)}

    baseline = balanced_accuracy(new.y, new.init_probs, card_threshold(init_card))  # the init model as served
    progress(f"init model on the new labels: balanced accuracy {baseline:.3f}")
    trials = {}
    folds = folds_of(new, cfg.folds, cfg.seed)
    for c in C_GRID:
        trials[c] = cross_validate(new, folds, head_fitter(new, replay, cfg, c))
        progress(f"head C={c:g}: cross-validated balanced accuracy {trials[c]['balanced_accuracy']:.3f}")
    best_c = max(C_GRID, key=lambda c: (estimate(trials[c]), -abs(np.log10(c))))
    cv = trials[best_c]
    head = fit_head(*training_set(new, np.arange(len(new.y)), replay, cfg.replay_weight), best_c,
                    head_columns(cfg.head_layers))
    threshold = guard_threshold(choose_threshold(new.y, cv), replay, head, progress)
    deep = None
    if cfg.unfreeze_blocks not in ("0", "", None):
        from training.adapt_deep import maybe_unfreeze

        deep = maybe_unfreeze(cfg, new, replay, {"C": best_c, "columns": head.columns}, cv, progress)
        if deep.kept:
            cv, threshold = deep.cv, choose_threshold(new.y, deep.cv)
            new.views[0, :, :POOLED_DIM] = deep.pooled["new"]
            if replay is not None:
                for name in ("train", "val", "test"):
                    if f"replay_{name}" in deep.pooled:
                        getattr(replay, name)[:, :POOLED_DIM] = deep.pooled[f"replay_{name}"]
    # The init model as served is scored on labels it never saw: an honest estimate, like the CV one.  When
    # the adapted head does not beat it (a model that already knows the imagery, e.g. the shipped model on
    # drone walls like its uav-concrete training photos), the init model ships unchanged (docs/drone.md).
    init_kept = cfg.keep_init and estimate(cv) <= baseline
    if init_kept:
        progress(f"adapted head: cross-validated {estimate(cv):.3f} <= init model {baseline:.3f}: "
                 "keeping the init model (and its threshold)")
        threshold, deep = card_threshold(init_card), None
    timings["fit_seconds"] = round(time.perf_counter() - started - timings["features_seconds"], 1)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    kept = _kept_accuracy(head, replay, threshold, deep.replay_test_probs if deep and deep.kept else
                          _init_probs(model, replay) if init_kept else None)
    onnx_diff = (_copy_init(cfg.init_model, out, init_card) if init_kept else
                 write_model(cfg.init_model, head, out, deep, cfg.head_layers))
    split = write_split(new, cfg, out, classes)
    card = build_card(cfg, init_card, new, replay, split, head, best_c, cv, baseline, trials, threshold, kept,
                      timings, onnx_diff, deep, init_kept)
    write_card(out, card)
    _fit_domain(new, replay, split, out)
    card = read_card(out)
    card["adaptation"]["seconds"] = round(time.perf_counter() - started, 1)
    write_card(out, card)
    return card


#: Accuracy on the replay validation sample a tuned threshold must keep (else 0.5 is used).
REPLAY_VAL_FLOOR = 0.995


def guard_threshold(t: float, replay: Replay | None, head: Head, progress=log.info) -> float:
    """``t``, unless it costs the original imagery: a threshold tuned on ~100 new labels alone moved the
    Özgenel accuracy below 99.5 % where 0.5 kept it (docs/drone.md).  Checked on the replay *validation*
    sample (never the test split): when accuracy there at ``t`` is under :data:`REPLAY_VAL_FLOOR` and under
    the accuracy at 0.5, 0.5 is used."""
    if replay is None or replay.y_val is None or not len(replay.val) or t == 0.5:
        return t
    p, y = head.prob(replay.val), replay.y_val.astype(bool)
    at_t, at_half = float(np.mean((p >= t) == y)), float(np.mean((p >= 0.5) == y))
    if at_t < REPLAY_VAL_FLOOR and at_t < at_half:
        progress(f"threshold {t:.3f} costs the original imagery (replay val accuracy {at_t:.4f} vs {at_half:.4f} "
                 "at 0.5): using 0.5")
        return 0.5
    return t


def _init_probs(model: Extractor, replay: Replay | None) -> np.ndarray | None:
    """The init model's crack probability of the replay test images (scored when it ships unchanged)."""
    from training.data import iter_batches

    if replay is None or not len(replay.test):
        return None
    parts = [model.run(b)[0] for _, b in iter_batches(replay.source["dir"], replay.files["test"], 64, [],
                                                       size=model.input_size)]
    return np.concatenate(parts)


def _copy_init(init_model: str, out: Path, init_card: dict) -> float:
    """The init model's Keras and ONNX files, copied unchanged into ``out``."""
    import shutil

    shutil.copyfile(init_model, out / MODEL_FILE)
    shutil.copyfile(onnx_path(init_model), out / ONNX_FILE)
    return float(init_card.get("files", {}).get("onnx_max_abs_diff_vs_keras", 0.0) or 0.0)


def _kept_accuracy(head: Head, replay: Replay | None, threshold: float, probs=None) -> dict | None:
    if replay is None or not len(replay.test):
        return None
    p = head.prob(replay.test) if probs is None else probs
    return {"split": "test", "images": int(len(p)),
            "accuracy": round(float(np.mean((p >= threshold) == replay.y_test.astype(bool))), 4),
            "accuracy_at_0_5": round(float(np.mean((p >= 0.5) == replay.y_test.astype(bool))), 4),
            "balanced_accuracy": round(balanced_accuracy(replay.y_test, p, threshold), 4)}


def write_model(init_model: str, head: Head, out: Path, deep, layers: tuple[str, ...]) -> float:
    """The init model's backbone with the new head (and, when kept, the fine-tuned top blocks), saved and
    exported."""
    from training.export import export_onnx
    from training.model import OUTPUT_LAYER, load_model

    model = linear_head(load_model(init_model), layers)
    if deep is not None and deep.kept:
        deep.apply(model)  # top blocks and head, trained together
    else:
        kernel = np.stack([-head.w / 2, head.w / 2], axis=1).astype(np.float32)
        bias = np.array([-head.b / 2, head.b / 2], np.float32)
        model.get_layer(OUTPUT_LAYER).set_weights([kernel, bias])
    model.save(out / MODEL_FILE)
    rng = np.random.default_rng(0)
    check = rng.uniform(0, 255, (4, *model.input_shape[1:])).astype(np.float32)
    return export_onnx(model, out / ONNX_FILE, check_inputs=check)


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


def _fit_domain(new: NewLabels, replay: Replay | None, split, out: Path):
    """In-domain description: the replay sample plus the new train tiles, calibrated on a replay val sample
    plus the new val tiles - so both the original imagery and the new survey count as familiar."""
    from shared.domain import FILE_NAME
    from training.domain_fit import fit, summary

    from training.multisource import SERVING_DIM

    index = {f: i for i, f in enumerate(new.files)}
    tr = new.views[0, [index[f] for f in split.files["train"]], :SERVING_DIM]
    va = new.views[0, [index[f] for f in split.files["val"]], :SERVING_DIM]
    if replay is not None:
        tr = np.concatenate([replay.train[:, :SERVING_DIM], tr])
        va = np.concatenate([replay.val[:, :SERVING_DIM], va])
    card = read_card(out)
    try:
        scorer = fit(tr, va, backbone_fingerprint=card.get("backbone", {}).get("weights_fingerprint"))
    except ValueError as exc:
        log.warning("no in-domain description: %s", exc)
        return
    scorer.save(out / FILE_NAME)
    test = replay.test[:, :SERVING_DIM] if replay is not None else np.zeros((0, tr.shape[1]))
    card["domain"] = summary(scorer, va, test, out / FILE_NAME)
    card["domain"]["fitted_on"] = {"split": "replay train sample + new train tiles", "images": int(len(tr))}
    card["domain"]["calibrated_on"] = {"split": "replay val sample + new val tiles", "images": int(len(va))}
    card.setdefault("files", {})["domain"] = FILE_NAME
    write_card(out, card)


def build_card(cfg, init_card, new, replay, split, head, best_c, cv, baseline, trials, threshold, kept, timings,
               onnx_diff, deep, init_kept: bool = False) -> dict:

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
                "balanced_accuracy": round(baseline if init_kept else estimate(cv), 4),
                "adapted_head_balanced_accuracy": round(estimate(cv), 4),
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
                      "train split, L2 logistic-regression head on frozen pooled features"
                      + "".join(f" + spatial mean of {name}" for name in cfg.head_layers) + " (C by cross-validation)",
            "config": {k: v for k, v in asdict(cfg).items() if k != "cache_dir"},
            "head_C": best_c,
            "init_model_kept": init_kept,
            "cv_by_C": {str(c): round(t["balanced_accuracy"], 4) for c, t in trials.items()},
            "replay": replay.source if replay is not None else None,
            "unfreeze": deep.summary() if deep is not None else {"blocks": 0},
            **timings,
        },
        "files": {**init_card.get("files", {}), "keras": MODEL_FILE, "onnx": ONNX_FILE,
                  "onnx_max_abs_diff_vs_keras": onnx_diff},
    })
    if init_kept:
        card.setdefault("backbone", {})["unfrozen_blocks"] = init_card.get("backbone", {}).get("unfrozen_blocks", 0)
        card["threshold"]["chosen_on"] = "the init model's (kept unchanged: adapting did not measure better)"
        return card
    card["architecture"] = ("MobileNetV2 (frozen" + (f", top {deep.blocks} block(s) fine-tuned" if deep is not None
                                                    and deep.kept else "") + ") -> [pooled (1280)"
                            + "".join(f" + spatial mean of {name}" for name in cfg.head_layers)
                            + "] -> Dense(2, softmax) 'probabilities' (crackq adapt)")
    card.setdefault("backbone", {})["unfrozen_blocks"] = deep.blocks if deep is not None and deep.kept else 0
    return card
