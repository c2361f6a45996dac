"""Screenshots of the `crackq label` page for docs/drone.md (docs/img/label-*.png).

    python -m benchmarks.label_screenshots [--photos ../shared/data/uav-concrete/images] [--n 8]

Starts `crackq label` on a few drone photos in a temporary folder, drives Debian's headless Chromium
through Selenium as tests/test_label.py does (both with :mod:`benchmarks.common.browser`), and saves
the page: the first tile, the page after two labels, and the end-of-run page.  The labels written go to a temporary folder and are thrown away.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO, UAV


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", default=str(UAV / "images"))
    ap.add_argument("--n", type=int, default=8, help="Photos to label from.")
    ap.add_argument("--out", default=str(REPO / "docs" / "img"))
    args = ap.parse_args(argv)

    from selenium.webdriver.common.action_chains import ActionChains

    from benchmarks.common.browser import LabelServer, headless_chromium
    from benchmarks.common.service import wait_until

    work = Path(tempfile.mkdtemp(prefix="crackq-label-shots-"))
    photos = work / "survey"
    photos.mkdir()
    for p in sorted(Path(args.photos).glob("*.jpg"))[: args.n]:
        shutil.copy(p, photos / p.name)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server = LabelServer([str(photos), "--out", str(work / "labels"), "--budget", "3"], work / "label.log", {})
    driver = headless_chromium(work / "profile", "1240,760")
    try:
        driver.get(server.url)
        wait_until(lambda: driver.execute_script("return document.body.dataset.tile"), 30, 0.1, "a tile")
        wait_until(lambda: driver.execute_script(
            "return document.getElementById('context').complete && document.getElementById('tile').complete"),
            30, 0.1, "the images")
        driver.save_screenshot(str(out / "label-page.png"))
        for key in ("c", "n", "s"):
            before = driver.execute_script("return document.body.dataset.tile")
            ActionChains(driver).send_keys(key).perform()
            wait_until(lambda: driver.execute_script("return document.body.dataset.tile") != before, 30, 0.1, key)
        driver.save_screenshot(str(out / "label-done.png"))
    finally:
        driver.quit()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out / 'label-page.png'} and {out / 'label-done.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
