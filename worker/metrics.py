"""Prometheus metrics of a worker process (placeholder: real metrics added with monitoring)."""

from __future__ import annotations


def start(settings) -> None:
    return None


def observe_chunk(images: int, errors: int, seconds: float) -> None:
    return None
