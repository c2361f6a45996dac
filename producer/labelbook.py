"""The labels of ``crackq label``, on disk as they are given: ``DIR/Positive``, ``DIR/Negative``, ``DIR/labels.csv``.

Every decision is written before the page hears back, so closing the page
(or the terminal) loses nothing, and a later run reads ``labels.csv`` to skip
every tile already decided.  The folder is a labelled folder as
``crackq train``/``crackq adapt`` read it; ``labels.csv`` adds where each tile
came from (photo and pixel box), the model's probability, and when.  A skip is
a row too (label ``skip``, no file) so a skipped tile is not offered again.
Tiles are PNG (lossless) full-resolution crops of the EXIF-oriented photo.
"""

from __future__ import annotations

import csv
import hashlib
import os
import threading
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from shared.preprocessing import Box

CSV_NAME = "labels.csv"
FOLDERS = {"crack": "Positive", "no_crack": "Negative"}
LABELS = ("crack", "no_crack", "skip")


@dataclass
class Row:
    """One line of ``labels.csv``."""

    file: str
    label: str
    photo: str
    x: int
    y: int
    w: int
    h: int
    probability: str
    time: str

    @property
    def key(self) -> tuple:
        return (self.photo, int(self.x), int(self.y), int(self.w), int(self.h))


COLUMNS = [f.name for f in fields(Row)]


class LabelBook:
    """Append-only labels with undo of the last decision; safe to use from several request threads."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        for folder in FOLDERS.values():
            (self.out / folder).mkdir(exist_ok=True)
        self.csv = self.out / CSV_NAME
        self.lock = threading.Lock()
        self.rows = self._read()

    def _read(self) -> list[Row]:
        if not self.csv.exists():
            return []
        with open(self.csv, newline="", encoding="utf-8") as fh:
            return [Row(**{c: r.get(c, "") for c in COLUMNS}) for r in csv.DictReader(fh)]

    def decided(self) -> set:
        return {r.key for r in self.rows}

    def counts(self) -> dict[str, int]:
        out = {label: 0 for label in LABELS}
        for r in self.rows:
            out[r.label] = out.get(r.label, 0) + 1
        return out

    def add(self, photo: str, box: Box, label: str, probability: float | None, image: Image.Image | None) -> Row:
        """Save the tile (crack / no_crack) and append its row; ``image`` is the full photo."""
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, not {label!r}")
        with self.lock:
            name = ""
            if label != "skip":
                name = f"{FOLDERS[label]}/{self._name(photo, box)}"
                tile = image.crop((box.x, box.y, box.x + box.w, box.y + box.h))
                tile.save(self.out / name, format="PNG")
            row = Row(name, label, photo, box.x, box.y, box.w, box.h,
                      "" if probability is None else f"{probability:.6f}",
                      datetime.now(timezone.utc).isoformat(timespec="seconds"))
            self._append(row)
            self.rows.append(row)
            return row

    def undo(self) -> Row | None:
        """Forget the last decision: delete its tile file and its row."""
        with self.lock:
            if not self.rows:
                return None
            row = self.rows.pop()
            if row.file:
                (self.out / row.file).unlink(missing_ok=True)
            self._rewrite()
            return row

    def _name(self, photo: str, box: Box) -> str:
        """``<photo stem>_x<X>_y<Y>.png``; a hash of the photo path is added when another photo has the stem."""
        stem = Path(photo).stem
        clash = any(Path(r.photo).stem == stem and r.photo != photo for r in self.rows)
        if clash:
            stem = f"{stem}-{hashlib.sha1(photo.encode()).hexdigest()[:8]}"
        suffix = "" if box.w == box.h else f"_{box.w}x{box.h}"
        return f"{stem}_x{box.x}_y{box.y}{suffix}.png"

    def _append(self, row: Row) -> None:
        new = not self.csv.exists() or self.csv.stat().st_size == 0
        with open(self.csv, "a", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
            if new:
                writer.writeheader()
            writer.writerow(asdict(row))
            fh.flush()
            os.fsync(fh.fileno())

    def _rewrite(self) -> None:
        tmp = self.csv.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(asdict(r) for r in self.rows)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.csv)
