"""Labelled image folders, the seeded train/val/test split, and batched decoding.

A labelled folder holds one sub-folder per class; the classes are the sorted
sub-folder names, so ``Negative``/``Positive`` gives *crack* (``Positive``)
class index 1.  The split is made per class from a seeded permutation and is
written to ``split.json`` with a sha256 of every file list: the test files are
then provably never trained on, and ``crackq evaluate --split test`` can score
exactly them later.  Every image is decoded by :func:`shared.preprocessing.load_input`,
the same code the workers use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from shared.preprocessing import IMAGE_EXTENSIONS, INPUT_SIZE, ImageError, load_input

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
DEFAULT_RATIOS = (70, 24, 6)


@dataclass(frozen=True)
class Labelled:
    """The image files of a labelled folder, as paths relative to ``root`` (POSIX separators)."""

    root: str
    classes: tuple[str, ...]
    files: tuple[str, ...]

    def labels(self, files=None) -> np.ndarray:
        return labels_of(self.classes, self.files if files is None else files)


def labels_of(classes, files) -> np.ndarray:
    """Class index of each relative path: its first folder, looked up in ``classes``."""
    index = {name: i for i, name in enumerate(classes)}
    try:
        return np.array([index[f.split("/", 1)[0]] for f in files], dtype=np.int64)
    except KeyError as exc:
        raise ValueError(f"file in unknown class folder {exc}; classes are {list(classes)}") from None


def list_labelled(root: str | os.PathLike) -> Labelled:
    """List ``root/<class>/**/<image>``; sorted so the listing never depends on the file system."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    classes = tuple(sorted(p.name for p in root_path.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if len(classes) < 2:
        raise ValueError(f"{root} must hold one sub-folder per class (found {list(classes)})")
    files = []
    for name in classes:
        for dirpath, dirnames, filenames in os.walk(root_path / name):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for fn in filenames:
                if not fn.startswith(".") and os.path.splitext(fn)[1].lower() in IMAGE_EXTENSIONS:
                    files.append(Path(dirpath, fn).relative_to(root_path).as_posix())
    return Labelled(str(root), classes, tuple(sorted(files)))


def parse_ratios(text: str) -> tuple[int, int, int]:
    """``"70:24:6"`` -> (70, 24, 6); any positive scale works (``"0.7:0.24:0.06"`` too)."""
    parts = [float(p) for p in text.split(":")]
    if len(parts) != 3 or any(p < 0 for p in parts) or parts[0] <= 0:
        raise ValueError(f"split must be train:val:test, e.g. 70:24:6 (got {text!r})")
    return tuple(int(p) if p.is_integer() else p for p in parts)  # type: ignore[return-value]


def list_sha256(files) -> str:
    """sha256 of a file list (one relative path per line, in split order)."""
    return hashlib.sha256("\n".join(files).encode("utf-8")).hexdigest()


@dataclass
class Split:
    """Which file of a labelled folder is in train, val and test; reproducible from ``seed``."""

    classes: tuple[str, ...]
    seed: int
    ratios: tuple[float, float, float]
    files: dict[str, list[str]]
    limit_per_class: int | None = None
    data_dir: str = ""
    skipped: list[dict] = field(default_factory=list)

    def labels(self, name: str) -> np.ndarray:
        return labels_of(self.classes, self.files[name])

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class, for the model card."""
        out = {}
        for name in SPLIT_NAMES:
            per_class = np.bincount(self.labels(name), minlength=len(self.classes))
            out[name] = {c: int(n) for c, n in zip(self.classes, per_class)} | {"total": len(self.files[name])}
        return out

    def hashes(self) -> dict[str, str]:
        return {name: list_sha256(self.files[name]) for name in SPLIT_NAMES}

    def drop(self, bad: list[dict]) -> None:
        """Remove unreadable images from every list (they are recorded in ``skipped``)."""
        bad_files = {b["file"] for b in bad}
        if not bad_files:
            return
        self.files = {k: [f for f in v if f not in bad_files] for k, v in self.files.items()}
        self.skipped.extend(b for b in bad if b["file"] not in {s["file"] for s in self.skipped})

    def to_json(self) -> dict:
        return {
            "data_dir": self.data_dir,
            "classes": list(self.classes),
            "seed": self.seed,
            "ratios": list(self.ratios),
            "limit_per_class": self.limit_per_class,
            "sha256": self.hashes(),
            "counts": self.counts(),
            "skipped": self.skipped,
            "files": self.files,
        }

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Split":
        """Read a ``split.json`` and check each list against its recorded sha256."""
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        split = cls(tuple(doc["classes"]), doc["seed"], tuple(doc["ratios"]),
                    {k: list(doc["files"][k]) for k in SPLIT_NAMES}, doc.get("limit_per_class"),
                    doc.get("data_dir", ""), doc.get("skipped", []))
        for name, digest in doc.get("sha256", {}).items():
            if list_sha256(split.files[name]) != digest:
                raise ValueError(f"{path}: the {name} file list does not match its recorded sha256")
        return split


def make_split(data: Labelled, seed: int, ratios=DEFAULT_RATIOS, limit_per_class: int | None = None) -> Split:
    """Stratified split: each class is permuted with ``seed``, optionally cut to ``limit_per_class``,
    then divided train:val:test by ``ratios`` (rounded; test takes the remainder).

    Cutting per class keeps the class balance the same in every split.
    """
    rng = np.random.default_rng(seed)
    total = float(sum(ratios))
    bounds = np.cumsum(ratios)[:2] / total
    labels = data.labels()
    files = np.array(data.files, dtype=object)
    out = {name: [] for name in SPLIT_NAMES}
    for k in range(len(data.classes)):
        members = files[labels == k][rng.permutation(int((labels == k).sum()))]
        if limit_per_class is not None:
            members = members[:limit_per_class]
        n_train, n_trainval = (int(round(b * len(members))) for b in bounds)
        out["train"] += list(members[:n_train])
        out["val"] += list(members[n_train:n_trainval])
        out["test"] += list(members[n_trainval:])
    return Split(data.classes, seed, tuple(ratios), {k: sorted(v) for k, v in out.items()},
                 limit_per_class, data.root)


def iter_batches(root: str | os.PathLike, files, batch_size: int, bad: list[dict],
                 size: int = INPUT_SIZE, threads: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(positions, images)``: uint8 N×size×size×3 batches of the readable ``files``.

    Unreadable images are appended to ``bad`` (``{"file", "reason"}``) and left
    out, so one corrupt file never stops a run.  The next batches are decoded in
    a background thread (Pillow releases the GIL) while the caller runs the
    model on this one; one thread keeps up with a 2-core CPU (~950 img/s)
    and more would only steal cores from TensorFlow.
    """
    def decode(chunk_start: int):
        positions, images = [], []
        for i in range(chunk_start, min(chunk_start + batch_size, len(files))):
            try:
                images.append(load_input(os.path.join(root, files[i]), size))
                positions.append(i)
            except (ImageError, OSError) as exc:
                bad.append({"file": files[i], "reason": str(exc)})
        return np.array(positions, dtype=np.int64), np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending = [pool.submit(decode, s) for s in range(0, len(files), batch_size)[:threads]]
        next_start = threads * batch_size
        while pending:
            result = pending.pop(0).result()
            if next_start < len(files):
                pending.append(pool.submit(decode, next_start))
                next_start += batch_size
            if len(result[0]):
                yield result


def warn_skipped(bad: list[dict]) -> None:
    """One warning that lists every skipped image with its reason."""
    if bad:
        lines = "\n".join(f"  {b['file']}: {b['reason']}" for b in bad)
        log.warning("skipped %d unreadable image(s):\n%s", len(bad), lines)
