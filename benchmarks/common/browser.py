"""`crackq label` as a user starts it, and Debian's headless Chromium driven through Selenium, for
tests/test_label.py and benchmarks/label_screenshots.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.common import REPO
from benchmarks.common.service import wait_until
from producer.embedded import stop_group

CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run")


def chromium_binaries() -> tuple[str | None, str | None]:
    """``chromium`` and ``chromedriver`` on PATH (None where missing)."""
    return shutil.which("chromium"), shutil.which("chromedriver")


def headless_chromium(profile: Path, window_size: str = "1280,900"):
    """A Selenium driver of a headless Chromium with the empty profile ``profile``; ``quit()`` it after use."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chrome, driver_bin = chromium_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for flag in (*CHROME_FLAGS, f"--user-data-dir={profile}", f"--window-size={window_size}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver_bin))


class LabelServer:
    """`crackq label` as a user starts it, in its own process group."""

    def __init__(self, args, log_path, env):
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "label", *args], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True, cwd=str(REPO),
                                     env={**os.environ, **env})
        self.url = wait_until(self._url, 240, 0.2, "the labelling page to listen")

    def _url(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"crackq label exited {self.proc.returncode}:\n{self.log_path.read_text()}")
        found = re.findall(r"labelling page: (http://127\.0\.0\.1:\d+/)", self.log_path.read_text())
        return found[-1] if found else None

    def stop(self):
        stop_group(self.proc, grace=20)
        self.log.close()
