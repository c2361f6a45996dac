"""Turn the user's PATH arguments into the list of images to classify.

Files named explicitly are always kept (a missing or non-image file then gets
a per-image error record, so every input has a result row); files found by
walking a folder or expanding a glob are kept only if their extension is an
image's.  Paths are made absolute, because workers on other machines read the
same paths; ``s3://`` URLs are listed in the object store and kept as URLs.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

from shared import storage
from shared.preprocessing import IMAGE_EXTENSIONS

_GLOB_CHARS = set("*?[")


@dataclass
class Discovery:
    paths: list[str] = field(default_factory=list)
    skipped: int = 0           # non-image files met while walking folders / globs
    unmatched: list[str] = field(default_factory=list)  # arguments that matched nothing


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def discover(arguments: list[str], recursive: bool = True) -> Discovery:
    found = Discovery()
    seen: set[str] = set()

    def keep(path: str) -> None:
        path = os.path.abspath(path)
        if path not in seen:
            seen.add(path)
            found.paths.append(path)

    for arg in arguments:
        if storage.is_remote(arg):  # issue 12: s3:// keys, prefixes and globs (shared/storage.py)
            _list_remote(arg, recursive, found, seen)
            continue
        arg = os.path.expanduser(arg)
        if os.path.isdir(arg):
            before = len(found.paths)
            _walk(arg, recursive, keep, found)
            if len(found.paths) == before:
                found.unmatched.append(arg)
        elif os.path.lexists(arg) or not (_GLOB_CHARS & set(arg)):
            keep(arg)  # explicit file (or missing file: it becomes an error record)
        else:
            matches = sorted(glob.glob(arg, recursive=True))
            files = [m for m in matches if os.path.isfile(m)]
            images = [m for m in files if is_image_name(m)]
            found.skipped += len(files) - len(images)
            for m in images:
                keep(m)
            if not images:
                found.unmatched.append(arg)
    return found


def _walk(folder: str, recursive: bool, keep, found: Discovery) -> None:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if is_image_name(name):
                keep(os.path.join(root, name))
            else:
                found.skipped += 1
        if not recursive:
            break


def _list_remote(url: str, recursive: bool, found: Discovery, seen: set[str]) -> None:
    """Objects of an ``s3://`` key, prefix or glob; a listing failure raises :class:`shared.storage.StorageError`."""
    try:
        images, skipped = storage.list_images(url, is_image_name, recursive=recursive)
    except storage.StorageError as exc:
        raise storage.StorageError(f"cannot list {url}: {exc}") from None
    found.skipped += skipped
    for image in images:
        if image not in seen:
            seen.add(image)
            found.paths.append(image)
    if not images:
        found.unmatched.append(url)
