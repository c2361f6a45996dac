"""``crackq adapt NEW_DIR --out DIR [--init-model MODEL]``: fine-tune on a few hundred labels of a new survey.

``crackq train NEW_DIR --init-model MODEL`` runs the same recipe (see
:mod:`training.adapt`); ``crackq train ... --recipe full`` keeps the old
full-recipe fine-tune.  TensorFlow is imported only when the model is written.
"""

from __future__ import annotations

import click

from training.adapt import AdaptConfig

D = AdaptConfig.__dataclass_fields__


def adapt_options(f):
    """Options shared by ``crackq adapt`` and the ``--init-model`` path of ``crackq train``."""
    f = click.option("--replay-dir", type=click.Path(file_okay=False), default=None,
                     help="The init model's original labelled folder, for replay [default: its card's data.dir, "
                          "e.g. ../shared/data/concrete].")(f)
    f = click.option("--replay-split", type=click.Path(dir_okay=False), default=None,
                     help="split.json of the init model's training [default: beside the init model].")(f)
    f = click.option("--replay-size", type=click.IntRange(0), default=D["replay_size"].default, show_default=True,
                     help="Original training images mixed in so nothing is forgotten (0: none).")(f)
    f = click.option("--folds", type=click.IntRange(2), default=D["folds"].default, show_default=True,
                     help="Cross-validation folds (grouped by source photo when there are enough photos).")(f)
    f = click.option("--unfreeze-blocks", type=click.Choice(["0", "1", "2", "3", "auto"]),
                     default=D["unfreeze_blocks"].default, show_default=True,
                     help="Also fine-tune the top N backbone blocks; auto: try 2, keep only if cross-validation "
                          "measures it better.")(f)
    return f


@click.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder of the adapted model.")
@click.option("--init-model", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Model to adapt [default: setting model, the shipped one].")
@adapt_options
@click.option("--head-features", type=click.Choice(["multi", "pooled"]), default="multi", show_default=True,
              help="What the new head reads: multi = pooled features + spatial means of block_13/block_10 "
                   "(measured better, docs/drone.md); pooled = the pooled features only.")
@click.option("--keep-init/--no-keep-init", default=D["keep_init"].default, show_default=True,
              help="Ship the init model unchanged when the adapted head does not measure better on the new labels.")
@click.option("--seed", type=int, default=D["seed"].default, show_default=True)
def adapt(data_dir, out, init_model, replay_dir, replay_split, replay_size, folds, unfreeze_blocks, head_features,
          keep_init, seed):
    """Adapt the model to NEW_DIR (Positive/ and Negative/ tiles, e.g. from `crackq label`)."""
    from shared.config import Settings

    cfg = AdaptConfig(data_dir=data_dir, out=out, init_model=init_model or Settings.load().model,
                      replay_dir=replay_dir, replay_split=replay_split, replay_size=replay_size, folds=folds,
                      unfreeze_blocks=unfreeze_blocks, seed=seed,
                      head_layers=D["head_layers"].default if head_features == "multi" else (), keep_init=keep_init)
    run_adapt(cfg)


def run_adapt(cfg: AdaptConfig) -> dict:
    """Run :func:`training.adapt.adapt` with readable logs and a summary; bad input exits 2."""
    from training.tf_quiet import quiet_tensorflow

    quiet_tensorflow()
    from training.adapt import adapt as run

    try:
        card = run(cfg, progress=lambda msg: click.echo(msg, err=True))
    except (ValueError, FileNotFoundError) as exc:
        raise click.UsageError(str(exc)) from None
    m = card["metrics"]
    cv, kept = m["new_imagery_cv"], m["replay_test"]
    click.echo(f"new imagery ({cv['n']} tiles, {cv['folds']}-fold CV"
               f"{' by photo' if cv['grouped_by_photo'] else ''}): balanced accuracy {cv['balanced_accuracy']:.3f} "
               f"(init model {cv['init_model_balanced_accuracy']:.3f}); threshold {card['threshold']['value']:.3f}")
    if kept:
        click.echo(f"original test split ({kept['images']} images): accuracy {kept['accuracy']:.4f}")
    click.echo(f"adapted in {card['adaptation']['seconds']} s; model in {cfg.out} "
               f"(serve it: CRACKQ_MODEL={cfg.out}/crackq_mobilenetv2.keras crackq worker)")
    return card
