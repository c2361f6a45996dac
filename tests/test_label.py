"""`crackq label` in a real headless Chromium (Debian's chromium + chromium-driver, through Selenium):
keys c / n / s / u write and undo labels on disk, a restart continues where the first run stopped,
and the page listens on 127.0.0.1 only and refuses POSTs without its token."""

from __future__ import annotations

import csv
import json
import os
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from benchmarks.common.browser import LabelServer, chromium_binaries, headless_chromium
from benchmarks.common.imagery import PATCH, held_out_patches, layout, mosaic_photo
from benchmarks.common.service import wait_until
from shared.preprocessing import load_rgb
from tests.conftest import unavailable


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium with an empty profile; fails under CI when Chromium is missing."""
    if not all(chromium_binaries()):
        unavailable("chromium and chromium-driver are needed (apt-get install -y chromium chromium-driver)")
    driver = headless_chromium(tmp_path_factory.mktemp("chrome-profile"), "1280,900")
    yield driver
    driver.quit()


def _rows(out) -> list[dict]:
    with open(out / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _current(driver) -> str:
    return driver.execute_script("return document.body.dataset.tile || ''")


def _press(driver, key: str, before: str | None) -> str:
    """Press ``key`` on the page; wait until the request finished and the page shows another tile."""
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()
    wait_until(lambda: driver.execute_script("return !document.body.dataset.busy") and _current(driver) != before,
               30, 0.05, f"the page to answer key {key!r}")
    return _current(driver)


def _truth(driver, grid) -> str:
    """The key a careful labeller presses for the tile on screen (the mosaic's layout is the truth)."""
    tile = driver.execute_script("return state.tile")
    return "c" if grid[tile["y"] // PATCH, tile["x"] // PATCH] else "n"


def test_label_page_keys_write_undo_and_resume(browser, concrete_dir, tmp_path):
    grid = layout(4, 3, seed=5)
    photo, _ = mosaic_photo(held_out_patches(concrete_dir), grid, seed=5)
    survey = tmp_path / "survey"
    survey.mkdir()
    photo_path = survey / "wall_01.jpg"
    photo.save(photo_path, quality=95)
    out = tmp_path / "labels"
    env = {"CRACKQ_THREADS": "1"}
    server = LabelServer([str(survey), "--out", str(out), "--budget", "5"], tmp_path / "label-1.log", env)
    try:
        _check_local_only(server)
        browser.get(server.url)
        wait_until(lambda: _current(browser), 30, 0.1, "the first tile")
        assert browser.find_element("id", "budget").text == "5"
        shown_p = float(browser.find_element("id", "p").text)
        browser.save_screenshot(str(tmp_path / "page.png"))
        assert Image.open(tmp_path / "page.png").format == "PNG"

        first = _current(browser)
        keys = [_truth(browser, grid)]
        after_first = _press(browser, keys[0], first)
        keys.append(_truth(browser, grid))
        _press(browser, keys[1], after_first)
        third = _current(browser)
        _press(browser, "s", third)
        assert [r["label"] for r in _rows(out)] == [{"c": "crack", "n": "no_crack"}[k] for k in keys] + ["skip"]
        assert browser.find_element("id", "n-skip").text == "1"
        assert _press(browser, "u", None) == third                 # undo brings the skipped tile back
        assert len(_rows(out)) == 2 and browser.find_element("id", "n-skip").text == "0"
        assert browser.find_element("id", "pos").text == "3"
    finally:
        server.stop()

    rows = _rows(out)
    truth_img = load_rgb(str(photo_path))
    for row, key in zip(rows, keys):
        assert row["photo"] == str(photo_path) and row["file"].startswith("Positive/" if key == "c" else "Negative/")
        x, y, w, h = (int(row[k]) for k in ("x", "y", "w", "h"))
        assert (w, h) == (PATCH, PATCH)
        saved = np.asarray(Image.open(out / row["file"]))
        assert Image.open(out / row["file"]).format == "PNG"
        assert np.array_equal(saved, np.asarray(truth_img.crop((x, y, x + w, y + h))))  # lossless, upright
        assert 0.0 <= float(row["probability"]) <= 1.0 and row["time"]
    assert abs(float(rows[0]["probability"]) - shown_p) < 1e-3
    assert sorted(p.name for p in (out / "Positive").iterdir()) + sorted(p.name for p in (out / "Negative").iterdir()) \
        == sorted(os.path.basename(r["file"]) for r in rows if r["file"].startswith("Positive")) + \
        sorted(os.path.basename(r["file"]) for r in rows if r["file"].startswith("Negative"))

    # A second run on the same folder continues: nothing labelled is offered again; undo reaches back.
    server = LabelServer([str(survey), "--out", str(out), "--budget", "5"], tmp_path / "label-2.log", env)
    try:
        browser.get(server.url)
        wait_until(lambda: _current(browser), 30, 0.1, "the first tile of the second run")
        state = browser.execute_script("return state")
        labelled = {(int(r["x"]), int(r["y"])) for r in rows}
        assert (state["tile"]["x"], state["tile"]["y"]) not in labelled
        assert state["counts"]["crack"] + state["counts"]["no_crack"] == 2
        assert browser.find_element("id", "n-crack").text == str(state["counts"]["crack"])
        _press(browser, _truth(browser, grid), _current(browser))
        assert len(_rows(out)) == 3
        newest = _rows(out)[-1]
        _press(browser, "u", None)
        assert len(_rows(out)) == 2 and not (out / newest["file"]).exists()
        _press(browser, "u", None)                                 # a decision of the first run
        assert [r["file"] for r in _rows(out)] == [rows[0]["file"]] and not (out / rows[1]["file"]).exists()
    finally:
        server.stop()


def _check_local_only(server: LabelServer) -> None:
    import psutil

    listening = [c.laddr for p in [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(True)]
                 for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening)
    forged = urllib.request.Request(server.url + "api/label", data=json.dumps({"label": "crack"}).encode(),
                                    headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(forged, timeout=10)
    assert refused.value.code == 403
