"""``crackq label SOURCE... --out DIR [--port P] [--budget N]``: label tiles of a survey in the browser.

SOURCE is photos / folders / globs, or the id of a finished job submitted with
``--per-tile`` (its probabilities are reused; its photos must be readable
here).  The tiles worth labelling first are picked by :mod:`shared.picking`
(uncertain and diverse by default), the page is served on 127.0.0.1 only
(:mod:`producer.label_app`) and the labels land in DIR as they are given
(:mod:`producer.labelbook`).  Running it again on the same DIR continues.
"""

from __future__ import annotations

import os
import re
import sys

import click

from producer.commands import InputError
from shared.picking import STRATEGIES

JOB_ID = re.compile(r"^[0-9a-f]{32}$")


@click.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Labelled folder to write (and continue).")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port on 127.0.0.1 (0: any free port).")
@click.option("--budget", type=click.IntRange(1), default=200, show_default=True,
              help="Tiles offered in this run (tiles labelled before are never offered again).")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="uncertain", show_default=True,
              help="uncertain: near the threshold, spread over photos and looks; random: a seeded sample.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --strategy random.")
@click.option("--no-recursive", is_flag=True, help="Do not search folders recursively.")
def label(sources, out, port, budget, strategy, seed, no_recursive):
    """Label tiles of SOURCE (photos, folders, or a finished --per-tile job id) on a local web page."""
    from producer.candidates import choose, from_job, from_photos
    from producer.label_app import LabelSession
    from producer.labelbook import LabelBook
    from shared.config import Settings
    from shared.onnx_model import OnnxModel

    from shared.connections import RedisUnavailable
    from shared.store import UnknownJob

    settings = Settings.load()
    try:
        cands, source = _candidates(sources, settings, no_recursive, from_job, from_photos)
        model = OnnxModel.load(settings.model)
    except (ValueError, FileNotFoundError, UnknownJob, RedisUnavailable) as exc:
        raise InputError(str(exc)) from None
    for path, reason in cands.failed.items():
        click.echo(f"skipped {path}: {reason}", err=True)
    if not cands.tiles:
        raise InputError("no tiles found in " + " ".join(sources))
    if not source.startswith("job"):
        cands.threshold = model.threshold(settings.threshold)
    book = LabelBook(out)
    click.echo(f"{len(cands.tiles)} tile(s) of {len({t.photo for t in cands.tiles})} photo(s); "
               f"picking {budget} ({strategy}) ...", err=True)
    picks = choose(cands, budget, strategy, model, settings, seed, exclude=book.decided())
    session = LabelSession(book, picks, cands.threshold, settings, source)
    serve(session, port)


def _candidates(sources, settings, no_recursive, from_job, from_photos):
    if len(sources) == 1 and JOB_ID.match(sources[0]) and not os.path.exists(sources[0]):
        return from_job(sources[0], settings), f"job {sources[0]}"
    from producer.commands import _find_images

    return from_photos(_find_images(sources, recursive=not no_recursive), settings), "photos"


def serve(session, port: int) -> None:
    """Serve the page on 127.0.0.1 until interrupted; every label is already on disk."""
    from werkzeug.serving import make_server

    from producer.label_app import create_app

    holder: dict = {}
    try:
        server = make_server("127.0.0.1", port, create_app(session, holder), threaded=True)
    except OSError as exc:
        raise InputError(f"cannot listen on 127.0.0.1:{port}: {exc}") from None
    holder["port"] = server.server_port
    click.echo(f"labelling page: http://127.0.0.1:{server.server_port}/  ({session.budget} tile(s) to decide; "
               f"keys c crack, n no crack, s skip, u undo; Ctrl-C to stop)", err=True)
    sys.stderr.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        counts = session.book.counts()
        click.echo(f"labels in {session.book.out}: {counts['crack']} crack, {counts['no_crack']} no crack, "
                   f"{counts['skip']} skipped", err=True)
