"""The in-domain check: its file format and fitting (on made-up features), the shipped description, and
a real worker flagging unfamiliar images but not held-out concrete."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.domain import FILE_NAME, DomainScorer
from shared.serving import feature_layout
from training.domain_fit import balanced_sample, fit

DIM = feature_layout()[-1][2]


def _features(rng, n, shift=0.0, scale=1.0):
    """Made-up ``features``: positive "pooled" values and per-block statistics around fixed means."""
    base = np.abs(np.random.default_rng(0).normal(1.0, 0.5, DIM))
    return (base + shift + scale * rng.normal(0, 0.2, (n, DIM))).astype(np.float32)


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(1)
    return fit(_features(rng, 400), _features(rng, 300), backbone_fingerprint="abc")


def test_threshold_is_the_validation_99th_percentile(fitted):
    rng = np.random.default_rng(2)
    familiar = fitted.score(_features(rng, 2000), np.zeros(2000))[1].astype(bool)
    assert 0.97 <= familiar.mean() <= 1.0  # ~1 % false alarms on new draws of the same distribution
    assert fitted.raw_scores(_features(rng, 50)).mean() == pytest.approx(0.0, abs=0.5 * fitted.threshold)


@pytest.mark.parametrize("shift,scale", [(0.5, 1.0), (0.0, 3.0), (-0.3, 0.2)])
def test_shifted_or_rescaled_features_are_flagged(fitted, shift, scale):
    rng = np.random.default_rng(3)
    scores, familiar = fitted.score(_features(rng, 200, shift, scale), np.zeros(200))
    assert not familiar.astype(bool).any() and (scores > 1).all()


def test_a_single_unfamiliar_block_is_enough_to_flag(fitted):
    """Texture statistics off, pooled embedding normal: still flagged (what pooled features alone miss)."""
    rng = np.random.default_rng(4)
    x = _features(rng, 100)
    name, start, stop = feature_layout()[1]
    x[:, start:stop] += 1.0
    assert not fitted.score(x, np.zeros(100))[1].astype(bool).any()


def test_description_round_trips_through_its_file(fitted, tmp_path):
    (tmp_path / "model_card.json").write_text(json.dumps({"backbone": {"weights_fingerprint": "abc"}}))
    fitted.save(tmp_path / FILE_NAME)
    loaded = DomainScorer.load(tmp_path)
    x = _features(np.random.default_rng(5), 64)
    np.testing.assert_allclose(loaded.score(x, np.zeros(64))[0], fitted.score(x, np.zeros(64))[0], rtol=1e-4, atol=1e-4)
    assert (tmp_path / FILE_NAME).stat().st_size < 5_000_000


def test_no_description_or_one_for_another_backbone_means_no_check(fitted, tmp_path):
    assert DomainScorer.load(tmp_path) is None
    fitted.save(tmp_path / FILE_NAME)
    (tmp_path / "model_card.json").write_text(json.dumps({"backbone": {"weights_fingerprint": "other"}}))
    assert DomainScorer.load(tmp_path) is None


def test_features_of_another_width_give_unknown_not_a_crash(fitted):
    scores, familiar = fitted.score(np.zeros((3, 1280), np.float32), np.zeros(3))
    assert np.isnan(scores).all() and list(familiar) == [None, None, None]


def test_balanced_sample_takes_each_class_equally_and_is_seeded():
    files = [f"Negative/{i}.jpg" for i in range(50)] + [f"Positive/{i}.jpg" for i in range(10)]
    sample = balanced_sample(files, 20, seed=0)
    assert sum(f.startswith("Positive") for f in sample) == 10 == sum(f.startswith("Negative") for f in sample)
    assert sample == balanced_sample(files, 20, seed=0) != balanced_sample(files, 20, seed=1)


# ---- the shipped model ------------------------------------------------------------------------------
def test_shipped_model_has_a_documented_description(shipped_model):
    from shared.model_card import file_sha256

    card = json.loads(shipped_model.with_name("model_card.json").read_text())
    entry = card["domain"]
    path = shipped_model.with_name(entry["file"])
    assert entry["sha256"] == file_sha256(path) and path.stat().st_size < 5_000_000
    assert entry["validation_false_alarm_rate"] <= 0.02 and entry["test_in_domain_rate"] >= 0.97
    scorer = DomainScorer.load(shipped_model.parent)
    assert scorer is not None and scorer.threshold == pytest.approx(entry["threshold"], rel=1e-5)


def test_worker_flags_unfamiliar_images_but_not_held_out_concrete(survey_job):
    patches = [survey_job.photo(p) for p in survey_job.expected["patches"]]
    unfamiliar = [survey_job.photo(p) for p in survey_job.expected["unfamiliar"]]
    assert all(isinstance(r["in_domain"], bool) and isinstance(r["domain_score"], float)
               for r in patches + unfamiliar)
    assert sum(r["in_domain"] for r in patches) >= len(patches) - 2     # ~1 % false alarms
    assert not any(r["in_domain"] for r in unfamiliar)                   # noise, sky, brick
    assert max(r["domain_score"] for r in patches) < min(r["domain_score"] for r in unfamiliar)
    for path in survey_job.expected["photos"]:  # mosaics of concrete patches: familiar, tile by tile
        photo, tiles = survey_job.photo(path), survey_job.tiles(path)
        assert photo["in_domain"] is True
        assert np.mean([t["in_domain"] for t in tiles]) >= 0.9
