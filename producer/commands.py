"""Producer commands: submit, status, wait, results, cancel, run, settings, dead-letters.

Exit codes: 0 success; 1 the job ended failed or cancelled; 2 bad input
(nothing found, unknown job, unreachable Redis, wrong password); 3 ``wait``
timed out; 130 interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import click

from producer.api import Client
from producer.discover import discover
from producer.formats import FORMATS, MAP_FORMATS, PER_TILE_COLUMNS, format_for, open_results_file, write
from shared.config import Settings, describe
from shared.connections import RedisUnavailable, mask_url
from shared.contract import MIN_TILE_SIZE, RESULT_COLUMNS, check_threshold, check_tiling
from shared.storage import StorageError
from shared.store import UnknownJob


class InputError(click.ClickException):
    """Bad input detected before anything is queued: exit code 2."""

    exit_code = 2


def redis_option(f):
    return click.option("--redis-url", default=None, envvar="CRACKQ_REDIS_URL", show_envvar=True,
                        help="Broker and job store URL (default redis://localhost:6379/0).")(f)


def _client(redis_url: str | None, **overrides) -> Client:
    try:
        return Client.from_settings(redis_url=redis_url, **overrides)
    except RedisUnavailable as exc:
        raise InputError(str(exc)) from None
    except ValueError as exc:
        raise InputError(f"bad setting: {exc}") from None


@contextlib.contextmanager
def _job_errors():
    try:
        yield
    except UnknownJob as exc:
        raise InputError(str(exc)) from None
    except RedisUnavailable as exc:
        raise InputError(str(exc)) from None


def _find_images(paths, recursive: bool) -> list[str]:
    try:
        found = discover(list(paths), recursive=recursive)
    except StorageError as exc:  # issue 12: an s3:// listing failed (endpoint, credentials, bucket)
        raise InputError(str(exc)) from None
    for arg in found.unmatched:
        click.echo(f"warning: no images found in {arg}", err=True)
    if found.skipped:
        click.echo(f"skipped {found.skipped} non-image file(s)", err=True)
    if not found.paths:
        raise InputError("no images found in " + " ".join(paths))
    return found.paths


def _checked(check):
    """A click callback running a check of :mod:`shared.contract` on one option: exit 2 with its reason."""
    def callback(ctx, param, value):
        if value is not None:
            try:
                check(value)
            except ValueError as exc:
                raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
        return value
    return callback


def tiling_options(f):
    f = click.option("--threshold", type=float, default=None, callback=_checked(check_threshold),
                     help="Crack probability threshold, 0 to 1 (default 0.5).")(f)
    f = click.option("--tile-size", type=int, default=None, callback=_checked(lambda v: check_tiling(v, 0)),
                     help=f"Tile size in px for large images (0: no tiling; else at least {MIN_TILE_SIZE}).")(f)
    f = click.option("--tile-overlap", type=int, default=None,
                     callback=_checked(lambda v: check_tiling(MIN_TILE_SIZE + max(0, v), v)),
                     help="Overlap between tiles in px (0 up to the tile size, excluded).")(f)
    f = click.option("--per-tile", is_flag=True, help="Also store one record per tile (pixel box, probability).")(f)
    f = click.option("--scales", default=None, callback=_scales_option, metavar="1,2",
                     help="Tiling scales of large photos: 1 = tiles of the tile size, 2 = of half of it "
                          "[default: setting scales].")(f)
    return f


def _scales_option(ctx, param, value):
    if value is None:
        return None
    from shared.config import parse_scales

    try:
        return parse_scales(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--chunk-size", type=int, default=None, help="Images per task (default 64).")
@click.option("--no-recursive", is_flag=True, help="Do not search folders recursively.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of the bare job id.")
@tiling_options
@redis_option
def submit(paths, chunk_size, no_recursive, as_json, threshold, tile_size, tile_overlap, per_tile, scales,
           redis_url):
    """Queue images (files, folders, glob patterns) as one job; print its id."""
    images = _find_images(paths, recursive=not no_recursive)
    client = _client(redis_url, threshold=threshold, tile_size=tile_size, tile_overlap=tile_overlap, scales=scales)
    options = _options(client, per_tile=per_tile or None)
    created = []

    def announce(job_id: str, chunks: int) -> None:  # the id first, on stderr: stdout stays the bare id
        created.append(job_id)
        click.echo(f"job {job_id}: queueing {len(images)} image(s) in {chunks} chunk(s)", err=True)

    try:
        job_id = client.submit(images, options, chunk_size=chunk_size, on_created=announce)
    except KeyboardInterrupt:
        if created:
            click.echo(f"interrupted: job {created[0]} removed (its queued chunks are dropped)", err=True)
        sys.exit(130)
    if as_json:
        click.echo(json.dumps({"job_id": job_id, "images": len(images), "options": options.to_dict(),
                               "redis": mask_url(client.settings.effective_redis_url)}))
    else:
        click.echo(job_id)


def _options(client: Client, **changes):
    try:
        return client.options(**changes)
    except ValueError as exc:
        raise InputError(f"bad option: {exc}") from None


@click.command()
@click.argument("job")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@redis_option
def status(job, as_json, redis_url):
    """Show a job's progress (chunks of lost workers are put back on the queue first)."""
    with _job_errors():
        st = _client(redis_url).status(job, recover=True)
    if as_json:
        click.echo(json.dumps(st.to_dict()))
    else:
        click.echo(f"{st.id}  {st.state}  {st.done}/{st.total} done  {st.failed} error(s)")


@click.command()
@click.argument("job")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds (exit 3).")
@redis_option
def wait(job, timeout, redis_url):
    """Wait for a job to finish (progress bar on a terminal); exit 0 when done."""
    client = _client(redis_url)
    with _job_errors():
        st = _wait_with_progress(client, job, timeout)
    _finish_message(st)


def _wait_with_progress(client: Client, job: str, timeout: float | None):
    client.status(job)  # unknown job: error before any progress bar
    if not sys.stderr.isatty():
        try:
            return client.wait(job, timeout=timeout)
        except TimeoutError as exc:
            click.echo(str(exc), err=True)
            sys.exit(3)
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[rate]} img/s"), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn())
    start = time.monotonic()
    with Progress(*columns, console=_stderr_console(), transient=False) as progress:
        bar = progress.add_task("classifying", total=None, rate="-")

        def show(st):
            rate = st.done / max(time.monotonic() - start, 1e-6)
            progress.update(bar, total=st.total, completed=st.done, rate=f"{rate:.0f}")

        try:
            return client.wait(job, timeout=timeout, on_progress=show)
        except TimeoutError as exc:
            progress.stop()
            click.echo(str(exc), err=True)
            sys.exit(3)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _finish_message(st) -> None:
    if st.state == "done":
        click.echo(f"job {st.id} done: {st.total} image(s), {st.failed} error(s)", err=True)
        return
    click.echo(f"job {st.id} {st.state}: {st.done}/{st.total} image(s) have results", err=True)
    sys.exit(1)


@click.command()
@click.argument("job")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="csv (default), jsonl, geojson (photos with GPS, crack tiles of GeoTIFFs in WGS84) or "
                   "gpkg (GeoPackage in the raster's CRS; needs --output).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write to this file instead of stdout.")
@click.option("--per-tile", is_flag=True, help="Add the per-tile records after each photo's record.")
@click.option("--overlays", type=click.Path(file_okay=False), default=None,
              help="Also write a crack map per photo into this folder (needs a job submitted with --per-tile).")
@redis_option
def results(job, fmt, output, per_tile, overlays, redis_url):
    """Write a job's results (readable while it is still running)."""
    client = _client(redis_url)
    fmt = format_for(output, fmt)
    if fmt == "gpkg" and not output:
        raise InputError("--format gpkg writes a file: give --output FILE.gpkg")
    on_map = fmt in MAP_FORMATS  # issue 12: map formats need the tile polygons of georeferenced rasters
    with _job_errors():
        client.status(job)
        records = client.results(job, per_tile=per_tile or bool(overlays) or on_map)
        if overlays:
            records = list(records)
        keep_tiles = per_tile or on_map or not overlays
        n = _write_results(records if keep_tiles else [r for r in records if "tile" not in r],
                           fmt, output, per_tile)
        if overlays:
            _write_overlays(records, overlays, client.store.options(job).get("threshold", 0.5))
    if output:
        click.echo(f"wrote {n} record(s) to {output}", err=True)


def _write_overlays(records: list[dict], folder: str, threshold: float) -> None:
    from producer.overlays import write_overlays

    if not any("tile" in r for r in records):
        click.echo("no tile records: crack maps need a job submitted with --per-tile", err=True)
    maps = write_overlays(records, folder, threshold=threshold)
    click.echo(f"wrote {len(maps)} crack map(s) to {folder}", err=True)


def _write_results(records, fmt: str, output: str | None, per_tile: bool) -> int:
    columns = PER_TILE_COLUMNS if per_tile else RESULT_COLUMNS
    if fmt == "gpkg":  # issue 12
        from producer.mapping import write_gpkg

        return write_gpkg(records, _fresh(output), all_tiles=per_tile)
    if output:
        with open_results_file(output) as fh:
            return write(records, fh, fmt, columns, all_tiles=per_tile)
    # File names that are not UTF-8 are written as their original bytes (docs/reliability.md).
    sys.stdout.reconfigure(errors="surrogateescape")
    return write(records, sys.stdout, fmt, columns, all_tiles=per_tile)


def _fresh(path: str) -> str:
    """A GeoPackage is a database: an old file would keep its layers, so it is replaced."""
    if os.path.exists(path):
        os.remove(path)
    return path


@click.command()
@click.argument("job")
@redis_option
def cancel(job, redis_url):
    """Cancel a job: workers drop its remaining chunks."""
    with _job_errors():
        st = _client(redis_url).cancel(job)
    click.echo(f"job {st.id} {st.state}: {st.done}/{st.total} image(s) have results", err=True)


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Results file (CSV by default).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None, help="Format of --out.")
@click.option("--workers", type=int, default=None,
              help="Local worker processes (default: one per CPU core; without CRACKQ_REDIS_URL only).")
@click.option("--chunk-size", type=int, default=None, help="Images per task.")
@click.option("--no-recursive", is_flag=True, help="Do not search folders recursively.")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@click.option("--overlays", type=click.Path(file_okay=False), default=None,
              help="Write a crack map (downsized photo, crack tiles shaded) per photo into this folder.")
@tiling_options
@redis_option
def run(paths, out, fmt, workers, chunk_size, no_recursive, timeout, overlays, threshold, tile_size, tile_overlap,
        per_tile, scales, redis_url):
    """Classify images end to end: private Redis + local workers unless CRACKQ_REDIS_URL is set."""
    from producer.runner import run_job

    images = _find_images(paths, recursive=not no_recursive)
    try:
        settings = Settings.load(redis_url=redis_url, threshold=threshold, tile_size=tile_size,
                                 tile_overlap=tile_overlap, chunk_size=chunk_size, scales=scales)
    except ValueError as exc:
        raise InputError(f"bad setting: {exc}") from None
    try:
        summary = run_job(images, settings, out=out, fmt=format_for(out, fmt), workers=workers,
                          per_tile=per_tile, timeout=timeout, overlays=overlays, progress=_wait_with_progress,
                          on_created=lambda job_id, chunks: click.echo(
                              f"job {job_id}: queueing {len(images)} image(s) in {chunks} chunk(s)", err=True))
    except RedisUnavailable as exc:
        raise InputError(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("interrupted: stopped the local workers and Redis", err=True)
        sys.exit(130)
    _print_summary(summary)
    if summary["state"] != "done":
        sys.exit(1)


def _print_summary(summary: dict) -> None:
    labels = summary["labels"]
    click.echo(f"{summary['images']} image(s) in {summary['seconds']:.1f}s "
               f"({summary['images_per_second']:.1f} img/s): {labels.get('crack', 0)} crack, "
               f"{labels.get('no_crack', 0)} no crack, {summary['errors']} error(s); "
               f"results in {summary['out']}")
    for reason, count in summary["error_reasons"].most_common(5):
        click.echo(f"  {count} x {reason}")
    if summary.get("out_of_domain"):
        click.echo(f"  {summary['out_of_domain']} image(s) look unlike the model's training imagery "
                   "(in_domain=false): treat their labels with caution")


@click.command(name="settings")
def settings():
    """List every setting, its environment variable and default."""
    for env, default, help_text in describe():
        click.echo(f"{env}={default}\n    {help_text}")
    if os.environ.get("CRACKQ_REDIS_URL"):
        click.echo(f"\ncurrent CRACKQ_REDIS_URL: {mask_url(os.environ['CRACKQ_REDIS_URL'])}")


@click.command(name="dead-letters")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Newest entries to show.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--clear", is_flag=True, help="Remove every dead letter after showing them.")
@redis_option
def dead_letters(limit, as_json, clear, redis_url):
    """Show messages workers refused (not JSON, malformed, not a crackq task), newest first."""
    with _job_errors():
        client = _client(redis_url)
        letters = client.store.dead_letters(limit)
        for letter in letters:
            if as_json:
                click.echo(json.dumps(letter))
            else:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(letter.get("at", 0)))
                click.echo(f"{when}Z  {letter.get('queue', '')}  {letter.get('reason', '')}\n"
                           f"    {str(letter.get('message', ''))[:300]}")
        if clear:
            click.echo(f"removed {client.store.clear_dead_letters()} dead letter(s)", err=True)
        elif not letters:
            click.echo("no dead letters", err=True)
