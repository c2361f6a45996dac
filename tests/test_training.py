"""Training package: split, model structure, a short real run, the CLI, and the shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import Split, iter_batches, list_labelled, list_sha256, make_split

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models"


# ---- split ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def concrete(concrete_dir):
    return list_labelled(concrete_dir)


def test_listing_classes_and_positive_index(concrete):
    assert concrete.classes == ("Negative", "Positive")  # Positive (crack) is class index 1
    assert len(concrete.files) == 16000
    assert concrete.labels().sum() == 8000


def test_split_is_reproducible_disjoint_and_proportional(concrete):
    a, b = make_split(concrete, seed=7), make_split(concrete, seed=7)
    assert a.files == b.files and a.hashes() == b.hashes()
    assert make_split(concrete, seed=8).files["test"] != a.files["test"]
    sets = {k: set(v) for k, v in a.files.items()}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert sets["train"] | sets["val"] | sets["test"] == set(concrete.files)
    counts = a.counts()
    for name, per_class in (("train", 5600), ("val", 1920), ("test", 480)):
        assert counts[name] == {"Negative": per_class, "Positive": per_class, "total": 2 * per_class}


def test_split_limit_and_file_roundtrip(concrete, tmp_path):
    split = make_split(concrete, seed=1, ratios=(70, 24, 6), limit_per_class=50)
    assert {k: v["total"] for k, v in split.counts().items()} == {"train": 70, "val": 24, "test": 6}
    split.save(tmp_path / "split.json")
    loaded = Split.load(tmp_path / "split.json")
    assert loaded.files == split.files and loaded.classes == split.classes
    doc = json.loads((tmp_path / "split.json").read_text())
    assert doc["sha256"]["test"] == list_sha256(split.files["test"])
    doc["files"]["test"][0] = doc["files"]["train"][0]  # a tampered list no longer matches its hash
    (tmp_path / "split.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="sha256"):
        Split.load(tmp_path / "split.json")


def test_unreadable_images_are_skipped_and_reported(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 30), (i * 40, 90, 20)).save(tmp_path / cls / f"{i}.jpg")
    (tmp_path / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    data = list_labelled(tmp_path)
    bad: list[dict] = []
    batches = list(iter_batches(tmp_path, list(data.files), 4, bad))
    assert sum(len(p) for p, _ in batches) == 6
    assert all(images.shape[1:] == (160, 160, 3) and images.dtype == np.uint8 for _, images in batches)
    assert [b["file"] for b in bad] == ["b/broken.jpg"]


# ---- model structure -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def untrained():
    from training.model import build_model

    return build_model(weights=None)


def test_model_is_flat_frozen_with_named_layers(untrained):
    import keras

    m = untrained
    assert m.input_shape == (None, 160, 160, 3) and m.inputs[0].name == "image"
    assert m.output_shape == (None, 2)
    rescale = m.get_layer("rescale")
    assert isinstance(rescale, keras.layers.Rescaling)
    assert rescale.scale == pytest.approx(1 / 127.5) and rescale.offset == -1
    assert m.get_layer("block_16_project").name == "block_16_project"  # backbone layers are addressable
    assert m.get_layer("pooled").output.shape == (None, 1280)
    assert m.get_layer("probabilities").activation.__name__ == "softmax"
    assert {w.path.split("/")[0] for w in m.trainable_weights} == {"probabilities"}


def test_unfreeze_blocks_opens_top_blocks_but_keeps_batchnorm_frozen(untrained):
    import keras

    from training.model import set_trainable

    m = untrained
    set_trainable(m, 2)
    try:
        trainable = {layer.name for layer in m.layers if layer.trainable and layer.weights}
        assert {"block_16_expand", "block_16_project", "block_15_depthwise", "Conv_1", "probabilities"} <= trainable
        assert not any(n.startswith("block_14_") for n in trainable)
        assert not any(isinstance(m.get_layer(n), keras.layers.BatchNormalization) for n in trainable)
    finally:
        set_trainable(m, 0)
    assert {layer.name for layer in m.layers if layer.trainable and layer.weights} == {"probabilities"}
    with pytest.raises(ValueError):
        set_trainable(m, 17)


def test_serving_model_outputs(untrained):
    from shared.serving import serving_model
    from training.model import feature_model

    images = np.random.default_rng(0).uniform(0, 255, (2, 160, 160, 3)).astype(np.float32)
    out = serving_model(untrained).predict(images, verbose=0)
    assert out["probabilities"].shape == (2, 2)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1, rtol=1e-5)
    pooled = feature_model(untrained).predict(images, verbose=0)
    np.testing.assert_allclose(out["features"][:, :1280], pooled, rtol=1e-5, atol=1e-6)  # pooled values first


# ---- a short real training run -------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_run(concrete_dir, backbone_weights, tmp_path_factory):
    from training.train import TrainConfig, train

    out, cache = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("cache")
    cfg = TrainConfig(data_dir=str(concrete_dir), out=str(out), epochs=2, limit_per_class=100,
                      backbone_weights=str(backbone_weights), cache_dir=str(cache))
    return out, train(cfg)


def test_short_run_writes_every_output(small_run):
    out, card = small_run
    for name in ("crackq_mobilenetv2.keras", "crackq_mobilenetv2.onnx", "model_card.json", "split.json",
                 "plots/training_curves.png", "plots/confusion_matrix.png", "plots/test_predictions.png"):
        assert (out / name).stat().st_size > 0, name
    # Features are cached outside the output folder; the only array file is the in-domain description.
    assert [p.name for p in out.rglob("*.npz")] == ["domain.npz"]
    assert card["domain"]["threshold"] > 0 and card["files"]["domain"] == "domain.npz"
    assert card["name"] == "crackq-mobilenetv2" and card["version"] == "1"
    assert card["classes"] == ["Negative", "Positive"]
    assert card["backbone"]["weights"]["sha256"] == (
        "b5c304ecf01494f614fd05d36a075cb14f45d054af9af5ef17092bbf870e8e2f")
    assert "Not the pristine ImageNet" in card["backbone"]["weights"]["note"]
    assert card["data"]["counts"]["test"]["total"] == 12
    assert len(card["training"]["history"]["val_loss"]) == 2
    assert card["files"]["onnx_max_abs_diff_vs_keras"] < 1e-4


def test_short_run_beats_chance_on_held_out_images(small_run):
    _, card = small_run
    held_out = np.array(card["metrics"]["validation"]["confusion_matrix"]) + card["metrics"]["test"]["confusion_matrix"]
    assert np.trace(held_out) / held_out.sum() > 0.8


def test_evaluate_cli_json_on_recorded_test_split(small_run, concrete_dir):
    from click.testing import CliRunner

    from producer.cli import main

    out, card = small_run
    result = CliRunner().invoke(main, ["evaluate", str(out / "crackq_mobilenetv2.keras"), str(concrete_dir),
                                       "--split", "test", "--split-file", str(out / "split.json"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(doc) >= {"accuracy", "precision", "recall", "f1", "roc_auc", "ece", "confusion_matrix", "n"}
    assert doc["n"] == 12 and doc["confusion_matrix"] == card["metrics"]["test"]["confusion_matrix"]


def test_export_cli_writes_verified_onnx(small_run, tmp_path):
    from click.testing import CliRunner

    from producer.cli import main

    out, _ = small_run
    target = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["export", str(out / "crackq_mobilenetv2.keras"), "--out", str(target)])
    assert result.exit_code == 0, result.output
    assert target.stat().st_size > 1_000_000


def test_init_model_continues_from_trained_head(small_run, concrete_dir, tmp_path):
    from training.model import load_model
    from training.train import TrainConfig, train

    out, _ = small_run
    cfg = TrainConfig(data_dir=str(concrete_dir), out=str(tmp_path), epochs=1, limit_per_class=20, seed=3,
                      init_model=str(out / "crackq_mobilenetv2.keras"), cache_dir=str(tmp_path / "cache"))
    card = train(cfg)
    assert card["init_model"]["sha256"] and card["backbone"]["weights"]["sha256"].startswith("b5c304")
    before = load_model(out / "crackq_mobilenetv2.keras").get_layer("block_1_expand").get_weights()[0]
    after = load_model(tmp_path / "crackq_mobilenetv2.keras").get_layer("block_1_expand").get_weights()[0]
    np.testing.assert_array_equal(before, after)  # the backbone stays frozen
    assert card["metrics"]["validation"]["accuracy"] > 0.8  # it starts from a trained head


# ---- the shipped model ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    path = SHIPPED / "crackq_mobilenetv2.keras"
    if not path.exists():
        pytest.fail(f"{path} is missing: the shipped model must be committed")
    from training.model import load_model

    return load_model(path)


def test_shipped_model_on_its_recorded_test_split(shipped, concrete_dir):
    from training.evaluate import evaluate_folder

    split = Split.load(SHIPPED / "split.json")
    result = evaluate_folder(shipped, str(concrete_dir), split.files["test"], split.classes, 64)
    assert result["n"] == len(split.files["test"]) == 960
    assert result["accuracy"] >= 0.995


def test_shipped_onnx_matches_keras_on_real_images(shipped, concrete_dir):
    from shared.serving import serving_model
    from training.export import verify

    split = Split.load(SHIPPED / "split.json")
    files = split.files["test"][:16] + split.files["test"][-16:]
    images = np.concatenate([b for _, b in iter_batches(str(concrete_dir), files, 32, [])])
    assert len(images) == 32
    assert verify(serving_model(shipped), SHIPPED / "crackq_mobilenetv2.onnx", images) < 1e-4


def test_end_to_end_fit_updates_only_unfrozen_blocks(concrete_dir, backbone_weights, tmp_path):
    from training.model import build_model, load_model
    from training.train import TrainConfig, train

    cfg = TrainConfig(data_dir=str(concrete_dir), out=str(tmp_path), epochs=1, limit_per_class=10,
                      learning_rate=1e-5, unfreeze_blocks=1, augment=True, backbone_weights=str(backbone_weights),
                      cache_dir=str(tmp_path / "unused"))
    card = train(cfg)
    assert card["training"]["feature_extraction"]["mode"] == "end-to-end"
    before, after = build_model(str(backbone_weights)), load_model(tmp_path / "crackq_mobilenetv2.keras")
    changed = lambda name: not all(np.array_equal(a, b) for a, b in zip(before.get_layer(name).get_weights(),
                                                                         after.get_layer(name).get_weights()))
    assert changed("block_16_project") and changed("Conv_1")
    assert not changed("block_15_project") and not changed("block_16_project_BN") and not changed("Conv_1_bn")
