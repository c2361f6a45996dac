"""Which tile size and scales should serving use?  Region accuracy on uav-concrete VALIDATION photos, and cost.

Every configuration runs the worker's own pipeline (``ChunkRunner``: decode,
multi-scale tiling, ONNX model) on the same photos, in one run.  Each
scale-1 tile (a *region*) is labelled from the photo's mask with the rules of
:mod:`shared.mask_tiles` (ambiguous regions left out) and gets the crack
probability of each combination rule:

* ``scale 1``: its own tile only;
* ``max``: the max over its tile and the finer tiles centred in it;
* ``mean``: the mean of its own tile and that max (shipped: ``region_probabilities``).

Cost is model inputs per photo and photos/s (and inputs/s) of the whole
pipeline on this machine, single worker process.  VALIDATION photos only:
the test photos of ``models/uav_split.json`` are never used for a choice.

    python -m benchmarks.scales [--tiles 227,160,112] [--photos 48]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, UAV


def region_rules(boxes, scales, probs) -> dict[str, np.ndarray]:
    from shared.preprocessing import region_probabilities

    scales = np.asarray(scales)
    coarse = np.flatnonzero(scales == scales.min())
    own = np.asarray(probs)[coarse]
    rules = {"scale 1": own}
    if len(set(scales.tolist())) > 1:
        combined = region_probabilities(boxes, scales, probs)  # own + half-way to a higher finer tile
        rules["max"] = 2 * combined - own                        # = max(own, highest finer tile)
        rules["mean"] = combined
    return rules


def main() -> None:
    from sklearn.metrics import roc_auc_score

    from shared.config import Settings
    from shared.contract import ChunkOptions
    from shared.mask_tiles import label_tile, load_mask
    from training.sources import load_photo_split
    from shared.inference import load_classifier
    from worker.pipeline import ChunkRunner

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=Settings.load().model)
    ap.add_argument("--tiles", default="227,160,112")
    ap.add_argument("--scales", default="1;1,2")
    ap.add_argument("--photos", type=int, default=48)
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "scales.json"))
    args = ap.parse_args()
    stems = load_photo_split(REPO / "models" / "uav_split.json")["val"][: args.photos]
    photos = [str(UAV / "images" / f"{s}.jpg") for s in stems]
    masks = {p: load_mask(str(UAV / "masks" / f"{s}.png")) for p, s in zip(photos, stems)}
    settings = Settings.load(model=args.model, backend="onnx", data_roots=(str(UAV),), threads=0)
    classifier = load_classifier(settings)
    runner = ChunkRunner(classifier, settings, "bench", None)
    rows = []
    for tile in map(int, args.tiles.split(",")):
        for scales in [tuple(map(int, s.split(","))) for s in args.scales.split(";")]:
            options = ChunkOptions(tile_size=tile, scales=scales, per_tile=True)
            items = [{"index": i, "path": p} for i, p in enumerate(photos)]
            runner.run(items[:2], options)  # warm-up
            start = time.perf_counter()
            out = runner.run(items, options)
            seconds = time.perf_counter() - start
            labels, per_rule, n_inputs = [], {}, 0
            for i, p in enumerate(photos):
                tiles = out.tiles[i]
                n_inputs += len(tiles)
                from shared.preprocessing import Box

                boxes = [Box(t["x"], t["y"], t["w"], t["h"]) for t in tiles]
                sc = np.array([t["scale"] for t in tiles])
                pr = np.array([t["crack_probability"] for t in tiles])
                rules = region_rules(boxes, sc, pr)
                coarse = [b for b, s in zip(boxes, sc) if s == sc.min()]
                keep = []
                for j, b in enumerate(coarse):
                    _, label = label_tile(masks[p][b.y:b.y + b.h, b.x:b.x + b.w])
                    if label is not None:
                        keep.append(j)
                        labels.append(label)
                for name, values in rules.items():
                    per_rule.setdefault(name, []).extend(values[keep])
            y = np.array(labels)
            for name, values in per_rule.items():
                v = np.array(values)
                acc = float(np.mean((v >= 0.5) == y))
                bal = float(np.mean([np.mean((v[y == c] >= 0.5) == bool(c)) for c in (0, 1)]))
                rows.append({"tile": tile, "scales": ",".join(map(str, scales)), "rule": name,
                             "regions": int(len(y)), "crack_share": round(float(y.mean()), 3),
                             "accuracy": round(acc, 4), "balanced_accuracy": round(bal, 4),
                             "roc_auc": round(float(roc_auc_score(y, v)), 4),
                             "inputs_per_photo": round(n_inputs / len(photos), 1),
                             "photos_per_s": round(len(photos) / seconds, 2),
                             "inputs_per_s": round(n_inputs / seconds, 1)})
                print(rows[-1], flush=True)
    runner.close()
    print("\n| tile px | scales | rule | regions | accuracy | balanced acc. | ROC-AUC | inputs/photo | photos/s | inputs/s |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tile']} | {r['scales']} | {r['rule']} | {r['regions']} | {r['accuracy']:.1%} | "
              f"{r['balanced_accuracy']:.1%} | {r['roc_auc']:.3f} | {r['inputs_per_photo']} | {r['photos_per_s']} | "
              f"{r['inputs_per_s']} |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"photos": len(photos), "split": "val", "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
