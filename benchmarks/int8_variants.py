"""How the INT8 recipe was chosen: each candidate (calibration set, calibrator, ops left in FP32, per-channel,
reduce_range, QDQ vs QOperator) measured against FP32 on sets that may be used for choosing -- never a test set.

    .venv/bin/python -m benchmarks.int8_variants [--only NAME ...]

Sets (all drawn from what the model trained on or was validated on):

* ``oz-holdout``: the 1,000-image calibration hold-out of the Özgenel training split (the export gate);
* ``uav-holdout``: 600 grid tiles of the other half of the uav-concrete *training* photos (the half not
  used for calibration);
* ``uav-val`` / ``uav-val-grid``: the uav-concrete *validation* photos, cut as workers cut them (227 px) and
  on the 224/112/64 grid of the model card's uav metrics.

Speed: model only, one inference thread, batch 8 (the worker default), 128 real patches, median of 3;
FP32 is measured in the same run, so the ratio is what to compare (the machine is shared).
Writes one JSON line per variant to ``benchmarks/results/int8_variants.jsonl`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO
from shared.model_card import onnx_path
from training import quantize

#: name -> (calibration set, quantize() keyword arguments)
VARIANTS = {
    "oz600/minmax/features": ("oz", {}),
    "mix/minmax/features": ("mix", {}),
    "mix/minmax/features+head": ("mix", {"exclude": "features+head"}),
    "oz600/minmax/features+head": ("oz", {"exclude": "features+head"}),
    "mix/minmax/features+head+late": ("mix", {"exclude": "features+head+late"}),
    "mix/minmax/features+head+early": ("mix", {"exclude": "features+head+early"}),
    "mix/minmax/features+head+stem": ("mix", {"exclude": "features+head+stem"}),
    "mix/minmax/features+head+early6": ("mix", {"exclude": "features+head+early6"}),
    "mix/minmax/features+early": ("mix", {"exclude": "features+early"}),
    "oz600/minmax/features+early": ("oz", {"exclude": "features+early"}),
    "mix/minmax/features+head+early/relu6-calibrated": ("mix", {"exclude": "features+head+early",
                                                                "calibrated_relu6": True}),
    "mix/minmax/features+early/per-tensor": ("mix", {"exclude": "features+early", "per_channel": False}),
    "mix/minmax/features+early/reduce-range": ("mix", {"exclude": "features+early", "reduce_range": True}),
    "mix/minmax/features+early/qoperator": ("mix", {"exclude": "features+early", "quant_format": "qoperator"}),
    "uav300/minmax/features+head": ("uav", {"exclude": "features+head"}),
    "mix/minmax/features+head/relu6-p99.99": ("mix", {"exclude": "features+head", "relu6_percentile": 99.99}),
    "mix/minmax/features+head/relu6-p99.9": ("mix", {"exclude": "features+head", "relu6_percentile": 99.9}),
    "mix/minmax/features/relu6-p99.99": ("mix", {"relu6_percentile": 99.99}),
    "mix/minmax/features+early/relu6-p99.99": ("mix", {"exclude": "features+early", "relu6_percentile": 99.99}),
    "mix64/minmax/features+head": ("mix64", {"exclude": "features+head"}),
    "mix64/entropy/features+head": ("mix64", {"exclude": "features+head", "method": "entropy"}),
    "mix64/percentile/features+head": ("mix64", {"exclude": "features+head", "method": "percentile"}),
    "mix64/entropy/features+early": ("mix64", {"exclude": "features+early", "method": "entropy"}),
    "mix/minmax/features+head/per-tensor": ("mix", {"exclude": "features+head", "per_channel": False}),
    "mix/minmax/features+head/reduce-range": ("mix", {"exclude": "features+head", "reduce_range": True}),
    "mix/minmax/features+head/qoperator": ("mix", {"exclude": "features+head", "quant_format": "qoperator"}),
}


def speed(path: Path, inputs: np.ndarray, batch: int = 8, rounds: int = 3) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = inputs.astype(np.float32)
    session.run(None, {name: x[:batch]})
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            session.run(None, {name: x[i:i + batch]})
        times.append(time.perf_counter() - start)
    return len(x) / statistics.median(times)


def build_sets(model: str, data: Path, uav: Path) -> tuple[dict, dict]:
    split = json.loads(Path(model).with_name("split.json").read_text())["files"]
    oz_cal, oz_hold = quantize.calibration_files(split["train"], quantize.CALIBRATION_IMAGES,
                                                 quantize.HOLDOUT_IMAGES)
    photos = quantize.uav_photo_split(model)
    uav_cal, uav_hold, uav_hold_y = quantize.uav_train_tiles(uav, photos["train"], 300, 600)
    oz_cal_x = quantize.load_inputs(data, oz_cal)
    mix = np.concatenate([oz_cal_x[::2], uav_cal])
    # The histogram calibrators keep every activation of every image in memory (600 images: > 20 GB,
    # OOM-killed here), so they are measured on an evenly spaced 64 of the mix, with MinMax on the same 64.
    calibration = {"oz": oz_cal_x, "mix": mix, "uav": uav_cal, "mix64": mix[::len(mix) // 64][:64]}
    sets = {"oz-holdout": (quantize.load_inputs(data, oz_hold), quantize.labels_for(oz_hold)),
            "uav-holdout": (uav_hold, uav_hold_y)}
    val = quantize.uav_sets(model, uav, "val")
    sets["uav-val"], sets["uav-val-grid"] = val["uav-concrete"], val["uav-concrete-grid"]
    return calibration, sets


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO / "models" / "crackq_mobilenetv2.keras"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "concrete"))
    ap.add_argument("--uav", default=str(REPO.parent / "shared" / "data" / "uav-concrete"))
    ap.add_argument("--only", nargs="*", help="Variant names (default: all).")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "int8_variants.jsonl"))
    ap.add_argument("--keep", help="Folder to keep the INT8 files in (default: a temporary one).")
    args = ap.parse_args(argv)
    fp32 = onnx_path(args.model)
    calibration, sets = build_sets(args.model, Path(args.data), Path(args.uav))
    print({k: len(v[0]) for k, v in sets.items()}, flush=True)
    ref = {k: quantize.onnx_outputs(fp32, x)[0][:, 1] for k, (x, _) in sets.items()}
    bench = sets["oz-holdout"][0][:64]
    bench = np.concatenate([bench, sets["uav-holdout"][0][:64]])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keep = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="crackq-int8-variants-"))
    keep.mkdir(parents=True, exist_ok=True)
    for name in args.only or VARIANTS:
        source, kwargs = VARIANTS[name]
        path = keep / (name.replace("/", "_") + ".onnx")
        start = time.perf_counter()
        quantize.quantize(fp32, path, calibration[source], **kwargs)
        seconds = time.perf_counter() - start
        row = {"variant": name, "calibration_images": len(calibration[source]), "quantize_s": round(seconds, 1)}
        for k, (x, y) in sets.items():
            row[k] = quantize.compare(ref[k], quantize.onnx_outputs(path, x)[0][:, 1], y).to_dict()
        row["img_s_fp32"] = speed(fp32, bench)
        row["img_s_int8"] = speed(path, bench)
        row["load"] = os.getloadavg()[0]
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(summary(row), flush=True)


def summary(row: dict) -> str:
    cells = [row["variant"]]
    for k in ("oz-holdout", "uav-holdout", "uav-val", "uav-val-grid"):
        a = row[k]
        cells.append(f"{k} {100 * a['accuracy_int8']:.2f}/{100 * a['accuracy_fp32']:.2f} "
                     f"dp {a['mean_abs_diff']:.4f} p99 {a['p99_abs_diff']:.3f} flips {a['label_flips']} "
                     f"{'ok' if a['passed'] else 'FAIL'}")
    cells.append(f"speed {row['img_s_int8']:.0f} vs {row['img_s_fp32']:.0f} img/s "
                 f"({row['img_s_int8'] / row['img_s_fp32']:.2f}x) q {row['quantize_s']}s")
    return " | ".join(cells)


if __name__ == "__main__":
    main()
