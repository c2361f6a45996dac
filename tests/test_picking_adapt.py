"""Tiles worth labelling first (shared/picking.py, `crackq tiles export --strategy uncertain`) and the
few-label fine-tune (`crackq adapt`, training/adapt.py) on imagery the shipped model gets wrong."""

from __future__ import annotations

import csv
import json

import numpy as np
from PIL import Image

from benchmarks.common.imagery import PATCH, SPLIT_FILE, held_out_patches, layout, mosaic_photo, unfamiliar_images
from benchmarks.common.service import crackq_cli
from shared.picking import pick_random, pick_uncertain, uncertainty


def test_uncertain_picking_prefers_the_boundary_and_spreads_over_photos_and_looks():
    rng = np.random.default_rng(0)
    # photo A: 50 near-identical tiles right at the threshold; photo B: 50 varied, slightly less uncertain;
    # photo C: confident tiles.
    feats = np.concatenate([np.ones((50, 8)) + rng.normal(0, 1e-3, (50, 8)), rng.normal(0, 1, (50, 8)),
                            rng.normal(0, 1, (50, 8))])
    probs = np.concatenate([np.full(50, 0.5), rng.uniform(0.35, 0.65, 50), rng.uniform(0.0, 0.02, 50)])
    groups = ["A"] * 50 + ["B"] * 50 + ["C"] * 50
    picked = pick_uncertain(probs, feats, groups, 10, threshold=0.5)
    assert len(set(picked)) == 10 and picked[0] < 50                  # the most uncertain tile first
    assert sum(i < 50 for i in picked) <= 3                            # not ten copies of one stain
    assert all(i < 100 for i in picked)                                # never the confident ones
    assert uncertainty(np.array([0.5, 0.0, 1.0, 0.75]), 0.5).tolist() == [1.0, 0.0, 0.0, 0.5]
    assert pick_random(150, 10, 3) == pick_random(150, 10, 3) and len(set(pick_random(150, 10, 3))) == 10


def test_tiles_export_strategy_uncertain_takes_the_most_uncertain_tiles(concrete_dir, tmp_path):
    from producer.candidates import Tile, score
    from shared.config import Settings
    from shared.onnx_model import OnnxModel
    from shared.preprocessing import tile_grid

    photo, _ = mosaic_photo(held_out_patches(concrete_dir), layout(5, 4, seed=8), seed=8)
    path = tmp_path / "deck.jpg"
    photo.save(path, quality=95)
    out = tmp_path / "tiles"
    crackq_cli("tiles", "export", str(path), "--out", str(out), "--sample", "4", "--strategy", "uncertain",
               env={"CRACKQ_THREADS": "1"})
    with open(out / "tiles.csv", newline="") as fh:
        chosen = {(int(r["x"]), int(r["y"])) for r in csv.DictReader(fh)}
    boxes = tile_grid(*photo.size, PATCH)
    probs, _, _ = score(OnnxModel.load(Settings.load().model), [Tile(str(path), b) for b in boxes], PATCH,
                        Settings.load())
    ranked = [(b.x, b.y) for b in np.array(boxes, dtype=object)[np.argsort(-uncertainty(probs))]]
    assert len(chosen) == 4 and chosen <= set(ranked[:16])             # from the 4x pool of uncertain tiles
    assert ranked[0] in chosen and not chosen & set(ranked[16:])       # the most uncertain first; not the surest
    bad = crackq_cli("tiles", "export", str(path), "--out", str(out), "--strategy", "sideways", check=False)
    assert bad.returncode == 2 and "sideways" in bad.stderr


def test_adapt_learns_a_new_surface_keeps_the_old_and_stores_a_threshold(concrete_dir, tmp_path):
    """Worn-to-gravel concrete ("exposed aggregate"): the shipped model is ~70 % right on it."""
    patches = [p for ps in held_out_patches(concrete_dir).values() for p in ps]
    images, labels = unfamiliar_images("exposed aggregate", 64, patches, seed=3)
    new = tmp_path / "new"
    for i, (img, y) in enumerate(zip(images, labels)):
        folder = new / ("Positive" if y else "Negative")
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"wall{i % 16:02d}_x{i}_y0.png")              # 16 "photos", 4 tiles each
    # A small replay split (a sample of the shipped model's own split) keeps the test to seconds of decoding.
    from training.data import Split

    full = Split.load(SPLIT_FILE)
    small = {name: sorted([f for f in full.files[name] if f.startswith("Negative")][:n] +
                          [f for f in full.files[name] if f.startswith("Positive")][:n])
             for name, n in (("train", 100), ("val", 50), ("test", 50))}
    replay_split = tmp_path / "replay-split.json"
    Split(full.classes, full.seed, full.ratios, small, None, str(concrete_dir)).save(replay_split)
    out = tmp_path / "model"
    run = crackq_cli("adapt", str(new), "--out", str(out), "--replay-size", "200", "--folds", "4",
                     "--replay-dir", str(concrete_dir), "--replay-split", str(replay_split),
                     env={"XDG_CACHE_HOME": str(tmp_path / "cache"), "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=900)
    card = json.loads((out / "model_card.json").read_text())
    cv = card["metrics"]["new_imagery_cv"]
    assert cv["grouped_by_photo"] and cv["folds"] == 4 and cv["n"] == 64
    assert cv["balanced_accuracy"] > cv["init_model_balanced_accuracy"] + 0.05   # it learnt the new surface
    assert card["metrics"]["replay_test"]["images"] == 100
    assert card["metrics"]["replay_test"]["accuracy"] >= 0.98                 # and kept the old one
    assert 0.0 < card["threshold"]["value"] < 1.0 and card["domain"]["file"] == "domain.npz"
    assert "balanced accuracy" in run.stdout and (out / "crackq_mobilenetv2.onnx").exists()

    # The ONNX that ships gives the probabilities the card's estimate was made with (same head).
    from shared.onnx_model import OnnxModel
    from shared.preprocessing import load_input

    served = OnnxModel.load(out / "crackq_mobilenetv2.keras").predict(
        np.stack([load_input(str(p)) for p in sorted((new / "Positive").iterdir())]))[0]
    assert np.mean(served >= card["threshold"]["value"]) > 0.7

    few = tmp_path / "few"
    for cls in ("Positive", "Negative"):
        (few / cls).mkdir(parents=True)
    Image.fromarray(np.zeros((PATCH, PATCH, 3), np.uint8)).save(few / "Positive" / "a.png")
    refused = crackq_cli("adapt", str(few), "--out", str(tmp_path / "m2"), check=False)
    assert refused.returncode == 2 and "at least" in refused.stderr


def test_threshold_guard_keeps_the_original_imagery_and_heads_read_their_columns():
    """A threshold tuned on the new labels alone is dropped (0.5) when it costs the replay validation sample."""
    from types import SimpleNamespace

    from training.adapt import REPLAY_VAL_FLOOR, guard_threshold
    from training.adapt_fit import Head, pooled_columns
    from training.adapt_head import head_columns

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    rows = np.zeros((200, 1280))
    rows[:, 0] = np.where(y == 1, 2.0, -2.0) + rng.normal(0, 0.5, 200)   # p(crack) mostly far from 0.5
    head = Head(np.eye(1280)[0] * 2.0, 0.0, pooled_columns())
    replay = SimpleNamespace(val=rows, y_val=y)
    p = head.prob(rows)
    assert np.mean((p >= 0.5) == y.astype(bool)) >= REPLAY_VAL_FLOOR
    assert guard_threshold(0.999, replay, head, progress=lambda m: None) == 0.5   # would miss most cracks
    assert guard_threshold(0.45, replay, head, progress=lambda m: None) == 0.45  # harmless: kept
    assert guard_threshold(0.999, None, head) == 0.999                           # no replay: nothing to guard
    multi = head_columns(("block_13_expand_relu", "block_10_expand_relu"))
    assert len(multi) == 1280 + 576 + 384 and (multi[:1280] == pooled_columns()).all()
