"""Adapting to a new survey, the loop docs/drone.md describes: `crackq tiles export` a sample of tiles,
label them into Positive/ and Negative/, fine-tune with `crackq train --init-model`, point a worker at
the new model."""

from __future__ import annotations

import csv
import json

import numpy as np
from PIL import Image

from benchmarks.common.imagery import PATCH, gps_exif, held_out_patches, layout, mosaic_photo
from benchmarks.common.service import crackq_cli
from shared.preprocessing import prepare_image, tile_grid


def _manifest(folder) -> list[dict]:
    with open(folder / "tiles.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_tiles_export_cuts_where_workers_cut_upright_and_seeded(concrete_dir, tmp_path):
    photo, _ = mosaic_photo(held_out_patches(concrete_dir), layout(4, 3, seed=41), seed=41)
    path = tmp_path / "turned.jpg"
    photo.transpose(Image.Transpose.ROTATE_90).save(path, quality=97, exif=gps_exif(orientation=6))
    everything = tmp_path / "all"
    crackq_cli("tiles", "export", str(path), "--out", str(everything))
    rows = _manifest(everything)
    assert [(int(r["x"]), int(r["y"])) for r in rows] == [(b.x, b.y) for b in tile_grid(*photo.size, PATCH)]
    first = np.asarray(Image.open(everything / rows[5]["file"]).convert("RGB"), np.int16)
    x, y = int(rows[5]["x"]), int(rows[5]["y"])
    expected = np.asarray(photo.crop((x, y, x + PATCH, y + PATCH)), np.int16)
    assert first.shape == (PATCH, PATCH, 3) and np.abs(first - expected).mean() < 3  # upright, full resolution
    runs = []
    for name in ("a", "b"):
        crackq_cli("tiles", "export", str(path), "--out", str(tmp_path / name), "--sample", "5", "--seed", "9")
        runs.append([r["file"] for r in _manifest(tmp_path / name)])
    assert len(runs[0]) == 5 and runs[0] == runs[1]
    missing = crackq_cli("tiles", "export", str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "c"), check=False)
    assert missing.returncode != 0 and "file not found" in missing.stderr


def test_survey_team_loop_export_label_finetune_serve(concrete_dir, shipped_model, start_worker, service_env,
                                                      tmp_path):
    held = held_out_patches(concrete_dir)
    grid = layout(8, 6, seed=31)
    photo, _ = mosaic_photo(held, grid, seed=31)
    survey = tmp_path / "survey"
    survey.mkdir()
    photo_path = survey / "site_0001.jpg"
    photo.save(photo_path, quality=95, exif=gps_exif(46.948, 7.4474, 540.0))

    # 1. export a sample of tiles
    tiles = tmp_path / "tiles"
    crackq_cli("tiles", "export", str(survey), "--out", str(tiles), "--sample", "40", "--seed", "1")
    rows = _manifest(tiles)
    assert len(rows) == 40 and all(r["photo"] == str(photo_path) for r in rows)

    # 2. "label" them: a person would look; here the mosaic's layout is the truth
    for cls in ("Positive", "Negative"):
        (tiles / cls).mkdir()
    for r in rows:
        crack = grid[int(r["y"]) // PATCH, int(r["x"]) // PATCH]
        (tiles / r["file"]).rename(tiles / ("Positive" if crack else "Negative") / r["file"])

    # 3. fine-tune the shipped model on them (one short epoch)
    new = tmp_path / "model"
    crackq_cli("train", str(tiles), "--init-model", str(shipped_model), "--epochs", "1", "--batch-size", "8",
               "--out", str(new), "--cache-dir", str(tmp_path / "cache"), timeout=900,
               env={"TF_CPP_MIN_LOG_LEVEL": "2"})
    card = json.loads((new / "model_card.json").read_text())
    from shared.model_card import file_sha256

    assert card["init_model"]["sha256"] == file_sha256(shipped_model)
    assert sum(card["data"]["counts"][s]["total"] for s in ("train", "val", "test")) == 40
    new_model = new / "crackq_mobilenetv2.keras"

    # 3b. describe the new training domain (crackq train may already have: refitting is harmless)
    from click.testing import CliRunner

    from training.domain_fit import domain_fit

    fitted = CliRunner().invoke(domain_fit, [str(new_model), str(tiles)], catch_exceptions=False)
    assert fitted.exit_code == 0, fitted.output
    assert json.loads((new / "model_card.json").read_text())["domain"]["file"] == "domain.npz"

    # 3c. the card's threshold is what workers apply when a job sets none (issue 11). To see it used, set it
    # between the two lowest probabilities above 0.5: the lowest crack tile(s) must then change label.
    from shared.onnx_model import OnnxModel

    expected = np.sort(OnnxModel.load(new_model).predict(prepare_image(str(photo_path)).inputs)[0])
    above = np.unique(expected[expected >= 0.5])
    card_threshold = float((above[0] + above[1]) / 2)
    card = json.loads((new / "model_card.json").read_text())
    assert 0.0 < card["threshold"]["value"] < 1.0 and "cross-validation" in card["threshold"]["chosen_on"]
    card["threshold"]["value"] = card_threshold
    (new / "model_card.json").write_text(json.dumps(card))

    # 4. point a worker at the new model and classify the survey
    start_worker(model=new_model, data_roots=[str(survey)])
    job = crackq_cli("submit", str(survey), "--per-tile", env=service_env).stdout.strip()
    crackq_cli("wait", job, "--timeout", "300", env=service_env)
    out = tmp_path / "results.jsonl"
    crackq_cli("results", job, "--per-tile", "--format", "jsonl", "--output", str(out), env=service_env)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    served = np.array([r["crack_probability"] for r in records if "tile" in r])
    assert len(served) == 48
    assert records[0]["in_domain"] is True and all(isinstance(r["in_domain"], bool) for r in records)

    from shared.config import Settings
    from shared.inference import load_classifier

    inputs = prepare_image(str(photo_path)).inputs  # what the worker decodes from the JPEG
    mine = load_classifier(Settings.load(model=str(new_model), batch_size=16)).predict(inputs)[0]
    shipped = load_classifier(Settings.load(model=str(shipped_model), batch_size=16)).predict(inputs)[0]
    tile_labels = [r["label"] for r in records if "tile" in r]
    assert tile_labels == ["crack" if p >= card_threshold else "no_crack" for p in served]
    assert tile_labels.count("crack") < int((served >= 0.5).sum())             # the card's threshold, not 0.5
    explicit = crackq_cli("submit", str(survey), "--per-tile", "--threshold", "0.5", env=service_env).stdout.strip()
    crackq_cli("wait", explicit, "--timeout", "300", env=service_env)
    crackq_cli("results", explicit, "--per-tile", "--format", "jsonl", "--output", str(out), env=service_env)
    again = [r for r in map(json.loads, out.read_text().splitlines()) if "tile" in r]
    assert [r["label"] for r in again] == ["crack" if p >= 0.5 else "no_crack" for p in served]  # a job's own wins
    assert np.abs(served - mine).max() < 1e-4                 # the worker serves the fine-tuned model ...
    assert np.abs(mine - shipped).max() > 1e-5                # ... which is not the shipped one
    assert np.mean((served >= 0.5) == grid.ravel()) >= 0.9
