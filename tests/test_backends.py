"""The worker's inference: its two backends, its GPU code path on a machine without a GPU, and the
throughput mechanics around it (decode overlapping inference, one BLAS thread, the producer's polling).

``shared.inference.load_classifier`` with ``backend=tf`` (TensorFlow, the
reference) and ``backend=onnx`` (ONNX Runtime, the CPU default) must give
the same probabilities on real images; the GPU settings (``--device gpu``,
``plan()``, ``pin_gpu()``, TensorFlow memory growth) must work, falling back
to the CPU, so a GPU deployment does not run untested code.  A whole
``crackq worker --device gpu`` serving a job on this CPU-only machine is
``tests/test_deploy.py::test_gpu_worker_command_serves_a_job_here_without_a_gpu``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common.service import wait_until
from producer.api import poll_interval
from shared.config import Settings
from shared.contract import ChunkOptions, make_items
from shared.preprocessing import prepare_image
from worker.cli import plan
from shared.inference import ModelInfo, load_classifier
from worker.pipeline import ChunkRunner, limit_blas_threads
from worker.context import pin_gpu

PER_CLASS = 12


def real_images(concrete_dir: Path, per_class: int = PER_CLASS) -> tuple[list[str], np.ndarray]:
    """Paths (spread over each class folder) and their labels (True = crack)."""
    paths, labels = [], []
    for folder, crack in (("Negative", False), ("Positive", True)):
        names = sorted(os.listdir(concrete_dir / folder))
        step = max(1, len(names) // per_class)
        paths += [str(concrete_dir / folder / n) for n in names[::step][:per_class]]
        labels += [crack] * per_class
    return paths, np.array(labels)


@pytest.fixture(scope="module")
def images(concrete_dir):
    paths, labels = real_images(concrete_dir)
    return np.concatenate([prepare_image(p).inputs for p in paths]), labels


@pytest.fixture(scope="module")
def outputs(shipped_model, images):
    """(probabilities, features) of both backends on the same real images; batch 5 leaves a partial batch."""
    x, _ = images
    result = {}
    for backend in ("onnx", "tf"):
        classifier = load_classifier(Settings.load(model=str(shipped_model), backend=backend, batch_size=5,
                                                   threads=1))
        result[backend] = classifier.predict(x)
    return result


def test_tf_and_onnx_backends_agree_on_real_images(outputs, images):
    _, labels = images
    (p_onnx, f_onnx), (p_tf, f_tf) = outputs["onnx"], outputs["tf"]
    assert p_onnx.shape == p_tf.shape == (len(labels),)
    assert f_onnx.shape == f_tf.shape and f_tf.shape[0] == len(labels)
    assert np.max(np.abs(p_onnx - p_tf)) < 1e-4
    assert np.max(np.abs(f_onnx - f_tf)) < 1e-3 * max(1.0, float(np.abs(f_tf).max()))
    # Not a degenerate agreement (both constant): the shipped model separates the two classes.
    assert np.mean((p_onnx >= 0.5) == labels) >= 0.9


def test_batching_does_not_change_results(shipped_model, images, outputs):
    """Padding (tf) or not (onnx), any batch size gives each image the probability it gets alone."""
    x, _ = images
    for backend in ("onnx", "tf"):
        one_batch = load_classifier(Settings.load(model=str(shipped_model), backend=backend,
                                                  batch_size=len(x), threads=1)).predict(x)[0]
        assert np.max(np.abs(one_batch - outputs[backend][0])) < 1e-5
    single = load_classifier(Settings.load(model=str(shipped_model), backend="onnx", batch_size=5, threads=1))
    assert single.fixed_shape is False
    assert abs(float(single.predict(x[:1])[0][0]) - float(outputs["onnx"][0][0])) < 1e-5


def test_gpu_device_settings_run_on_a_cpu_only_machine(shipped_model, images, outputs):
    """--device gpu on CPU: TensorFlow (memory growth on, nothing hidden) and ONNX fall back to the CPU."""
    x, _ = images
    for backend in ("tf", "onnx"):
        gpu = load_classifier(Settings.load(model=str(shipped_model), backend=backend, device="gpu",
                                            batch_size=8, threads=1))
        assert np.max(np.abs(gpu.predict(x)[0] - outputs[backend][0])) < 1e-4


def test_tensorflow_gpu_configuration_turns_memory_growth_on(monkeypatch):
    """With GPUs present (listed here by hand: this machine has none), every GPU gets memory growth, so
    several worker processes can share one; a CPU worker hides them; a second configuration only warns."""
    import tensorflow as tf

    from shared.inference import configure_tensorflow

    gpus = ["GPU:0", "GPU:1"]
    growth, hidden = [], []
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", lambda gpu, on: growth.append((gpu, on)))
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda devices, kind=None: hidden.append((devices, kind)))

    configure_tensorflow(Settings.load(device="gpu", threads=0))
    assert growth == [("GPU:0", True), ("GPU:1", True)] and hidden == []
    configure_tensorflow(Settings.load(device="cpu", threads=0))
    assert hidden == [([], "GPU")]

    def too_late(*_args):
        raise RuntimeError("Intra op parallelism cannot be modified after initialization.")

    monkeypatch.setattr(tf.config.threading, "set_intra_op_parallelism_threads", too_late)
    assert configure_tensorflow(Settings.load(device="gpu", threads=3)) is tf


def test_plan_and_pin_gpu(monkeypatch):
    gpu = Settings.load(device="gpu", threads=0)
    processes, planned = plan(gpu, None, 3)
    assert processes == 3 and planned.gpu_count == 3
    assert plan(gpu, None, 0)[0] == 1  # no GPU found: one process, which then runs on the CPU
    assert plan(gpu, 2, 1)[0] == 2
    assert plan(gpu.replace(gpu_count=2), None, 3)[1].gpu_count == 2  # CRACKQ_GPU_COUNT wins over the count
    cpu = Settings.load(device="cpu", threads=0)
    processes, planned = plan(cpu, 2, 0)
    assert processes == 2 and planned.threads == max(1, (os.cpu_count() or 1) // 2)
    assert plan(Settings.load(device="cpu", threads=3), 2, 0) == (2, Settings.load(device="cpu", threads=3))

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert pin_gpu(5, 0) is None and "CUDA_VISIBLE_DEVICES" not in os.environ
    assert pin_gpu(5, 2) == "1" and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert pin_gpu(0, 2) == "0" and os.environ["CUDA_VISIBLE_DEVICES"] == "0"


class _ModelThatWaitsForDecoding:
    """Stands in for the model to observe the pipeline: each batch 'runs' until the NEXT batch is decoded.

    If decoding did not run ahead of inference by a whole batch, the wait would
    time out and the chunk would fail.
    """

    def __init__(self, info: ModelInfo, batch_size: int, decoded, total: int):
        self.info, self.batch_size, self.decoded, self.total = info, batch_size, decoded, total
        self.batches = 0

    def predict(self, images: np.ndarray):
        self.batches += 1
        want = min(self.total, (self.batches + 1) * self.batch_size)
        wait_until(lambda: self.decoded() >= want, 30, 0.01, f"{want} images decoded during batch {self.batches}")
        return np.full(len(images), 0.25, np.float32), np.zeros((len(images), 4), np.float32)


def test_next_batch_decodes_while_the_model_runs(shipped_model, concrete_dir):
    paths, _ = real_images(concrete_dir, per_class=12)
    batch = 8  # larger than the old fixed look-ahead of 2 x decode threads, which made decode and model take turns
    settings = Settings.load(model=str(shipped_model), batch_size=batch, decode_threads=2,
                             data_roots=str(concrete_dir))
    done = []
    model = _ModelThatWaitsForDecoding(ModelInfo.from_model_path(str(shipped_model)), batch, lambda: len(done),
                                       len(paths))
    runner = ChunkRunner(model, settings, "test")
    decode = runner._decode
    runner._decode = lambda item, options: (decode(item, options), done.append(1))[0]  # count finished ones
    try:
        output = runner.run(make_items(paths), ChunkOptions())
    finally:
        runner.close()
    assert model.batches == len(paths) // batch
    assert sorted(output.records) == list(range(len(paths)))
    assert not [r for r in output.records.values() if r.get("error")]


def test_a_worker_process_runs_blas_on_one_thread():
    """The in-domain check's small matrix products cost ~30x more CPU with OpenBLAS's thread per core."""
    from threadpoolctl import threadpool_info, threadpool_limits

    with threadpool_limits(limits=2, user_api="blas"):  # restores this test process's limit afterwards
        limit_blas_threads()
        blas = [p for p in threadpool_info() if p["user_api"] == "blas"]
        assert blas and all(p["num_threads"] == 1 for p in blas)


def test_waiting_polls_often_only_when_a_result_is_near():
    """A one-image job is seen within milliseconds; a long job is polled rarely until its end is near."""
    assert poll_interval(done=0, total=1, elapsed=0.0, longest=0.2) == 0.005
    assert poll_interval(done=0, total=1, elapsed=0.04, longest=0.2) == 0.01  # a quarter of the wait so far
    assert poll_interval(done=0, total=2000, elapsed=60.0, longest=0.2) == 0.2
    assert poll_interval(done=1000, total=2000, elapsed=3.0, longest=0.2) == 0.2  # ~3 s to go
    assert poll_interval(done=1990, total=2000, elapsed=6.0, longest=0.2) < 0.02  # ~30 ms to go


def test_gpu_defaults_come_from_one_place(monkeypatch):
    """``CRACKQ_DEVICE=gpu`` and ``--device gpu`` get the same defaults; explicit values win."""
    for key in ("CRACKQ_BACKEND", "CRACKQ_BATCH_SIZE", "CRACKQ_PRECISION", "CRACKQ_DEVICE"):
        monkeypatch.delenv(key, raising=False)
    by_flag = Settings.load(device="gpu")
    monkeypatch.setenv("CRACKQ_DEVICE", "gpu")
    by_env = Settings.load()
    assert (by_flag.backend, by_flag.batch_size) == (by_env.backend, by_env.batch_size) == ("tf", 128)
    assert Settings.load(precision="fp16").backend == "onnx"  # a precision means ONNX Runtime
    monkeypatch.setenv("CRACKQ_BATCH_SIZE", "32")
    assert Settings.load().batch_size == 32
    monkeypatch.setenv("CRACKQ_DEVICE", "cpu")
    assert (Settings.load().backend, Settings.load(batch_size=None).batch_size) == ("onnx", 32)
