"""Does the shipped model give right answers on imagery it was not trained on?  One run, every folder.

For every labelled folder given (``Positive/`` and ``Negative/`` sub-folders:
public crack data sets, ``crackq tiles from-masks`` output of held-out photos,
...), two paths are scored:

* ``model``: the worker's own code in this process (``prepare_image`` +
  the ONNX classifier + the in-domain check), image by image;
* ``service``: ``crackq run FOLDER`` exactly as a user runs it (private Redis,
  local workers), read back from its CSV.

Each prints accuracy, balanced accuracy, ROC-AUC, coverage (share flagged
in domain) and selective accuracy (accuracy on what is flagged in domain).
A third table, leave-one-source-out, trains the head on cached features of
every training source but one and scores it on that source's VALIDATION set:
how the recipe does on a source it has never seen.

    python -m benchmarks.generalisation FOLDER [FOLDER ...] [--limit 200] [--no-service] [--no-loso]
    make bench-generalisation          # uav-concrete TEST photos (tiles from masks) + Özgenel test split
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO


def metrics(labels, probs, in_domain) -> dict:
    """accuracy, balanced accuracy, ROC-AUC, coverage and selective accuracy of one folder."""
    from sklearn.metrics import roc_auc_score

    labels, probs = np.asarray(labels), np.asarray(probs, dtype=float)
    pred = probs >= 0.5
    correct = pred == labels.astype(bool)
    recall = [float(np.mean(pred[labels == c] == bool(c))) for c in (0, 1) if (labels == c).any()]
    known = [d for d in in_domain if d is not None]
    dom = np.array([bool(d) if d is not None else True for d in in_domain])
    if not known:  # no in-domain answer (e.g. a head without a description): coverage is not defined
        dom = np.ones(len(labels), bool)
    return {"n": int(len(labels)), "accuracy": float(correct.mean()), "balanced_accuracy": float(np.mean(recall)),
            "roc_auc": float(roc_auc_score(labels, probs)) if len(set(labels.tolist())) == 2 else None,
            "coverage": float(dom.mean()) if known else None,
            "selective_accuracy": float(correct[dom].mean()) if known and dom.any() else None}


def labelled_files(folder: Path, limit: int | None, seed: int = 0) -> list[tuple[str, int]]:
    from shared.preprocessing import IMAGE_EXTENSIONS

    out = []
    for label, name in ((1, "Positive"), (0, "Negative")):
        files = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if limit is not None and len(files) > limit:
            files = [files[i] for i in sorted(np.random.default_rng(seed).permutation(len(files))[:limit])]
        out += [(str(p.resolve()), label) for p in files]
    return out


def score_in_process(model: str, files: list[tuple[str, int]]) -> dict:
    """The worker's pipeline (decode, tiling, model, in-domain check) without the queue."""
    from shared.config import Settings
    from shared.contract import ChunkOptions
    from shared.inference import load_classifier
    from worker.pipeline import ChunkRunner
    from shared.domain import DomainScorer

    settings = Settings.load(model=model, backend="onnx", data_roots=("/",))
    classifier = load_classifier(settings)
    runner = ChunkRunner(classifier, settings, "bench", DomainScorer.load(Path(model).parent))
    options = ChunkOptions(threshold=settings.threshold, tile_size=settings.tile_size,
                           tile_overlap=settings.tile_overlap, scales=settings.scales)
    out = runner.run([{"index": i, "path": p} for i, (p, _) in enumerate(files)], options)
    runner.close()
    recs = [out.records[i] for i in range(len(files))]
    ok = [i for i, r in enumerate(recs) if not r.get("error")]
    return metrics([files[i][1] for i in ok], [recs[i]["crack_probability"] for i in ok],
                   [recs[i].get("in_domain") for i in ok])


def score_service(model: str, folder: Path, files: list[tuple[str, int]], workers: int) -> dict:
    """``crackq run`` on a folder of links to ``files`` (so --limit applies), read back from its CSV."""
    with tempfile.TemporaryDirectory() as tmp:
        link_dir = Path(tmp) / folder.name
        truth = {}
        for i, (path, label) in enumerate(files):
            sub = link_dir / ("Positive" if label else "Negative")
            sub.mkdir(parents=True, exist_ok=True)
            link = sub / f"{i:06d}{Path(path).suffix}"
            link.symlink_to(path)
            truth[str(link)] = label
        out = Path(tmp) / "results.csv"
        env = {**os.environ, "CRACKQ_MODEL": model}
        env.pop("CRACKQ_REDIS_URL", None)
        subprocess.run([sys.executable, "-m", "producer.cli", "run", str(link_dir), "--out", str(out),
                        "--workers", str(workers)], check=True, env=env, capture_output=True, text=True)
        rows = [r for r in csv.DictReader(out.open()) if not r["error"]]
    labels = [truth[r["path"]] for r in rows]
    return metrics(labels, [float(r["crack_probability"]) for r in rows],
                   [None if r["in_domain"] == "" else r["in_domain"].lower() == "true" for r in rows])


def leave_one_source_out(model_path: str, cache_dir: str) -> list[dict]:
    """Head trained on cached features of every training source but X, scored on X's validation set."""
    from training import model as model_lib
    from training import multisource as ms
    from training import multitrain as mt
    from training.data import Split
    from training.sources import load_photo_split

    card = json.loads(Path(model_path).with_name("model_card.json").read_text())
    head = ms.HeadConfig(**{k: tuple(v) if k == "extra" else v for k, v in card["head"].items()})
    src = card["sources"]
    cfg = mt.MultiConfig(src["ozgenel"]["dir"], Split.load(Path(model_path).with_name("split.json")),
                         src.get("uav", {}).get("images"), src.get("uav", {}).get("masks"),
                         load_photo_split(Path(model_path).with_name("uav_split.json")),
                         augment=card["training"]["augmentation"]["name"],
                         train_per_class=src["ozgenel"]["train_per_class"],
                         val_per_class=src["ozgenel"]["val_per_class"],
                         uav_crops_per_photo=src.get("uav", {}).get("crops_per_photo", 40))
    def fresh():
        return model_lib.build_model(card["backbone"]["weights"]["source"], dropout=head.dropout,
                                     extra_layers=head.extra, hidden=head.hidden, l2=head.l2)

    feats = mt.extract_all(fresh(), mt.specs(cfg, ("train", "val")), cache_dir)
    columns = ms.head_columns(head)
    rows = []
    for held in sorted({s.source for s, _ in feats}):
        for trained_on in ("all", "without"):
            keep = [f for f in feats if f[0].split == "train" and (trained_on == "all" or f[0].source != held)]
            x, y, names = mt.stack(keep, columns)
            model = fresh()  # a new head each time (fit_head folds the standardisation into its weights)
            ms.fit_head(model, x, y, head, ms.source_weights([f"{n}/{c}" for n, c in zip(names, y)]))
            xv, yv, _ = mt.stack([f for f in feats if f[0].split == "val" and f[0].source == held], columns)
            p = ms.predict_head(model, xv)[:, 1]
            rows.append({"held_out": held, "trained_on": f"{trained_on} sources" if trained_on == "all"
                         else f"all but {held}", **metrics(yv, p, [None] * len(yv))})
    return rows


def _print(title: str, rows: list[dict], first: list[str]) -> None:
    print(f"\n{title}\n")
    cols = first + ["n", "accuracy", "balanced_accuracy", "roc_auc", "coverage", "selective_accuracy"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(first) + "---:|" * (len(cols) - len(first)))
    for r in rows:
        cells = [str(r[c]) for c in first] + [str(r["n"])]
        cells += ["n/a" if r[c] is None else f"{r[c]:.1%}" if c != "roc_auc" else f"{r[c]:.3f}" for c in cols[len(first) + 1:]]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    from shared.config import Settings

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="*", help="Labelled folders (Positive/, Negative/).")
    ap.add_argument("--model", default=Settings.load().model)
    ap.add_argument("--limit", type=int, default=200, help="Images per class and folder (seeded sample).")
    ap.add_argument("--workers", type=int, default=2, help="Local workers of the service path.")
    ap.add_argument("--no-service", action="store_true")
    ap.add_argument("--no-loso", action="store_true")
    ap.add_argument("--cache-dir", default=None, help="Feature cache of the leave-one-source-out table.")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "generalisation.json"))
    args = ap.parse_args()
    started = time.perf_counter()
    result = {"model": args.model, "folders": {}, "loso": None}
    rows_model, rows_service = [], []
    for folder in map(Path, args.folders):
        files = labelled_files(folder, args.limit)
        entry = {"model": score_in_process(args.model, files)}
        rows_model.append({"folder": folder.name, **entry["model"]})
        if not args.no_service:
            entry["service"] = score_service(args.model, folder, files, args.workers)
            rows_service.append({"folder": folder.name, **entry["service"]})
        result["folders"][str(folder)] = entry
    if rows_model:
        _print("shipped model, worker pipeline in process (threshold 0.5; coverage = flagged in domain)",
               rows_model, ["folder"])
    if rows_service:
        _print("service path: `crackq run FOLDER` (private Redis, local workers)", rows_service, ["folder"])
    if not args.no_loso:
        from training.features import default_cache_dir

        result["loso"] = leave_one_source_out(args.model, args.cache_dir or str(default_cache_dir()))
        _print("leave-one-source-out: head retrained on cached features, scored on the held-out source's "
               "VALIDATION set", result["loso"], ["held_out", "trained_on"])
    print(f"\n({time.perf_counter() - started:.0f} s)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
