"""Helpers shared by the benchmarks and the tests (no test files, no pytest): real images built in code
(:mod:`.imagery`), a real Redis and real ``crackq worker`` processes (:mod:`.service`), a real S3 server
(:mod:`.s3server`) and the labelling page in headless Chromium (:mod:`.browser`)."""

from __future__ import annotations

from pathlib import Path

#: The repository root.
REPO = Path(__file__).resolve().parents[2]
#: ``shared/`` sits beside the repository (the data sets and backbone weights are never copied in).
SHARED = REPO.parent / "shared"
#: The labelled concrete data set (``Negative/``, ``Positive/``) and the drone photos with crack masks.
CONCRETE = SHARED / "data" / "concrete"
UAV = SHARED / "data" / "uav-concrete"
