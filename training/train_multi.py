"""``crackq train`` with several sources: cached features of every set, one head, one shipped model.

The steps mirror :func:`training.train.train` (split, fit, save, reload and
score the saved model, export ONNX, card, plots, in-domain check); what
differs is where the training rows come from (:mod:`training.multitrain`)
and that every source is scored on its own validation and test sets, the
uav-concrete photos per tile size.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from shared.model_card import MODEL_FILE, ONNX_FILE, SPLIT_FILE, read_card, write_card
from training import card as card_lib
from training import model as model_lib
from training import multisource as ms
from training import multitrain as mt
from training import plots, runs, sources
from training.evaluate import score
from training.export import export_onnx
from training.progress import bar

log = logging.getLogger(__name__)

HEAD_DROPOUT, HEAD_L2 = 0.3, 1e-4


def head_config(cfg) -> ms.HeadConfig:
    return ms.HeadConfig(extra=tuple(cfg.head_layers), hidden=cfg.hidden if cfg.head == "mlp" else 0,
                         dropout=HEAD_DROPOUT, epochs=cfg.epochs, batch_size=cfg.batch_size,
                         learning_rate=cfg.learning_rate, l2=HEAD_L2)


def multi_config(cfg, split, uav_split) -> mt.MultiConfig:
    return mt.MultiConfig(cfg.data_dir, split, cfg.uav_images, cfg.uav_masks, uav_split, tuple(cfg.extra_sources),
                          cfg.train_per_class, cfg.val_per_class, cfg.augmentation, cfg.uav_crops_per_photo,
                          seed=cfg.seed)


def build(cfg):
    weights = None if cfg.backbone_weights in ("", "none") else cfg.backbone_weights
    h = head_config(cfg)
    return (model_lib.build_model(weights, dropout=h.dropout, extra_layers=h.extra, hidden=h.hidden, l2=h.l2),
            model_lib.backbone_source(weights), h)


def train_multi(cfg) -> dict:
    """The multi-source run; returns the model card (also written to ``cfg.out``)."""
    start = time.perf_counter()
    out, _data, split = runs.begin(cfg)
    uav_split = _uav_split(cfg, out)
    mcfg = multi_config(cfg, split, uav_split)
    model, backbone, head = build(cfg)

    feats = mt.extract_all(model, mt.specs(mcfg, ("train", "val")), cfg.cache_dir)
    columns = ms.head_columns(head)
    x, y, names = mt.stack([f for f in feats if f[0].split == "train"], columns)
    xv, yv, _ = mt.stack([f for f in feats if f[0].split == "val"], columns)
    weights = ms.source_weights([f"{n}/{c}" for n, c in zip(names, y)])
    history = ms.fit_head(model, x, y, head, weights, val=(xv, yv) if len(yv) else None, seed=cfg.seed,
                          verbose=2)
    model.save(out / MODEL_FILE)
    train_seconds = time.perf_counter() - start

    shipped = model_lib.load_model(out / MODEL_FILE)
    metrics, test_pred = runs.score_splits(shipped, split, cfg.data_dir)
    metrics["by_source"] = {mt.OZGENEL: {"val": metrics.get("validation"), "test": metrics.get("test")}}
    held_out = {}
    for spec in mt.specs(mcfg, ("val", "test")):
        if spec.source == mt.OZGENEL:
            continue
        entry, kept = score_set(shipped, spec)
        metrics["by_source"].setdefault(spec.source, {})[spec.split] = entry
        held_out[(spec.source, spec.split)] = kept
    split.save(out / SPLIT_FILE)
    images, labels, probs = runs.grid_examples(cfg.data_dir, split, test_pred)
    onnx_diff = export_onnx(shipped, out / ONNX_FILE, check_inputs=images if len(images) else None)
    plots.training_curves(history, out / "plots" / "training_curves.png")
    if "test" in metrics:
        plots.confusion_matrix(metrics["test"]["confusion_matrix"], split.classes,
                               out / "plots" / "confusion_matrix.png", title="Özgenel test split")
        plots.prediction_grid(images, labels, probs, split.classes, out / "plots" / "test_predictions.png")
    for (source, name), (imgs, lab, pr) in held_out.items():
        if name == "test" and len(lab):
            plots.confusion_matrix(metrics["by_source"][source]["test"]["confusion_matrix"], split.classes,
                                   out / "plots" / f"confusion_matrix_{source}.png", title=f"{source} test tiles")

    extraction = {"mode": "cached-features (multi-source)",
                  "cached": all(f.cached for _, f in feats),
                  "seconds": round(sum(f.seconds for _, f in feats), 1)}
    card = card_lib.build(cfg, split, backbone, history, extraction, metrics, train_seconds, onnx_diff,
                          model_lib.weights_fingerprint(model_lib.backbone_layers(shipped)))
    card["architecture"] = describe_architecture(head)
    card["head"] = head.to_dict()
    card["sources"] = mt.describe_sources(mcfg)
    card["data"]["sources_counts"] = mt.counts(feats)
    if uav_split is not None:
        card["data"]["uav_split_file"] = sources.UAV_SPLIT_FILE
        card["data"]["uav_split_counts"] = {k: len(v) for k, v in uav_split.items()}
    card["training"]["augmentation"] = mt.augment_doc(mcfg)
    card["training"]["sample_weights"] = "each source, and each class within it, weighs the same in the loss"
    card["training"]["feature_extraction"]["inputs"] = int(sum(len(f) for _, f in feats))
    write_card(out, card)

    from training.domain_fit import fit_domain_sets

    fit_domain_sets(out / MODEL_FILE, out, domain_sets(mcfg, cfg.seed), split.classes)
    return read_card(out)


def describe_architecture(head: ms.HeadConfig) -> str:
    reads = " + ".join(["GlobalAveragePooling2D 'pooled' (1280)"]
                       + [f"spatial mean of {n} ({ms.EXTRA_LAYERS[n]})" for n in head.extra])
    hidden = f"Dense({head.hidden}, relu, L2 {head.l2}) -> " if head.hidden else ""
    return (f"MobileNetV2 alpha=1.0 (frozen, flat) -> [{reads}] {hidden}"
            f"Dropout({head.dropout}) -> Dense(2, softmax) 'probabilities'")


def score_set(model, spec: mt.SetSpec):
    """Metrics of the saved model on one held-out set (images rebuilt, run through the whole model)."""
    image_set = spec.build()
    fn = model_lib.inference_fn(model)
    with bar(f"score {spec.source} {spec.split}", len(image_set)) as advance:
        parts = []
        for i in range(0, len(image_set), 64):
            parts.append(fn(image_set.images[i:i + 64].astype(np.float32)))
            advance(len(parts[-1]))
    probs = np.concatenate(parts) if parts else np.zeros((0, 2), np.float32)
    entry = score(image_set.labels, probs) if len(probs) else {"n": 0}
    if len(probs) and np.any(image_set.tile_sizes):
        entry["by_tile_size"] = {
            str(int(t)): score(image_set.labels[image_set.tile_sizes == t], probs[image_set.tile_sizes == t])
            for t in np.unique(image_set.tile_sizes)}
        entry["photos"] = len(set(image_set.groups))
    return entry, (image_set.images[:0], image_set.labels, probs)


def domain_sets(mcfg: mt.MultiConfig, seed: int) -> dict:
    """Per split, the sets the in-domain check is fitted (train), calibrated (val) and measured (test) on."""
    out = {}
    for name in ("train", "val", "test"):
        out[name] = [s for s in mt.specs(mcfg, (name,)) if s.kind in ("clean", "grid")]
    return out


def _uav_split(cfg, out: Path):
    if not (cfg.uav_images and cfg.uav_masks):
        return None
    if cfg.uav_split:
        split = sources.load_photo_split(cfg.uav_split)
    else:
        split = sources.photo_split(sources.mask_pairs(cfg.uav_images, cfg.uav_masks), cfg.seed)
    sources.save_photo_split(out / sources.UAV_SPLIT_FILE, split, cfg.seed, sources.UAV_RATIOS,
                             cfg.uav_images, cfg.uav_masks)
    return split
