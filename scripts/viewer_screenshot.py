"""Drive the neighbour viewer in headless Chromium: `python scripts/viewer_screenshot.py JOB_DIR
OUT.png` serves JOB_DIR on 127.0.0.1, picks a query image, runs the attack and saves a
screenshot of the page (docs/viewer.png comes from the demo job). tests/test_browser.py uses
the same helpers.

The browser is Debian's (`apt-get install chromium chromium-driver`), passed to Selenium
explicitly: Selenium Manager would otherwise try to download one."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = os.environ.get("KNN_DEFENSE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("KNN_DEFENSE_CHROMEDRIVER", "/usr/bin/chromedriver")


def browser_missing() -> str | None:
    """Why no browser test can run here (None: it can)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"no {path}: apt-get install chromium chromium-driver (make test does)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[dev]'"
    return None


def open_browser(width: int = 1440, height: int = 1100):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(job_dir: str | os.PathLike, timeout_s: float = 120.0):
    """`knn-defense serve` on 127.0.0.1 with a fresh token, stopped on exit; yields the page's
    URL (token included) and the token."""
    token = secrets.token_urlsafe(24)
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "token"
        token_file.write_text(token)
        log = open(Path(tmp) / "serve.log", "wb")
        server = subprocess.Popen(
            [sys.executable, "-c", "from pipeline.cli import main; main()", "serve", "--job",
             str(job_dir), "--host", "127.0.0.1", "--port", str(port), "--token-file",
             str(token_file)], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        log.flush()
                        raise RuntimeError("serve did not start: "
                                           + (Path(tmp) / "serve.log").read_text()[-2000:]) from None
                    time.sleep(0.3)
            yield f"http://127.0.0.1:{port}/?token={token}", token
        finally:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()


def wait_for(driver, condition, timeout_s: float = 30.0, what: str = "the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(
        lambda d: condition(d), message=f"timed out waiting for {what}")


def thumbnails_loaded(driver, selector: str) -> int:
    """How many thumbnails under ``selector`` have finished loading (0 while any is pending)."""
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll(arguments[0])];"
        "return imgs.every(i => i.complete && i.naturalWidth > 0) ? imgs.length : 0;", selector)


def pick_query(driver, index: int = 0) -> str:
    from selenium.webdriver.common.by import By

    buttons = wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#query-list button"),
                       what="the query list")
    key = buttons[index].get_attribute("data-key")
    buttons[index].click()
    wait_for(driver, lambda d: key in d.find_element(By.ID, "query-caption").text,
             what=f"query {key}")
    wait_for(driver, lambda d: thumbnails_loaded(d, "#neighbours .thumb img"),
             what="the neighbour thumbnails")
    return key


def run_attack(driver, budget: float, steps: int, method: str = "pgd", timeout_s: float = 120):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "attack-method")).select_by_value(method)
    for name, value in (("attack-budget", budget), ("attack-steps", steps)):
        field = driver.find_element(By.ID, name)
        field.clear()
        field.send_keys(str(value))
    driver.find_element(By.ID, "attack-button").click()
    wait_for(driver, lambda d: d.find_element(By.ID, "attack-result").is_displayed()
             and thumbnails_loaded(d, "#attack-result .thumb img"), timeout_s, "the attack")


def main(job_dir: str, out: str) -> None:
    with running_server(job_dir) as (url, _), contextlib.closing(open_browser()) as driver:
        driver.get(url)
        pick_query(driver, 3)
        run_attack(driver, budget=0.1, steps=20, method="pgd")
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1440, min(max(height + 40, 900), 2400))
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        driver.save_screenshot(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/viewer_screenshot.py JOB_DIR OUT.png")
    main(sys.argv[1], sys.argv[2])
