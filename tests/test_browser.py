"""The neighbour viewer in a real browser: headless Chromium (Debian's) against a real `serve`
on 127.0.0.1 over the session's small job. Skipped, with one line, only where no Chromium can
be installed (make test installs it with apt-get where it can)."""

import contextlib
import importlib.util
import shutil
import time
from pathlib import Path

import pytest

from pipeline.data.fashion_mnist import encode_image

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("viewer_screenshot",
                                               ROOT / "scripts" / "viewer_screenshot.py")
browser = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(browser)

pytestmark = pytest.mark.skipif(browser.browser_missing() is not None,
                                reason=str(browser.browser_missing()))


def test_viewer_in_chromium(finished_job, tmp_path):
    from selenium.webdriver.common.by import By

    spec, layout, _, (images, labels) = finished_job
    job = tmp_path / "job"
    shutil.copytree(layout.root, job)  # serve's process takes the store's LevelDB lock
    upload = tmp_path / "query.png"
    upload.write_bytes(encode_image(images[4], "png"))
    not_image = tmp_path / "notes.png"
    not_image.write_bytes(b"these are notes, not pixels")
    k = spec.evaluate.k
    with browser.running_server(job) as (url, _), \
            contextlib.closing(browser.open_browser()) as driver:
        driver.get(url)
        names = browser.wait_for(driver, lambda d: d.execute_script(
            "return state.viewer && state.viewer.class_names"), what="the server info")
        # upload: K neighbour thumbnails, every one loaded, and a class name as the prediction
        driver.find_element(By.ID, "file-input").send_keys(str(upload))
        browser.wait_for(driver, lambda d: browser.thumbnails_loaded(d, "#neighbours .thumb img") == k,
                         what=f"{k} neighbour thumbnails")
        assert driver.find_element(By.ID, "prediction").text in names
        assert driver.find_element(By.ID, "undefended").text.split(" (")[0] in names
        rows = driver.find_elements(By.CSS_SELECTOR, "#predictions tr")
        assert len(rows) == 1 + len(spec.features.layers)
        # a query image picked by key
        key = browser.pick_query(driver, 2)
        assert key in driver.find_element(By.ID, "query-caption").text
        # the attack at one budget: both predictions side by side
        browser.run_attack(driver, budget=0.5, steps=5)
        clean = driver.find_element(By.CSS_SELECTOR, ".prediction-clean").text
        adversarial = driver.find_element(By.CSS_SELECTOR, ".prediction-adv").text
        assert "defended" in clean and "defended" in adversarial
        assert "Δ" in driver.find_element(By.ID, "attack-adv-caption").text
        # a non-image: the server's 4xx message on the page within 5 s
        t = time.monotonic()
        driver.find_element(By.ID, "file-input").send_keys(str(not_image))
        error = browser.wait_for(driver, lambda d: d.find_element(By.ID, "error").is_displayed()
                                 and d.find_element(By.ID, "error").text, 5.0, "the error message")
        assert time.monotonic() - t < 5 and error.startswith("415") and "images[0]" in error
        shot = tmp_path / "viewer.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
