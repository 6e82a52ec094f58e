"""The review page in a real browser: Debian's Chromium, headless, driven by Selenium through the system chromedriver
(nothing is downloaded: Selenium Manager is never asked, since both paths are given). An expert judges three items
with the keyboard, reloads, and finds the progress kept; the JSONL then holds exactly those three judgements, and
the DICOM on the page is the recipe's window of the file, pixel for pixel. Screenshots go to the test's tmp_path."""
from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .review_fixtures import IDENTIFYING, review_session, windowed, write_review_run

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
                                reason="needs Debian's Chromium and its driver at /usr/bin/chromium and /usr/bin/chromedriver: "
                                       "apt-get install -y chromium chromium-driver (.ci/run installs them when it runs as root)")


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium; it is in the dev extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait_for_progress(driver, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 120).until(lambda d: d.find_element(By.ID, "progress-text").text == text,
                                     message=f"the page never showed progress {text!r}")


def _press(driver, *keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(*keys).perform()


def test_an_expert_judges_three_items_by_keyboard_and_a_reload_keeps_the_progress(tmp_path, tiny_llm_dir, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from mmdomain.review_app import create_app, serving_in_thread

    checkpoint, shards, slices = write_review_run(tmp_path, tiny_llm_dir, n=5)
    out = tmp_path / "judgements.jsonl"
    session = review_session(checkpoint, shards, out)
    try:
        with serving_in_thread(create_app(session)) as url:
            browser.get(url)
            _wait_for_progress(browser, "0 / 5")
            WebDriverWait(browser, 60).until(lambda d: d.execute_script(
                "const i = document.querySelector('#media img'); return i && i.complete && i.naturalWidth > 0"))
            browser.save_screenshot(str(tmp_path / "review-first-item.png"))

            # The DICOM on the page is the recipe's window (center 40, width 80) of the file's HU values, not a
            # min-max picture of its stored integers: the served PNG, as the browser loaded it, matches pixel for pixel.
            image = browser.find_element(By.CSS_SELECTOR, "#media img")
            assert browser.execute_script("return arguments[0].naturalWidth", image) == 64
            shown = np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(image.get_attribute("src")).read())))
            assert shown.shape == (64, 64) and np.array_equal(shown, windowed(slices[0]))
            assert not np.array_equal(shown, np.round((slices[0] - slices[0].min()) / np.ptp(slices[0]) * 255))
            answers = [browser.find_element(By.CSS_SELECTOR, f"#answer-{n} .text").text for n in (1, 2)]

            _press(browser, "1")  # item 1: answer 1 is better
            _wait_for_progress(browser, "1 / 5")
            # item 2: Shift+2 edits answer 2 into the preferred one, Ctrl+Enter saves it
            ActionChains(browser).key_down(Keys.SHIFT).send_keys("2").key_up(Keys.SHIFT).perform()
            area = WebDriverWait(browser, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, "#answer-2 textarea"))
            assert browser.switch_to.active_element == area
            area.clear()
            area.send_keys("lower right")
            browser.save_screenshot(str(tmp_path / "review-editing.png"))
            ActionChains(browser).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()
            _wait_for_progress(browser, "2 / 5")
            _press(browser, "f")  # item 3: flagged
            _wait_for_progress(browser, "3 / 5")
            _press(browser, "s")  # item 4 skipped: nothing written
            WebDriverWait(browser, 60).until(lambda d: "1 skipped" in d.find_element(By.ID, "meta").text)

            browser.refresh()
            _wait_for_progress(browser, "3 / 5")
            WebDriverWait(browser, 60).until(lambda d: d.execute_script(
                "const i = document.querySelector('#media img'); return i && i.complete && i.naturalWidth > 0"))
            browser.save_screenshot(str(tmp_path / "review-after-reload.png"))
            page = browser.page_source
    finally:
        session.close()

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3
    assert [line["key"] for line in lines] == [f"heldout-000000.tar:ct{i}" for i in range(3)]
    assert [line["decision"] for line in lines] == ["1", "2", "flag"]
    first, edited, flagged = lines
    assert (first["chosen"], first["rejected"]) == (answers[0], answers[1]) and first["prompt"] == "<image> where is the finding ?"
    assert edited["chosen"] == "lower right" and edited["chosen_source"] == "edited" and edited["rejected"] == edited["answers"][0]
    assert flagged["flagged"] is True and "chosen" not in flagged and "rejected" not in flagged
    assert all(line["judge"] == "tester" and line["judged_at"].endswith("Z") for line in lines)
    for line in lines:  # each line's media sit beside the JSONL, named as the line says
        assert [(out.parent / "judgements.media" / name).is_file() for name in line["media"]] == [True]
    assert not any(secret.decode() in page for secret in IDENTIFYING)
    assert (tmp_path / "review-after-reload.png").stat().st_size > 1000
