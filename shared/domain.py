"""Placeholder: the in-domain (familiar imagery) check. Replaced by the real detector."""

from __future__ import annotations

from pathlib import Path


class DomainScorer:
    @classmethod
    def load(cls, model_dir: Path) -> "DomainScorer | None":
        return None
