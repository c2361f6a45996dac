"""Quiet TensorFlow before it is imported, for every training command.

Its own module so that ``training.cli`` and ``training.adapt_cli`` can both use
it without importing each other (``crackq train --init-model`` runs the adapt
recipe, so ``training.cli`` imports ``training.adapt_cli``; the reverse edge
would be an import cycle).
"""

from __future__ import annotations

import logging
import os


def quiet_tensorflow() -> None:
    """Before TF is imported: no C++ info logs, readable warnings through rich."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
    for noisy in ("tensorflow", "tf2onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
