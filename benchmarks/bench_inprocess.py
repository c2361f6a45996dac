"""The in-process measurements: (a) the naive loop, (b) the worker code's ceiling, (c) the model alone.

(b) and (c) run in the same kind of processes the service runs (``P``
spawned processes with ``T`` inference threads each, the worker's own
``load_classifier`` + ``ChunkRunner``), fed the same chunks the producer
would queue, but with no queue, no Redis and no result records written: the
best the worker code can do on this machine with that configuration.  The
processes stay up between repetitions (loaded once, like a worker).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import numpy as np

from benchmarks.bench_setup import WorkerConfig, tree_cpu_seconds


class NaiveLoop:
    """(a) What a first script does: decode one image, ``model.predict`` it, repeat (Keras, defaults)."""

    def __init__(self, model_path: str, size: int):
        import keras

        self.size = size
        self.model = keras.models.load_model(model_path, compile=False)
        self.model.predict(np.zeros((1, size, size, 3), np.float32), verbose=0)

    def run(self, paths: list[str]) -> float:
        from shared.preprocessing import load_input

        start = time.perf_counter()
        for path in paths:
            x = load_input(path, self.size)[None].astype(np.float32)
            self.model.predict(x, verbose=0)
        return time.perf_counter() - start


def _serve(conn, config: WorkerConfig, data_roots: list[str]) -> None:
    """One ceiling process: load like a worker process does, then run what the parent asks."""
    from shared.contract import ChunkOptions
    from shared.domain import DomainScorer
    from shared.preprocessing import prepare_image
    from shared.inference import load_classifier
    from worker.pipeline import ChunkRunner

    settings = config.settings(data_roots)
    classifier = load_classifier(settings)
    runner = ChunkRunner(classifier, settings, f"bench:{os.getpid()}",
                         DomainScorer.load(classifier.info.directory, classifier.served.precision))
    options = ChunkOptions(threshold=settings.threshold, tile_size=settings.tile_size,
                           tile_overlap=settings.tile_overlap)
    decoded = np.zeros((0, classifier.info.input_size, classifier.info.input_size, 3), np.uint8)
    conn.send(("ready", os.getpid()))
    while True:
        command, payload = conn.recv()
        if command == "stop":
            break
        start = time.perf_counter()
        if command == "chunks":  # (b): the worker's decode + batched inference + records
            for chunk in payload:
                output = runner.run(chunk, options)
                bad = [r["error"] for r in output.records.values() if r.get("error")]
                if bad:
                    raise RuntimeError(f"ceiling run produced errors, e.g. {bad[0]}")
        elif command == "predecode":
            decoded = np.concatenate([prepare_image(p, size=classifier.info.input_size, tile=options.tile_size,
                                                    overlap=options.tile_overlap).inputs for p in payload])
        elif command == "model":  # (c): the model alone on already decoded inputs
            classifier.predict(decoded)
        conn.send(("done", time.perf_counter() - start))
    runner.close()


class CeilingPool:
    """``P`` processes, each holding one loaded classifier and ChunkRunner, driven from the parent."""

    def __init__(self, config: WorkerConfig, data_roots: list[str]):
        ctx = mp.get_context("spawn")
        self.config = config
        self.conns, self.procs = [], []
        for _ in range(config.processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child, config, data_roots), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        self.pids = [self._receive(c)[1] for c in self.conns]

    def _receive(self, conn, timeout: float = 300.0):
        if not conn.poll(timeout):
            raise RuntimeError("a ceiling process did not answer in time")
        return conn.recv()

    def _all(self, payloads: list) -> float:
        """Send each process its part at once; the wall time until the last one is done."""
        start = time.perf_counter()
        for conn, (command, payload) in zip(self.conns, payloads):
            conn.send((command, payload))
        for conn in self.conns:
            self._receive(conn, timeout=3600)
        return time.perf_counter() - start

    def predecode(self, paths: list[str]) -> None:
        self._all([("predecode", part) for part in _split(paths, len(self.conns))])

    def run_chunks(self, chunks: list[list[dict]]) -> float:
        """(b): chunks dealt round-robin, as a queue with one waiting chunk per process would."""
        parts = [chunks[i::len(self.conns)] for i in range(len(self.conns))]
        return self._all([("chunks", part) for part in parts])

    def run_model(self) -> float:
        return self._all([("model", None) for _ in self.conns])

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far by the ceiling processes."""
        return tree_cpu_seconds([proc.pid for proc in self.procs])

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("stop", None))
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=20)
            if proc.is_alive():
                proc.kill()


def _split(items: list, parts: int) -> list[list]:
    size = -(-len(items) // parts)
    return [items[i * size:(i + 1) * size] for i in range(parts)]
