"""The msa-serve web layer (msa.search.serve) against a small in-memory searcher with the Searcher API."""

from __future__ import annotations

import io
import math
import re
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from msa.data import load_image
from msa.search import IndexCorruptError, serve
from msa.search.serve import SearchLimits, create_app


@dataclass
class DoubleHit:
    row: int
    path: str
    score: float
    global_score: float
    scale_scores: list[float]


def write_test_images(folder: Path) -> list[str]:
    """Images of the kinds an archive holds (RGB JPEG, RGBA PNG, grayscale, 16-bit TIFF, a large one), each a solid
    colour so that a thumbnail can be checked against its source. Returns the relative paths."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(200, 30, 30), (30, 160, 60), (40, 60, 210), (220, 200, 40), (120, 40, 160), (20, 150, 170)]
    relative = []
    for index, colour in enumerate(colours):
        name = f"scene_{index}.jpg" if index % 2 == 0 else f"sub/scene_{index}.png"
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        size = (320, 240) if index != 4 else (2000, 1500)
        image = Image.new("RGB", size, colour)
        if name.endswith(".png") and index == 1:
            image = image.convert("RGBA")
        image.save(path)
        relative.append(name)
    Image.new("L", (100, 100), 90).save(folder / "gray.png")
    # A 16-bit scene using a small part of its range, as RS sensors write them: 1000 .. 3000 left to right.
    ramp = np.linspace(1000, 3000, 96).round().astype(np.uint16)
    Image.fromarray(np.tile(ramp, (64, 1))).save(folder / "deep.tif")
    return [*relative, "gray.png", "deep.tif"]


@dataclass
class DoubleSearcher:
    """Implements the Searcher API over a folder of images: deterministic scores from the query text, every call
    recorded (arguments and thread) so that tests can see exactly what the web layer asked for."""

    root: Path
    paths: list[str]
    num_scales: int = 4
    calls: list[tuple] = field(default_factory=list)
    threads: set[int] = field(default_factory=set)
    error: Exception | None = None
    scores_override: float | None = None

    @property
    def num_images(self) -> int:
        return len(self.paths)

    def search(self, queries: list[str], top_k: int = 10, rerank: int = 100) -> list[list[DoubleHit]]:
        self.calls.append(("search", list(queries), top_k, rerank))
        self.threads.add(threading.get_ident())
        if self.error is not None:
            raise self.error
        results = []
        for query in queries:
            seed = sum(map(ord, query))
            order = sorted(range(self.num_images), key=lambda row: (row * 7 + seed) % 11)
            hits = []
            for rank, row in enumerate(order[:top_k]):
                global_score = 0.9 - 0.05 * rank
                scales = [global_score / (scale + 1) for scale in range(self.num_scales)] if rerank else []
                score = sum(scales) if rerank else global_score
                if self.scores_override is not None:
                    score = self.scores_override
                hits.append(DoubleHit(row, self.paths[row], score, global_score, scales))
            results.append(hits)
        return results

    def image_path(self, row: int) -> Path:
        self.calls.append(("image_path", row))
        self.threads.add(threading.get_ident())
        if not isinstance(row, int) or not 0 <= row < self.num_images:
            raise KeyError(row)
        return self.root / self.paths[row]


@pytest.fixture
def searcher(tmp_path: Path) -> DoubleSearcher:
    root = tmp_path / "archive"
    return DoubleSearcher(root, write_test_images(root))


@pytest.fixture
def client(searcher: DoubleSearcher):
    with TestClient(create_app(searcher), raise_server_exceptions=False) as test_client:
        yield test_client


def searches(searcher: DoubleSearcher) -> list[tuple]:
    return [call for call in searcher.calls if call[0] == "search"]


def test_healthz_reports_the_index(client, searcher):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "num_images": searcher.num_images,
        "num_scales": 4,
        "max_top_k": serve.MAX_TOP_K,
        "max_rerank": serve.MAX_RERANK,
    }


def test_page_and_its_files_load_nothing_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element_id in ('id="query"', 'id="top-k"', 'id="rerank"', 'id="results"'):
        assert element_id in page.text
    script = client.get("/static/app.js")
    style = client.get("/static/style.css")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    for text in (page.text, script.text, style.text):
        assert not re.search(r"https?:|//[a-z]|@import|url\(", text), "the page must not reference another origin"
    assert "innerHTML" not in script.text  # server strings (file paths) are inserted as text only
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"


def test_search_returns_the_searchers_hits_as_json(client, searcher):
    response = client.get("/api/search", params={"q": "  planes near a terminal ", "k": 3, "rerank": 50})
    assert response.status_code == 200
    body = response.json()
    assert searches(searcher) == [("search", ["planes near a terminal"], 3, 50)]
    expected = searcher.search(["planes near a terminal"], 3, 50)[0]
    assert body["query"] == "planes near a terminal" and body["k"] == 3 and body["rerank"] == 50
    assert body["num_images"] == searcher.num_images and body["num_scales"] == 4 and body["seconds"] >= 0
    assert [hit["row"] for hit in body["hits"]] == [hit.row for hit in expected]
    for rank, (sent, hit) in enumerate(zip(body["hits"], expected), start=1):
        assert sent["rank"] == rank and sent["path"] == hit.path
        assert sent["score"] == pytest.approx(hit.score) and sent["global_score"] == pytest.approx(hit.global_score)
        assert sent["scale_scores"] == pytest.approx(hit.scale_scores) and len(sent["scale_scores"]) == 4
        assert sent["thumbnail"] == f"/thumbnail/{hit.row}"


def test_search_defaults_and_global_only(client, searcher):
    assert client.get("/api/search", params={"q": "a river"}).status_code == 200
    body = client.get("/api/search", params={"q": "a river", "k": "2", "rerank": "0"}).json()
    assert searches(searcher) == [("search", ["a river"], 10, 100), ("search", ["a river"], 2, 0)]
    assert len(body["hits"]) == 2 and all(hit["scale_scores"] == [] for hit in body["hits"])


@pytest.mark.parametrize(
    ("params", "names"),
    [
        ({}, "q"),
        ({"q": ""}, "q"),
        ({"q": "   \t "}, "q"),
        ({"q": "x" * 1001}, "q"),
        ({"q": "farmland", "k": "0"}, "k"),
        ({"q": "farmland", "k": "101"}, "k"),
        ({"q": "farmland", "k": "-3"}, "k"),
        ({"q": "farmland", "k": "ten"}, "k"),
        ({"q": "farmland", "k": "2.5"}, "k"),
        ({"q": "farmland", "k": "1e2"}, "k"),
        ({"q": "farmland", "k": "99999999999999999999"}, "k"),
        ({"q": "farmland", "rerank": "-1"}, "rerank"),
        ({"q": "farmland", "rerank": "1001"}, "rerank"),
        ({"q": "farmland", "rerank": "all"}, "rerank"),
        ({"q": "farmland", "k": "20", "rerank": "19"}, "rerank"),
    ],
)
def test_bad_search_requests_get_a_400_naming_the_parameter(client, searcher, params, names):
    response = client.get("/api/search", params=params)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"].startswith(names)
    assert searches(searcher) == []


def test_limits_are_configurable(searcher):
    with TestClient(create_app(searcher, limits=SearchLimits(max_top_k=5, max_rerank=20))) as limited:
        assert limited.get("/healthz").json()["max_top_k"] == 5 and limited.get("/healthz").json()["max_rerank"] == 20
        assert limited.get("/api/search", params={"q": "a port", "k": 6}).status_code == 400
        assert limited.get("/api/search", params={"q": "a port", "rerank": 21}).status_code == 400
        assert limited.get("/api/search", params={"q": "a port", "k": 5, "rerank": 20}).status_code == 200
        assert limited.get("/api/search", params={"q": "a port", "k": 4}).json()["rerank"] == 20
    with TestClient(create_app(searcher, limits=SearchLimits(max_top_k=300, max_rerank=500))) as wide:
        assert wide.get("/api/search", params={"q": "a port", "k": 250}).json()["rerank"] == 250
    assert searches(searcher)[-1] == ("search", ["a port"], 250, 250)


@pytest.mark.parametrize(
    "error",
    [FileNotFoundError("/somewhere/index/embeddings.f16"), IndexCorruptError("/somewhere/index/scale_0.f16 is short")],
)
def test_index_missing_at_search_time_is_a_4xx_json(client, searcher, error):
    searcher.error = error
    response = client.get("/api/search", params={"q": "a stadium"})
    assert 400 <= response.status_code < 500
    assert "index is missing" in response.json()["error"]
    assert "somewhere" not in response.text


def test_the_searchers_argument_errors_are_400s(client, searcher):
    searcher.error = ValueError("every query must be a non-empty string")
    response = client.get("/api/search", params={"q": "a stadium"})
    assert response.status_code == 400
    assert response.json() == {"error": "every query must be a non-empty string"}


def test_an_unexpected_error_is_a_json_500_without_traceback(client, searcher):
    searcher.error = RuntimeError("secret internal detail")
    response = client.get("/api/search", params={"q": "a stadium"})
    assert response.status_code == 500
    assert response.json() == {"error": "internal error; see the server's log"}
    assert "Traceback" not in response.text and "secret" not in response.text


def test_non_finite_scores_are_sent_as_null(client, searcher):
    searcher.scores_override = math.nan
    response = client.get("/api/search", params={"q": "a beach", "k": 2})
    assert response.status_code == 200
    assert [hit["score"] for hit in response.json()["hits"]] == [None, None]


def test_searcher_is_used_from_one_thread(client, searcher):
    for query in ("a bridge", "a forest", "a harbor"):
        assert client.get("/api/search", params={"q": query}).status_code == 200
    for row in range(3):
        assert client.get(f"/thumbnail/{row}").status_code == 200
    assert len(searcher.threads) == 1


def test_thumbnails_of_every_indexed_kind(client, searcher):
    for row, relative in enumerate(searcher.paths):
        response = client.get(f"/thumbnail/{row}")
        assert response.status_code == 200, relative
        assert response.headers["content-type"] == "image/jpeg"
        thumbnail = Image.open(io.BytesIO(response.content))
        assert thumbnail.mode == "RGB" and max(thumbnail.size) <= serve.THUMBNAIL_SIZE
        expected = np.asarray(load_image(searcher.root / relative), dtype=np.float32).reshape(-1, 3).mean(0)
        assert np.abs(np.asarray(thumbnail, dtype=np.float32).reshape(-1, 3).mean(0) - expected).max() < 8, relative
    large = Image.open(io.BytesIO(client.get("/thumbnail/4").content))
    assert large.size == (256, 192)  # 2000 x 1500 fitted into 256 x 256, aspect kept


def test_thumbnail_of_a_16_bit_scene_is_stretched_by_its_range(client, searcher):
    """PIL's convert("RGB") saturates 16-bit values to white; the thumbnail shows the scene's own range."""
    response = client.get(f"/thumbnail/{searcher.paths.index('deep.tif')}")
    pixels = np.asarray(Image.open(io.BytesIO(response.content)).convert("L"), dtype=np.float32)
    columns = pixels.mean(0)
    assert columns[:4].mean() < 30 and columns[-4:].mean() > 225  # dark on the left, bright on the right
    assert 100 < pixels.mean() < 155


def test_thumbnail_of_a_row_not_in_the_index_is_a_json_404(client, searcher):
    response = client.get(f"/thumbnail/{searcher.num_images}")
    assert response.status_code == 404 and "row" in response.json()["error"]


def test_thumbnail_of_a_vanished_file_is_a_json_404(client, searcher):
    (searcher.root / searcher.paths[2]).unlink()
    response = client.get("/thumbnail/2")
    assert response.status_code == 404 and "unreadable" in response.json()["error"]


def test_thumbnail_of_an_image_over_the_decompression_bomb_limit_is_a_json_404(client, searcher, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the 320 x 240 images are then "bombs"
    response = client.get("/thumbnail/0")
    assert response.status_code == 404 and "too large" in response.json()["error"]


TRAVERSALS = [
    "/thumbnail/../../secret.txt",
    "/thumbnail/..%2F..%2Fsecret.txt",
    "/thumbnail/%2e%2e%2f%2e%2e%2fsecret.txt",
    "/thumbnail/0/../../secret.txt",
    "/thumbnail/0%2F..%2F..%2Fsecret.txt",
    "/thumbnail/-1",
    "/thumbnail/+1",
    "/thumbnail/1e1",
    "/thumbnail/0x1",
    "/thumbnail/%200",
    "/thumbnail/00000000000000000000000001",
    "/thumbnail/scene_0.jpg",
    "/thumbnail/archive%2Fscene_0.jpg",
    "/thumbnail/%2Fetc%2Fpasswd",
    "/thumbnail/..%5C..%5Csecret.txt",
    "/static/../serve.py",
    "/static/..%2Fserve.py",
    "/static/%2e%2e%2fserve.py",
    "/static/..%2F..%2Fsecret.txt",
    "/static/%2Fetc%2Fpasswd",
    "/static/app.js%00.txt",
    "/static/",
    "//etc/passwd",
    "/../secret.txt",
    "/secret.txt",
    "/archive/scene_0.jpg",
]


def test_no_request_path_reaches_the_file_system(client, searcher, monkeypatch):
    secret = searcher.root.parent / "secret.txt"
    secret.write_text("top secret")
    opened = []
    original_open = Image.open

    def recording_open(path, *args, **kwargs):
        opened.append(path)
        return original_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", recording_open)
    for url in TRAVERSALS:
        response = client.get(url)
        assert 400 <= response.status_code < 500, url
        assert "top secret" not in response.text and "import" not in response.text, url
        assert response.headers["content-type"] == "application/json", url
    assert opened == []
    assert all(call[1] in range(searcher.num_images) for call in searcher.calls if call[0] == "image_path")


def test_msa_serve_listens_on_localhost_by_default(searcher, monkeypatch):
    defaults = serve.build_parser().parse_args(["--index", "unused"])
    assert defaults.host == "127.0.0.1" and defaults.port == 8000
    served = {}
    monkeypatch.setattr(serve, "_open_searcher", lambda args: searcher)

    def fake_serve(app, listener, host, debug):
        served.update(app=app, listener=listener, address=listener.getsockname()[0])

    monkeypatch.setattr(serve, "_serve", fake_serve)
    assert serve.main(["--index", "unused", "--port", "0"]) == 0
    assert served["address"] == "127.0.0.1" and served["listener"].fileno() == -1  # closed after serving
    local = TestClient(served["app"], base_url="http://127.0.0.1:8000")
    assert local.get("/healthz").json()["num_images"] == searcher.num_images
    assert local.get("/healthz", headers={"host": "localhost:8000"}).status_code == 200
    # On localhost, a request for another host name (a rebound DNS name) is refused.
    rebound = local.get("/api/search?q=a+port", headers={"host": "attacker.example:8000"})
    assert rebound.status_code == 400 and "attacker.example" in rebound.json()["error"]
    assert searches(searcher) == []
    assert serve.main(["--index", "unused", "--host", "0.0.0.0", "--port", "0"]) == 0
    assert served["address"] == "0.0.0.0"
    assert TestClient(served["app"], base_url="http://scenes.example").get("/healthz").status_code == 200


def test_msa_serve_refuses_a_port_in_use_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(serve, "_open_searcher", lambda args: pytest.fail("must not open the index"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve.main(["--index", "unused", "--port", str(port)]) == 2
    error = capsys.readouterr().err.strip()
    assert (
        error.startswith(f"msa-serve: error: --host/--port: cannot listen on 127.0.0.1:{port}: ") and "\n" not in error
    )


@pytest.mark.parametrize(
    ("header", "name"),
    [("localhost:8000", "localhost"), ("127.0.0.1", "127.0.0.1"), ("[::1]:8000", "::1"), ("[::1]", "::1"),
     ("Example.org", "Example.org"), ("", "")],
)  # fmt: skip
def test_host_name_of_a_host_header(header, name):
    assert serve._host_name(header) == name


def test_allowed_hosts(searcher):
    with TestClient(create_app(searcher, allowed_hosts=["localhost"]), base_url="http://localhost:9000") as client:
        assert client.get("/").status_code == 200
        refused = client.get("/", headers={"host": "localhost.attacker.example"})
        assert refused.status_code == 400 and refused.headers["content-type"] == "application/json"


@pytest.mark.parametrize("flags", [["--port", "70000"], ["--max-top-k", "0"], ["--max-rerank", "-1"]])
def test_msa_serve_refuses_bad_flags_with_one_line(flags, monkeypatch, capsys):
    monkeypatch.setattr(serve, "_open_searcher", lambda args: pytest.fail("must not open the index"))
    assert serve.main(["--index", "unused", *flags]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("msa-serve: error: " + flags[0]) and "\n" not in error
