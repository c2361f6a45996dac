"""Long measurements of crackq (not part of the tests), each run from the repository root as
``python -m benchmarks.NAME``; what they share with the tests lives in :mod:`benchmarks.common`."""
