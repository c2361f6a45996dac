"""Learning curve of ``crackq adapt`` on drone photos of concrete, from a base model that never saw them.

    python -m benchmarks.adaptation --base-model build/base-ozgenel/crackq_mobilenetv2.keras \
        [--split uav --held-out val|test | --split half] [--budgets 0,25,50,100,200] [--seeds 1]

The shipped model was trained on the uav-concrete TRAIN photos, so for it this data set is no longer an
unseen domain.  The honest measure starts from ``--base-model``, a model trained on Özgenel alone with the
shipped head architecture (docs/drone.md has the one ``crackq train`` command that makes it).
``--split uav`` (default) uses ``models/uav_split.json``: the pool to label from is the 220 TRAIN photos,
the held-out photos are the 48 VAL photos (``--held-out val``, where designs were chosen) or the 47 TEST
photos (``--held-out test``, reported once the design was fixed).  ``--split half`` is the previous seeded
half/half split of all 315 photos (for an Özgenel-only base model only).  Run with the shipped model as
``--base-model`` and ``--held-out val`` it measures the familiar-domain case.

Data: ``../shared/data/uav-concrete`` (315 drone photos, 448 px, crack masks).  Tiles are cut where
workers cut them (``tile_grid`` at the ``tile_size`` setting); a tile is a crack tile when its mask has at
least ``--min-crack`` of crack pixels, a no-crack tile when it has none, ambiguous (left out) otherwise.
For every strategy and budget n, n tiles of the pool are picked (``uncertain``: :mod:`shared.picking` on
the base model's probabilities and features, as ``crackq label`` does; ``random``: a seeded sample),
labelled from the masks, written as a labelled folder, and ``crackq adapt``'s recipe is run on them;
the adapted model is scored on every held-out tile exactly as a worker serves it (ONNX, tiles cut from
the photo, the card's threshold).  Budget 0 is the base model.  Özgenel test accuracy is the
adapted model's on the 960 test patches of ``models/split.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
UAV = REPO.parent / "shared" / "data" / "uav-concrete"


def tiles_from_masks(root: Path, size: int, min_crack: float) -> list[dict]:
    """Every unambiguous tile of every photo: ``{"photo", "x", "y", "w", "h", "crack"}``."""
    from shared.preprocessing import tile_grid

    out = []
    for photo in sorted((root / "images").glob("*.jpg")):
        mask = np.asarray(Image.open(root / "masks" / f"{photo.stem}.png").convert("L")) > 127
        for b in tile_grid(mask.shape[1], mask.shape[0], size):
            frac = mask[b.y:b.y + b.h, b.x:b.x + b.w].mean()
            if frac == 0 or frac >= min_crack:
                out.append({"photo": str(photo), "x": b.x, "y": b.y, "w": b.w, "h": b.h, "crack": bool(frac > 0)})
    return out


def score_tiles(model_path: str, tiles: list[dict], size: int, settings):
    """Probabilities and pooled features of ``tiles`` as a worker computes them (ONNX, photo-cut inputs)."""
    from producer.candidates import Tile, score
    from shared.onnx_model import OnnxModel
    from shared.preprocessing import Box

    model = OnnxModel.load(model_path)
    refs = [Tile(t["photo"], Box(t["x"], t["y"], t["w"], t["h"])) for t in tiles]
    probs, feats, ok = score(model, refs, size, settings)
    assert len(ok) == len(tiles), "unreadable photos in the benchmark set"
    order = np.argsort(ok)
    return probs[order], feats[order], model.threshold()


def write_folder(tiles: list[dict], folder: Path) -> None:
    """The picked tiles as ``crackq label`` writes them (PNG crops in Positive/ Negative/ + labels.csv)."""
    from producer.labelbook import LabelBook
    from shared.preprocessing import Box, load_rgb

    book = LabelBook(folder)
    photos = {}
    for t in tiles:
        img = photos.get(t["photo"]) or photos.setdefault(t["photo"], load_rgb(t["photo"]))
        book.add(t["photo"], Box(t["x"], t["y"], t["w"], t["h"]), "crack" if t["crack"] else "no_crack", None, img)


def balanced_acc(y: np.ndarray, p: np.ndarray, t: float) -> float:
    from training.adapt_fit import balanced_accuracy

    return balanced_accuracy(y.astype(int), p, t)


def split_tiles(tiles: list[dict], args, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the pool and of the held-out tiles, by photo (``--split``)."""
    if args.split == "uav":
        photos = json.loads(Path(args.uav_split).read_text())["photos"]
        pool_stems, held_stems = set(photos["train"]), set(photos[args.held_out])
        stem = [Path(t["photo"]).stem for t in tiles]
        return (np.array([i for i, s in enumerate(stem) if s in pool_stems]),
                np.array([i for i, s in enumerate(stem) if s in held_stems]))
    photos = sorted({t["photo"] for t in tiles})
    rng = np.random.default_rng(100 + seed)
    pool_photos = set(rng.permutation(photos)[: int(len(photos) * args.pool_share)].tolist())
    return (np.array([i for i, t in enumerate(tiles) if t["photo"] in pool_photos]),
            np.array([i for i, t in enumerate(tiles) if t["photo"] not in pool_photos]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(UAV))
    ap.add_argument("--budgets", default="0,25,50,100,200")
    ap.add_argument("--strategies", default="uncertain,random")
    ap.add_argument("--seeds", type=int, default=1, help="Repeats (photo split and random picks vary).")
    ap.add_argument("--base-model", default=None, help="Model to adapt [default: setting model, the shipped one].")
    ap.add_argument("--split", choices=("uav", "half"), default="uav",
                    help="uav: pool = uav_split.json train photos, held out = --held-out; half: seeded halves.")
    ap.add_argument("--held-out", choices=("val", "test"), default="val", help="--split uav: held-out photos.")
    ap.add_argument("--uav-split", default=str(REPO / "models" / "uav_split.json"))
    ap.add_argument("--pool-share", type=float, default=0.5, help="--split half: share of photos in the pool.")
    ap.add_argument("--min-crack", type=float, default=0.002, help="Crack-pixel share of a crack tile.")
    ap.add_argument("--unfreeze-blocks", default="0")
    ap.add_argument("--verbose", action="store_true", help="Print the fine-tune's progress.")
    ap.add_argument("--json", default=None, help="Also write the rows to this JSON file.")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from shared.config import Settings
    from shared.picking import pick_random, pick_uncertain
    from training.adapt import AdaptConfig, adapt

    settings = Settings.load()
    base_model = args.base_model or settings.model
    size = settings.tile_size
    tiles = tiles_from_masks(Path(args.data), size, args.min_crack)
    y_all = np.array([t["crack"] for t in tiles])
    print(f"{len(tiles)} tiles of {size} px ({int(y_all.sum())} crack) from "
          f"{len({t['photo'] for t in tiles})} photos; base model {base_model}", flush=True)
    started = time.perf_counter()
    probs0, feats0, thr0 = score_tiles(base_model, tiles, size, settings)
    print(f"scored every tile with the base model in {time.perf_counter() - started:.1f}s", flush=True)
    budgets = [int(b) for b in args.budgets.split(",")]
    rows = []
    work = Path(tempfile.mkdtemp(prefix="crackq-adapt-bench-"))
    try:
        for seed in range(args.seeds):
            pool, held = split_tiles(tiles, args, seed)
            base = balanced_acc(y_all[held], probs0[held], thr0)
            print(f"seed {seed}: pool {len(pool)} tiles, held out {len(held)} tiles "
                  f"({int(y_all[held].sum())} crack); base model balanced accuracy {base:.3f}", flush=True)
            for n in budgets:          # budgets outermost: a run cut short still compares the strategies
                for strategy in args.strategies.split(","):
                    row = {"seed": seed, "strategy": strategy, "labels": n}
                    if n == 0:
                        rows.append({**row, "balanced_accuracy": round(base, 4), "seconds": 0.0})
                        print(json.dumps(rows[-1]), flush=True)
                        continue
                    picked = (pick_random(len(pool), n, seed) if strategy == "random" else
                              pick_uncertain(probs0[pool], feats0[pool], [tiles[i]["photo"] for i in pool], n, thr0))
                    chosen = [tiles[pool[i]] for i in picked]
                    folder, model_dir = work / f"{strategy}-{n}-{seed}", work / f"model-{strategy}-{n}-{seed}"
                    write_folder(chosen, folder)
                    t0 = time.perf_counter()
                    try:
                        card = adapt(AdaptConfig(data_dir=str(folder), out=str(model_dir), init_model=base_model,
                                                 unfreeze_blocks=args.unfreeze_blocks, seed=seed),
                                     progress=(lambda m: print('   ', m, flush=True)) if args.verbose else (lambda m: None))
                    except ValueError as exc:  # too few of one class among the picks
                        rows.append({**row, "error": str(exc)})
                        print(json.dumps(rows[-1]), flush=True)
                        continue
                    seconds = time.perf_counter() - t0
                    p, _, thr = score_tiles(str(model_dir / "crackq_mobilenetv2.keras"), [tiles[i] for i in held],
                                            size, settings)
                    cv = card["metrics"]["new_imagery_cv"]
                    kept = card["metrics"]["replay_test"] or {}
                    rows.append({**row, "crack_labels": int(sum(t["crack"] for t in chosen)),
                                 "balanced_accuracy": round(balanced_acc(y_all[held], p, thr), 4),
                                 "at_0_5": round(balanced_acc(y_all[held], p, 0.5), 4),
                                 "cv_estimate": cv["balanced_accuracy"], "threshold": round(thr, 3),
                                 "ozgenel_test": kept.get("accuracy"), "ozgenel_at_0_5": kept.get("accuracy_at_0_5"), "seconds": round(seconds, 1),
                                 "unfrozen": card["backbone"].get("unfrozen_blocks", 0)})
                    print(json.dumps(rows[-1]), flush=True)
                    if args.json:  # written as it goes: a run cut short keeps its rows
                        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
                    shutil.rmtree(folder, ignore_errors=True)
                    shutil.rmtree(model_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _table(rows, budgets)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def _table(rows: list[dict], budgets: list[int]) -> None:
    print("\n| strategy | labels | held-out balanced acc. | CV estimate | Özgenel test | fine-tune s |")
    print("|---|---:|---:|---:|---:|---:|")
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        for n in budgets:
            sel = [r for r in rows if r["strategy"] == strategy and r["labels"] == n and "error" not in r]
            if not sel:
                continue
            mean = lambda k: np.mean([r[k] for r in sel if r.get(k) is not None]) if any(  # noqa: E731
                r.get(k) is not None for r in sel) else float("nan")
            print(f"| {strategy} | {n} | {mean('balanced_accuracy'):.3f} | {mean('cv_estimate'):.3f} | "
                  f"{mean('ozgenel_test'):.4f} | {mean('seconds'):.0f} |")


if __name__ == "__main__":
    sys.exit(main())
