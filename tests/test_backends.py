"""The worker's two inference backends, and its GPU code path run on a machine without a GPU.

``worker.inference.load_classifier`` with ``backend=tf`` (TensorFlow, the
reference) and ``backend=onnx`` (ONNX Runtime, the CPU default) must give
the same probabilities on real images; the GPU settings (``--device gpu``,
``plan()``, ``pin_gpu()``, TensorFlow memory growth) must work, falling back
to the CPU, so a GPU deployment does not run untested code.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from producer.api import Client
from shared.config import Settings
from shared.preprocessing import prepare_image
from worker.cli import plan
from worker.inference import load_classifier
from worker.state import pin_gpu

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


def test_gpu_device_settings_run_on_a_cpu_only_machine(shipped_model, images, outputs, monkeypatch):
    """--device gpu on CPU: TensorFlow (memory growth on, nothing hidden) and ONNX fall back to the CPU."""
    x, _ = images
    for backend in ("tf", "onnx"):
        gpu = load_classifier(Settings.load(model=str(shipped_model), backend=backend, device="gpu",
                                            batch_size=8, threads=1))
        assert np.max(np.abs(gpu.predict(x)[0] - outputs[backend][0])) < 1e-4


def test_plan_and_pin_gpu(monkeypatch):
    gpu = Settings.load(device="gpu", threads=0)
    assert plan(gpu, None, 3) == (3, {"CRACKQ_GPU_COUNT": "3"})
    assert plan(gpu, None, 0)[0] == 1  # no GPU found: one process, which then runs on the CPU
    assert plan(gpu, 2, 1)[0] == 2
    cpu = Settings.load(device="cpu", threads=0)
    processes, env = plan(cpu, 2, 0)
    assert processes == 2 and env["CRACKQ_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert plan(Settings.load(device="cpu", threads=3), 2, 0) == (2, {})

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert pin_gpu(5, 0) is None and "CUDA_VISIBLE_DEVICES" not in os.environ
    assert pin_gpu(5, 2) == "1" and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert pin_gpu(0, 2) == "0" and os.environ["CUDA_VISIBLE_DEVICES"] == "0"


def test_gpu_worker_on_cpu_classifies_with_tensorflow(concrete_dir, service_env, start_worker):
    """A real `crackq worker --device gpu` on this CPU-only machine: TF backend, batch 128, right labels."""
    paths, labels = real_images(concrete_dir, per_class=4)
    worker = start_worker(concurrency=1, data_roots=[str(concrete_dir)], args=["--device", "gpu"])
    assert "(tf backend, batch 128)" in worker.log()
    client = Client.from_settings()
    job_id = client.submit(paths, chunk_size=8)
    status = client.wait(job_id, timeout=240)
    records = list(client.results(job_id))
    assert status.state == "done" and len(records) == len(paths)
    assert not [r for r in records if r.get("error")]
    predicted = np.array([r["label"] == "crack" for r in records])
    assert np.mean(predicted == labels) >= 0.75
