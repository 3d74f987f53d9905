"""The msa-serve search page driven in a real browser (headless Chromium through Selenium)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from test_search_serve import DoubleSearcher, write_test_images

from msa.search.serve import SearchLimits, create_app

CHROMIUM_NAMES = ("chromium", "chromium-browser")
CHROMEDRIVER_NAMES = ("chromedriver",)


def find_program(names: tuple[str, ...]) -> str | None:
    for name in names:
        for candidate in (f"/usr/bin/{name}", shutil.which(name)):
            if candidate and Path(candidate).is_file():
                return candidate
    return None


CHROMIUM = find_program(CHROMIUM_NAMES)
CHROMEDRIVER = find_program(CHROMEDRIVER_NAMES)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)",
)


@contextlib.contextmanager
def running_server(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 in a thread; yields its base URL and always stops it."""
    # The socket is bound here (port 0: the kernel picks a free port) and handed to uvicorn, so no other process can
    # take the port between choosing and listening.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started or not thread.is_alive():
                break
            threading.Event().wait(0.05)
        assert server.started, "the server did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()
        assert not thread.is_alive(), "the server did not stop"


@contextlib.contextmanager
def headless_chromium(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--no-proxy-server",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    # An explicit driver path: Selenium then never looks for (or downloads) a driver itself.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()


def wait_for_results(driver, timeout: float = 60) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout)
    return wait.until(
        lambda d: d.execute_script(
            "const s = document.getElementById('results').dataset.state; return s === 'loading' ? null : s || null;"
        )
    )


def thumbnails_loaded(driver) -> list[int] | None:
    """naturalWidth of every result image once all have finished loading (None while some are still loading)."""
    return driver.execute_script(
        "const images = [...document.querySelectorAll('#results img')];"
        "return images.every((image) => image.complete) ? images.map((image) => image.naturalWidth) : null;"
    )


def search_in_page(driver, base_url: str, query: str, top_k: int, rerank: int) -> None:
    from selenium.webdriver.common.by import By

    driver.get(base_url + "/")
    box = driver.find_element(By.ID, "query")
    box.send_keys(query)
    for element_id, value in (("top-k", top_k), ("rerank", rerank)):
        field = driver.find_element(By.ID, element_id)
        field.clear()
        field.send_keys(str(value))
    driver.find_element(By.ID, "search-button").click()


@needs_chromium
def test_search_page_in_headless_chromium(tmp_path: Path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    root = tmp_path / "archive"
    paths = write_test_images(root)
    # A file name that is also markup: the page must show it as text.
    (root / paths[0]).rename(root / "<em>bold<em>.jpg")
    paths[0] = "<em>bold<em>.jpg"
    searcher = DoubleSearcher(root, paths)

    app = create_app(searcher, limits=SearchLimits(max_top_k=40, max_rerank=400))
    with running_server(app) as base_url, headless_chromium(tmp_path / "profile") as driver:
        search_in_page(driver, base_url, "many planes parked near a terminal", top_k=6, rerank=50)
        assert wait_for_results(driver) == "ready"
        cards = driver.find_elements(By.CSS_SELECTOR, "#results li.hit")
        assert len(cards) == 6
        assert searcher.calls[0] == ("search", ["many planes parked near a terminal"], 6, 50)
        widths = WebDriverWait(driver, 60).until(thumbnails_loaded)
        assert len(widths) == 6 and all(width > 0 for width in widths), widths

        expected = searcher.search(["many planes parked near a terminal"], 6, 50)[0]
        assert [int(card.get_attribute("data-row")) for card in cards] == [hit.row for hit in expected]
        assert [card.find_element(By.CSS_SELECTOR, ".path").text for card in cards] == [hit.path for hit in expected]
        assert cards[0].find_element(By.CSS_SELECTOR, ".score").text == f"{expected[0].score:.4f}"
        assert driver.find_elements(By.CSS_SELECTOR, "#results em") == []
        assert "6 of 8 images" in driver.find_element(By.ID, "status").text

        # Per-scale bars: hidden until hovered, kept open by a click.
        bars = cards[1].find_element(By.CSS_SELECTOR, ".scales")
        assert not bars.is_displayed()
        ActionChains(driver).move_to_element(cards[1]).perform()
        WebDriverWait(driver, 10).until(lambda d: bars.is_displayed())
        rows = bars.find_elements(By.CSS_SELECTOR, ".scale")
        assert len(rows) == searcher.num_scales
        # A bar is the sigmoid score itself: its share of the track.
        for row, value in zip(rows, expected[1].scale_scores):
            fill = row.find_element(By.CSS_SELECTOR, ".fill").size["width"]
            track = row.find_element(By.CSS_SELECTOR, ".track").size["width"]
            assert fill / track == pytest.approx(value, abs=0.02)
            assert row.find_element(By.CSS_SELECTOR, ".value").text == f"{value:.4f}"
        cards[2].click()
        ActionChains(driver).move_to_element(driver.find_element(By.TAG_NAME, "h1")).perform()
        WebDriverWait(driver, 10).until(lambda d: not bars.is_displayed())
        assert cards[2].find_element(By.CSS_SELECTOR, ".scales").is_displayed()

        driver.save_screenshot(str(tmp_path / "search_page.png"))
        assert (tmp_path / "search_page.png").stat().st_size > 10_000

        # The inputs take the server's limits.
        limits = ("top-k", "40"), ("rerank", "400")
        WebDriverWait(driver, 10).until(
            lambda d: all(d.find_element(By.ID, name).get_attribute("max") == value for name, value in limits)
        )

        # A bad request shows the server's message instead of a grid; the address of a search reruns it.
        driver.get(base_url + "/?q=farmland&k=500&rerank=0")
        assert wait_for_results(driver) == "error"
        assert driver.find_element(By.ID, "status").text.startswith("k must be an integer from 1 to 40")
        assert driver.find_elements(By.CSS_SELECTOR, "#results li") == []
        driver.get(base_url + "/?q=farmland&k=3&rerank=0")
        assert wait_for_results(driver) == "ready"
        assert len(driver.find_elements(By.CSS_SELECTOR, "#results li.hit")) == 3
        assert ("search", ["farmland"], 3, 0) in searcher.calls
        assert driver.find_elements(By.CSS_SELECTOR, "#results .scale") == []
