"""Link one split of a ``split.json`` into a labelled folder (``OUT/<class>/<file>``), for benchmarks.

    python -m benchmarks.split_folder models/split.json test OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

from training.data import Split


def main() -> None:
    split_file, name, out = sys.argv[1:4]
    split = Split.load(split_file)
    root = Path(split.data_dir).resolve()
    for f in split.files[name]:
        target = Path(out) / f
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(root / f)
    print(f"linked {len(split.files[name])} {name} images of {split_file} into {out}")


if __name__ == "__main__":
    main()
