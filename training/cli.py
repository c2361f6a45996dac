"""``crackq train``, ``crackq evaluate`` and ``crackq export``.

TensorFlow is imported inside the command bodies only, so ``crackq --help``
stays fast.  Defaults come from :class:`training.train.TrainConfig` and
:class:`shared.config.Settings`; nothing is defaulted twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from training.data import SPLIT_NAMES, parse_ratios
from training.tf_quiet import quiet_tensorflow as _quiet_tensorflow
from training.train import TrainConfig

D = TrainConfig.__dataclass_fields__


def _ratios(text: str):
    try:
        return parse_ratios(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _settings(**overrides):
    from shared.config import Settings

    return Settings.load(**overrides)


@click.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--epochs", default=D["epochs"].default, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=D["batch_size"].default, show_default=True, type=click.IntRange(1))
@click.option("--learning-rate", default=D["learning_rate"].default, show_default=True, type=float)
@click.option("--seed", default=D["seed"].default, show_default=True, type=int, help="Split and training seed.")
@click.option("--split", "split_ratios", default=":".join(map(str, D["ratios"].default)), show_default=True,
              callback=lambda ctx, param, value: _ratios(value), help="train:val:test proportions.")
@click.option("--backbone-weights", default=None,
              help="'imagenet' or a MobileNetV2 .h5 weights file [default: setting backbone_weights].")
@click.option("--init-model", type=click.Path(exists=True, dir_okay=False),
              help="Continue from this trained crackq .keras model (keeps its head) on DATA_DIR.")
@click.option("--unfreeze-blocks", default=D["unfreeze_blocks"].default, show_default=True,
              type=click.IntRange(0, 16), help="Train the top N inverted-residual blocks too (end to end).")
@click.option("--augment/--no-augment", default=D["augment"].default, show_default=True,
              help="Random flips, 90° rotations and brightness (end to end).")
@click.option("--tensorboard/--no-tensorboard", default=D["tensorboard"].default, show_default=True,
              help="Write TensorBoard logs to OUT/logs.")
@click.option("--cache-dir", default=D["cache_dir"].default_factory(), show_default=True,
              type=click.Path(file_okay=False), help="Where backbone features are cached.")
@click.option("--limit-per-class", type=click.IntRange(1), help="Use only N (seeded random) images per class.")
@click.option("--recipe", type=click.Choice(["adapt", "full"]), default="adapt", show_default=True,
              help="With --init-model: adapt = the few-label recipe of `crackq adapt` (replay, balancing, "
                   "augmentation, cross-validated threshold; the epoch/batch/rate options do not apply); "
                   "full = the whole training recipe from the init model.")
@click.option("--extra-source", "extra_sources", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Another labelled folder (Positive/Negative) to train on; repeatable (multi-source).")
@click.option("--uav-images", type=click.Path(exists=True, file_okay=False),
              help="Photos with crack masks (multi-source): tiles at several sizes, split by photo.")
@click.option("--uav-masks", type=click.Path(exists=True, file_okay=False),
              help="Masks of --uav-images (same file stems; 255 = crack).")
@click.option("--uav-split", type=click.Path(exists=True, dir_okay=False),
              help="uav_split.json to reuse [default: a new seeded 70:15:15 split by photo].")
@click.option("--head", type=click.Choice(["linear", "mlp"]), default=D["head"].default, show_default=True,
              help="linear: Dropout+Dense on the features; mlp: one hidden ReLU layer (multi-source).")
@click.option("--head-layer", "head_layers", multiple=True,
              type=click.Choice(["block_13_expand_relu", "block_10_expand_relu", "block_6_expand_relu"]),
              help="Earlier backbone layer whose spatial mean the head also reads; repeatable (multi-source).")
@click.option("--hidden", default=D["hidden"].default, show_default=True, type=click.IntRange(1),
              help="Hidden units of --head mlp.")
@click.option("--augmentation", type=click.Choice(["none", "geometric", "full", "mixed"]),
              default=D["augmentation"].default, show_default=True,
              help="Multi-source augmentation of cached training draws (docs/training.md).")
@click.option("--train-per-class", default=D["train_per_class"].default, show_default=True,
              type=click.IntRange(1), help="Multi-source: DATA_DIR training images per class used.")
@click.option("--uav-crops-per-photo", default=D["uav_crops_per_photo"].default, show_default=True,
              type=click.IntRange(0), help="Multi-source: augmented random crops per uav training photo.")
def train(data_dir, out, epochs, batch_size, learning_rate, seed, split_ratios, backbone_weights, init_model,
          unfreeze_blocks, augment, tensorboard, cache_dir, limit_per_class, extra_sources, uav_images, uav_masks,
          uav_split, head, head_layers, hidden, augmentation, train_per_class, uav_crops_per_photo, recipe):
    """Train the crack classifier on DATA_DIR (one sub-folder per class) and write model, ONNX, card, plots.

    With --uav-images/--uav-masks, --extra-source, --head mlp or --head-layer, trains on several sources
    from cached frozen features (docs/training.md has the recipe of the shipped model).
    """
    # ---- issue 11: `--init-model` fine-tunes with the few-label recipe (training/adapt.py) ----
    if init_model and recipe == "adapt":
        from training.adapt import AdaptConfig
        from training.adapt_cli import run_adapt

        # `train` always trains: the keep-init rule (ship the init model unchanged) is `crackq adapt`'s default
        run_adapt(AdaptConfig(data_dir=data_dir, out=out, init_model=init_model, seed=seed, cache_dir=cache_dir,
                              keep_init=False))
        return
    # ---- end issue 11 ----
    if bool(uav_images) != bool(uav_masks):
        raise click.UsageError("--uav-images and --uav-masks go together")
    multi = bool(extra_sources or uav_images or head != "linear" or head_layers)
    if multi and (init_model or unfreeze_blocks or augment):
        raise click.UsageError("multi-source training trains a new head on a frozen backbone: "
                               "--init-model, --unfreeze-blocks and --augment are for single-folder training")
    _quiet_tensorflow()
    from training.train import train as run

    cfg = TrainConfig(data_dir=data_dir, out=out, epochs=epochs, batch_size=batch_size,
                      learning_rate=learning_rate, seed=seed, ratios=split_ratios,
                      backbone_weights=_settings(backbone_weights=backbone_weights).backbone_weights,
                      init_model=init_model, unfreeze_blocks=unfreeze_blocks, augment=augment,
                      tensorboard=tensorboard, cache_dir=cache_dir, limit_per_class=limit_per_class,
                      extra_sources=tuple(extra_sources), uav_images=uav_images, uav_masks=uav_masks,
                      uav_split=uav_split, head=head, head_layers=tuple(head_layers), hidden=hidden,
                      augmentation=augmentation, train_per_class=train_per_class,
                      uav_crops_per_photo=uav_crops_per_photo)
    card = run(cfg)
    m = card["metrics"]
    for name in ("validation", "test"):
        if name in m:
            click.echo(f"{name}: accuracy {m[name]['accuracy']:.4f}  f1 {m[name]['f1']:.4f}  n {m[name]['n']}")
    for source, per_split in card["metrics"].get("by_source", {}).items():
        for name, entry in (per_split or {}).items():
            if entry and entry.get("n"):
                click.echo(f"{source} {name}: accuracy {entry['accuracy']:.4f}  n {entry['n']}")
    click.echo(f"training time {card['training']['training_time_seconds']} s; outputs in {out}")


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--split", type=click.Choice(SPLIT_NAMES), help="Score only this split of --split-file.")
@click.option("--split-file", type=click.Path(exists=True, dir_okay=False), help="split.json of a training run.")
@click.option("--batch-size", type=click.IntRange(1), help="Images per forward pass [default: setting batch_size].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate(model, data_dir, split, split_file, batch_size, as_json):
    """Score MODEL (.keras) on the labelled folder DATA_DIR: accuracy, precision, recall, F1, ROC-AUC, ECE."""
    _quiet_tensorflow()
    from training.evaluate import evaluate_folder, model_classes, select_files
    from training.model import load_model
    from training.progress import bar

    try:
        classes, files = select_files(data_dir, split, split_file)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    expected = model_classes(model)
    if expected is not None and expected != classes:
        raise click.ClickException(f"data classes {list(classes)} differ from the model's {list(expected)}")
    keras_model = load_model(model)
    with bar("score", len(files)) as advance:
        result = evaluate_folder(keras_model, data_dir, files, classes,
                                 _settings(batch_size=batch_size).batch_size, advance)
    if as_json:
        click.echo(json.dumps(result))
        return
    for key in ("accuracy", "precision", "recall", "f1", "roc_auc", "ece"):
        value = result[key]
        click.echo(f"{key:>10}: {'n/a' if value is None else f'{value:.4f}'}")
    (tn, fp), (fn, tp) = result["confusion_matrix"]
    click.echo(f"{'confusion':>10}: tn {tn}  fp {fp}  fn {fn}  tp {tp}   (n {result['n']}, skipped {result['skipped']})")


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="ONNX file [default: MODEL with .onnx suffix].")
@click.option("--int8", is_flag=True,
              help="Also write the INT8 model beside the ONNX (static per-channel QDQ, calibrated on the training "
                   "split), only if it passes the accuracy gate on its calibration hold-out; exit 2 otherwise.")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False),
              help="--int8: the training images [default: the data_dir recorded in split.json].")
@click.option("--split-file", type=click.Path(exists=True, dir_okay=False),
              help="--int8: split.json of the model's training run [default: beside MODEL].")
@click.option("--calibration-method", type=click.Choice(["minmax", "entropy", "percentile"]), default=None,
              help="--int8: calibrator [default: the one chosen by measurement, training.quantize.DEFAULT_METHOD].")
@click.option("--uav-dir", type=click.Path(exists=True, file_okay=False),
              help="--int8: uav-concrete photos (images/, masks/) for the test gate [default: beside the training "
                   "images' folder, when there].")
@click.option("--calibration-set", type=click.Choice(["training", "ozgenel"]), default="training", show_default=True,
              help="--int8: calibrate on the whole training split (Özgenel patches + uav-concrete training-photo "
                   "tiles when the model trained on them; gated on both hold-outs), or on the Özgenel patches "
                   "only (gated on their hold-out; the uav test photos still decide the CPU default).")
def export(model, out, int8, data_dir, split_file, calibration_method, uav_dir, calibration_set):
    """Export MODEL (.keras) to ONNX (outputs probabilities and features) and verify it against Keras;
    with --int8, also make and gate the INT8 model."""
    from shared.model_card import onnx_path

    if out and int8 and Path(out) != onnx_path(model):
        raise click.UsageError("--int8 writes beside MODEL: leave out --out")
    _quiet_tensorflow()
    from training.export import export_onnx
    from training.model import load_model

    out = out or str(onnx_path(model))
    diff = export_onnx(load_model(model), out)
    click.echo(f"wrote {out} (max |ONNX - Keras| probability difference {diff:.2e})")
    if int8:
        _export_int8(model, data_dir, split_file, calibration_method, uav_dir, calibration_set)


def _export_int8(model, data_dir, split_file, method, uav_dir, calibration_set="training") -> None:
    from training import quantize

    try:
        report = quantize.export_int8(model, data_dir, split_file, method or quantize.DEFAULT_METHOD,
                                      uav_dir=uav_dir, calibration_set=calibration_set)
    except quantize.GateFailed as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(2) from None
    except (FileNotFoundError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    g = report.holdout
    click.echo(f"wrote {report.path} (calibration: {report.calibration_images} training images, {report.method}; "
               f"gate on {g.n} held-out training images: accuracy {100 * g.accuracy_int8:.2f} % vs FP32 "
               f"{100 * g.accuracy_fp32:.2f} %, mean |dp| {g.mean_abs_diff:.4f}, p99 {g.p99_abs_diff:.4f})")
    for name, a in (report.extra_holdouts or {}).items():
        click.echo(f"  gate on {name} ({a.n} tiles of uav training photos): accuracy {100 * a.accuracy_int8:.2f} % vs "
                   f"FP32 {100 * a.accuracy_fp32:.2f} %, mean |dp| {a.mean_abs_diff:.4f}, p99 {a.p99_abs_diff:.4f}")
    for name, a in (report.test_gate or {}).items():
        click.echo(f"  test gate {name}: {'pass' if a.passed else 'FAIL'} (n {a.n}: accuracy {100 * a.accuracy_int8:.2f} % "
                   f"vs FP32 {100 * a.accuracy_fp32:.2f} %, mean |dp| {a.mean_abs_diff:.4f}, "
                   f"p99 {a.p99_abs_diff:.4f}, {a.label_flips} label flips)")
    click.echo("INT8 is the CPU workers' default" if report.cpu_default else
               "INT8 is NOT the CPU default (failed the test gate): CPU workers serve FP32 unless "
               "CRACKQ_PRECISION=int8")
    if report.domain:
        click.echo(f"wrote {report.domain['file']} (in-domain check on INT8 features: validation false alarms "
                   f"{report.domain['validation_false_alarm_rate']:.2%}, held-out test in domain "
                   f"{report.domain.get('test_in_domain_rate', float('nan')):.2%})")
