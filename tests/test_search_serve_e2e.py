"""msa-serve end to end: a real index (msa-tiny) of real images when the shared rs_mini set is present, of synthetic
images otherwise, served by the msa-serve command in a child process, queried over HTTP and in a browser."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from test_search_serve import write_test_images
from test_search_serve_browser import (
    headless_chromium,
    needs_chromium,
    search_in_page,
    thumbnails_loaded,
    wait_for_results,
)

from msa.search import Searcher, build_index, serve

pytestmark = pytest.mark.slow

MODEL = "msa-tiny"
STARTUP_SECONDS = 180
# The server is on this machine: a proxy configured in the environment must not be asked for it.
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def find_rs_mini() -> Path | None:
    """The shared rs_mini folder, looked for next to every folder above this checkout."""
    for folder in Path(__file__).resolve().parents:
        candidate = folder / "shared" / "data" / "rs_mini"
        if candidate.is_dir():
            return candidate
    return None


def copy_rs_mini(rs_mini: Path, images: Path) -> list[str]:
    """Every rs_mini image under ``images/<dataset>/``; returns one real caption per dataset, for queries."""
    captions = []
    for dataset in sorted(path for path in rs_mini.iterdir() if (path / "images").is_dir()):
        shutil.copytree(dataset / "images", images / dataset.name)
        records = json.loads((dataset / "dataset.json").read_text())["images"]
        captions.append(records[0]["sentences"][0]["raw"])
    return captions


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> dict:
    """A built index: {"images", "index", "queries", "real"}."""
    root = tmp_path_factory.mktemp("serve_archive")
    images = root / "images"
    rs_mini = find_rs_mini()
    if rs_mini is not None:
        queries = copy_rs_mini(rs_mini, images)
    else:
        write_test_images(images)
        queries = ["many planes are parked next to a long building in an airport", "a river runs through farmland"]
    report = build_index(MODEL, images, root / "index")
    assert report.indexed > 0 and not report.skipped
    return {"images": images, "index": root / "index", "queries": queries, "num_images": report.indexed}


@contextlib.contextmanager
def msa_serve(*flags: str) -> Iterator[str]:
    """Run the msa-serve command on a free port of 127.0.0.1; yields its base URL and always stops it."""
    command = [sys.executable, "-m", "msa.search.serve", "--port", "0", *flags]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=environment)
    log: list[str] = []
    # msa-serve names the port it got (--port 0: a free one) in its start-up line, on stderr.
    reader = threading.Thread(target=lambda: log.extend(iter(process.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        url = None
        while url is None and time.monotonic() < deadline and process.poll() is None:
            found = re.search(r"search page on (http://127\.0\.0\.1:\d+)/", "".join(log))
            url = found.group(1) if found else None
            time.sleep(0.1)
        assert url is not None, f"msa-serve did not start (exit {process.poll()}):\n{''.join(log)}"
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=10)


def get(url: str) -> tuple[int, str, bytes]:
    """Status, content type and body of a GET (error statuses included)."""
    try:
        with NO_PROXY.open(url, timeout=120) as response:
            return response.status, response.headers["content-type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["content-type"], error.read()


@pytest.fixture(scope="module")
def served(archive) -> Iterator[str]:
    """The msa-serve command serving the archive's index; yields its base URL."""
    with msa_serve("--index", str(archive["index"])) as url:
        yield url


def test_msa_serve_on_a_real_index(archive, served):
    searcher = Searcher(archive["index"])
    query = archive["queries"][0]
    expected = searcher.search([query], top_k=5, rerank=20)[0]
    url = served
    status, kind, body = get(f"{url}/healthz")
    assert status == 200 and json.loads(body)["num_images"] == searcher.num_images

    params = urllib.parse.urlencode({"q": query, "k": 5, "rerank": 20})
    status, kind, body = get(f"{url}/api/search?{params}")
    assert status == 200 and kind == "application/json"
    hits = json.loads(body)["hits"]
    # The same answer as the library's own Searcher on the same index.
    assert [hit["row"] for hit in hits] == [hit.row for hit in expected]
    assert [hit["path"] for hit in hits] == [hit.path for hit in expected]
    assert [hit["score"] for hit in hits] == pytest.approx([hit.score for hit in expected], rel=1e-5)
    assert all(len(hit["scale_scores"]) == searcher.num_scales for hit in hits)
    scores = [hit["score"] for hit in hits]
    assert scores == sorted(scores, reverse=True)

    for row in range(searcher.num_images):
        status, kind, body = get(f"{url}/thumbnail/{row}")
        assert status == 200 and kind == "image/jpeg", searcher.image_path(row)
        assert max(Image.open(io.BytesIO(body)).size) <= 256
    status, kind, body = get(f"{url}/thumbnail/{searcher.num_images}")
    assert status == 404 and kind == "application/json"

    outside = archive["images"].parent / "outside.txt"
    outside.write_text("outside the index")
    for attempt in ("/thumbnail/..%2Foutside.txt", "/static/..%2F..%2F..%2Foutside.txt", "/outside.txt"):
        status, kind, body = get(url + attempt)
        assert status == 404 and b"outside the index" not in body, attempt

    for params, name in (({"q": " "}, "q"), ({"q": query, "k": 0}, "k"), ({"q": query, "rerank": -1}, "rerank")):
        status, kind, body = get(f"{url}/api/search?{urllib.parse.urlencode(params)}")
        assert status == 400 and json.loads(body)["error"].startswith(name)


def test_msa_serve_refuses_a_missing_foreign_or_mismatched_index(archive, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(serve, "_serve", lambda *args: pytest.fail("must not serve"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not an index")
    cases = [
        (["--index", str(tmp_path / "missing")], "missing"),
        (["--index", str(foreign)], "foreign"),
        (["--index", str(archive["index"]), "--model", "msa-tiny-proj"], "another model"),
        (["--index", str(archive["index"]), "--model", str(tmp_path / "no-such-model")], "no model"),
    ]
    for flags, case in cases:
        assert serve.main([*flags, "--port", "0"]) == 2, case
        error = capsys.readouterr().err
        lines = error.strip().splitlines()
        named = "--model" if case == "no model" else "--index"
        flag = flags[flags.index(named) + 1]
        assert len(lines) == 1 and lines[0].startswith(f"msa-serve: error: {named} {flag}: "), (case, error)


@needs_chromium
def test_search_page_on_a_real_index(archive, served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    query = archive["queries"][-1]
    url = served
    with headless_chromium(tmp_path / "profile") as driver:
        search_in_page(driver, url, query, top_k=10, rerank=40)
        assert wait_for_results(driver) == "ready"
        shown = min(10, archive["num_images"])
        assert len(driver.find_elements(By.CSS_SELECTOR, "#results li.hit")) == shown
        widths = WebDriverWait(driver, 120).until(thumbnails_loaded)
        assert len(widths) == shown and all(width > 0 for width in widths), widths
        driver.find_elements(By.CSS_SELECTOR, "#results li.hit")[0].click()
        assert len(driver.find_elements(By.CSS_SELECTOR, "#results li.open .scale")) == 4
        driver.save_screenshot(str(tmp_path / "search_page.png"))
        assert (tmp_path / "search_page.png").stat().st_size > 10_000
