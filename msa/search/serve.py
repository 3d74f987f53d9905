"""``msa-serve``: a local web page and JSON API to search an image index built with ``msa-index``.

``msa-serve --index INDEX_DIR [--host 127.0.0.1] [--port 8000]`` serves:

- ``/``: the search page (a text box, k and re-rank controls, a grid of thumbnails with their scores and paths,
  per-scale score bars on hover or click); its HTML, JS and CSS ship with the package and load nothing else;
- ``GET /api/search?q=TEXT&k=10&rerank=100``: the same search as JSON;
- ``GET /thumbnail/ROW``: a JPEG thumbnail of the indexed image of that row (only rows of the index);
- ``/healthz``: liveness, the index's counts and the request limits.

The server binds to 127.0.0.1 unless told otherwise: the page has no authentication, and anyone who can reach it can
see every indexed image.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import io
import logging
import math
import re
import socket
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from msa.search.storage import SearchIndexError

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 10
DEFAULT_RERANK = 100
MAX_TOP_K = 100
MAX_RERANK = 1000
MAX_QUERY_CHARS = 1000
THUMBNAIL_SIZE = 256
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
THUMBNAIL_CACHE_ROWS = 1024

# Every response carries these: the page loads only its own files (no CDN, no inline script), and nothing is sniffed.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

# The page's files, read from the package once at start-up: no request path is ever joined to a folder.
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

# A row id in a URL: plain decimal digits only (no sign, no exponent, no whitespace), short enough to be an int64.
ROW_PATTERN = re.compile(r"[0-9]{1,18}")


class SearcherLike(Protocol):
    """What the app needs of ``msa.search.Searcher``."""

    num_images: int
    num_scales: int

    def search(self, queries: list[str], top_k: int = 10, rerank: int = 100) -> list[list[Any]]: ...

    def image_path(self, row: int) -> Any: ...


class ApiError(Exception):
    """A request the app refuses: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class SearchLimits:
    """Bounds on the search parameters a request may ask for."""

    max_top_k: int = MAX_TOP_K
    max_rerank: int = MAX_RERANK
    max_query_chars: int = MAX_QUERY_CHARS


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity; a non-finite score is sent as null rather than failing the whole response."""
    value = float(value)
    return value if math.isfinite(value) else None


def _hit_to_json(rank: int, hit: Any) -> dict[str, Any]:
    return {
        "rank": rank,
        "row": int(hit.row),
        "path": str(hit.path),
        "score": _finite_or_none(hit.score),
        "global_score": _finite_or_none(hit.global_score),
        "scale_scores": [_finite_or_none(score) for score in hit.scale_scores],
        "thumbnail": f"/thumbnail/{int(hit.row)}",
    }


def _parse_int(name: str, raw: str | None, default: int, low: int, high: int) -> int:
    if raw is None or raw.strip() == "":
        return default
    text = raw.strip()
    if not re.fullmatch(r"[+-]?[0-9]{1,9}", text):
        raise ApiError(400, f"{name} must be an integer from {low} to {high}, got {raw!r}")
    value = int(text)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be an integer from {low} to {high}, got {value}")
    return value


def parse_search_params(params: dict[str, str], limits: SearchLimits) -> tuple[str, int, int]:
    """The query, k and rerank of a search request, or an ``ApiError`` naming the bad parameter."""
    query = (params.get("q") or "").strip()
    if not query:
        raise ApiError(400, "q (the query text) is empty")
    if len(query) > limits.max_query_chars:
        raise ApiError(400, f"q is {len(query)} characters long; at most {limits.max_query_chars} are accepted")
    top_k = _parse_int("k", params.get("k"), DEFAULT_TOP_K, 1, limits.max_top_k)
    # Without a rerank, re-rank the usual 100 candidates, or k when more are asked for (rerank >= k is required).
    default_rerank = min(max(DEFAULT_RERANK, top_k), limits.max_rerank)
    rerank = _parse_int("rerank", params.get("rerank"), default_rerank, 0, limits.max_rerank)
    if 0 < rerank < top_k:
        raise ApiError(400, f"rerank must be 0 (global cosine only) or at least k ({top_k}), got {rerank}")
    return query, top_k, rerank


def make_thumbnail(path: Any, size: int = THUMBNAIL_SIZE) -> bytes:
    """A JPEG of the image at ``path`` fitting in ``size`` x ``size``, decoded as training decodes it
    (``msa.data.load_image``: 8-bit RGB, high-bit-depth images stretched by their range, huge scenes reduced).

    Raises:
        OSError: the file is missing or not a readable image (``msa.data.ImageLoadError``).
    """
    from PIL import Image

    from msa.data import load_image

    image = load_image(path)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _read_static_files() -> dict[str, bytes]:
    folder = resources.files("msa.search").joinpath("static")
    return {name: folder.joinpath(name).read_bytes() for name in STATIC_FILES}


def _error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=SECURITY_HEADERS)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return _error_response(error.status, error.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = "not found" if error.status_code == 404 else str(error.detail)
        return _error_response(error.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error_response(400, "invalid request")

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        # The traceback goes to the server's log, never to the client.
        logger.error("error while serving %s", request.url.path, exc_info=error)
        return _error_response(500, "internal error; see the server's log")


class _Pools:
    """The app's worker threads: one for the searcher (its model and SQLite connection are used by one thread at a
    time), two for decoding thumbnails (so that a grid of thumbnails does not queue behind a search)."""

    def __init__(self) -> None:
        self.searcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="msa-searcher")
        self.decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="msa-thumbnails")

    async def on_searcher(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.searcher, functools.partial(function, *args))

    async def on_decoder(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.decoder, functools.partial(function, *args))

    def shutdown(self) -> None:
        self.searcher.shutdown(wait=True, cancel_futures=True)
        self.decoder.shutdown(wait=True, cancel_futures=True)


def _host_name(host_header: str) -> str:
    """The name in a Host header, without its port: ``localhost:8000`` -> ``localhost``, ``[::1]:80`` -> ``::1``."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def _add_middleware(app: FastAPI, allowed_hosts: frozenset[str] | None) -> None:
    @app.middleware("http")
    async def check_host_and_add_headers(request: Request, call_next):
        # A page of another site can point a DNS name at 127.0.0.1 and then read this server as its own origin (DNS
        # rebinding); answering only to the names of this machine closes that.
        host = _host_name(request.headers.get("host", "")).lower()
        if allowed_hosts is not None and host not in allowed_hosts:
            return _error_response(400, f"host {host!r} is not served here; use {sorted(allowed_hosts)[0]}")
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response


def _add_page_routes(app: FastAPI) -> None:
    static_files = _read_static_files()

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return Response(static_files["index.html"], media_type=STATIC_FILES["index.html"])

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in static_files:
            raise ApiError(404, "not found")
        return Response(static_files[name], media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})


def _add_search_routes(app: FastAPI, searcher: SearcherLike, limits: SearchLimits, pools: _Pools) -> None:
    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "num_images": int(searcher.num_images),
            "num_scales": int(searcher.num_scales),
            "max_top_k": limits.max_top_k,
            "max_rerank": limits.max_rerank,
        }

    @app.get("/api/search")
    async def api_search(request: Request) -> dict[str, Any]:
        query, top_k, rerank = parse_search_params(dict(request.query_params), limits)
        started = time.perf_counter()
        try:
            hits = (await pools.on_searcher(searcher.search, [query], top_k, rerank))[0]
        except (SearchIndexError, FileNotFoundError) as error:
            # The index's files went missing or changed under the server: the details (paths) go to the log only.
            logger.error("the index failed while searching: %s", error)
            message = "the index is missing or damaged on the server; restart msa-serve on a good index"
            raise ApiError(410, message) from None
        except ValueError as error:  # the searcher's own argument checks
            raise ApiError(400, str(error)) from None
        seconds = time.perf_counter() - started
        return {
            "query": query,
            "k": top_k,
            "rerank": rerank,
            "num_images": int(searcher.num_images),
            "num_scales": int(searcher.num_scales),
            "seconds": round(seconds, 6),
            "hits": [_hit_to_json(rank, hit) for rank, hit in enumerate(hits, start=1)],
        }

    def path_of_row(row: int) -> Any:
        try:
            return searcher.image_path(row)
        except KeyError:
            raise ApiError(404, f"no indexed image has row {row}") from None

    @functools.lru_cache(maxsize=THUMBNAIL_CACHE_ROWS)
    def thumbnail_of_file(path: str) -> bytes:
        try:
            return make_thumbnail(path)
        except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
            logger.warning("no thumbnail of %s: %s", path, error)
            raise ApiError(404, "the image of this row is missing, unreadable or too large on the server") from None

    @app.get("/thumbnail/{row}", include_in_schema=False)
    async def thumbnail(row: str) -> Response:
        # Only a row number is taken from the URL; the file is whatever the index recorded for that row.
        if not ROW_PATTERN.fullmatch(row):
            raise ApiError(404, "a thumbnail is addressed by its row number")
        path = await pools.on_searcher(path_of_row, int(row))
        image = await pools.on_decoder(thumbnail_of_file, str(path))
        return Response(image, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


def create_app(
    searcher: SearcherLike, *, limits: SearchLimits | None = None, allowed_hosts: Iterable[str] | None = None
) -> FastAPI:
    """The FastAPI app serving ``searcher``: the search page, ``/api/search``, thumbnails and ``/healthz``.

    Args:
        searcher: an ``msa.search.Searcher`` (or anything with its ``search``, ``image_path``, ``num_images`` and
            ``num_scales``). All calls to it run on one worker thread, one at a time.
        limits: bounds on k, rerank and the query length (``SearchLimits()`` by default).
        allowed_hosts: the only host names (Host header, without port) answered; others get a 400. None: any.

    Returns:
        The app; serve it with uvicorn (``msa-serve`` does). Its worker threads stop when the server shuts down.
    """
    pools = _Pools()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        pools.shutdown()

    app = FastAPI(title="msa search", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    _install_error_handlers(app)
    _add_middleware(app, None if allowed_hosts is None else frozenset(name.lower() for name in allowed_hosts))
    _add_page_routes(app)
    _add_search_routes(app, searcher, limits or SearchLimits(), pools)
    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msa-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--index", required=True, help="index folder written by msa-index build")
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    add("--port", type=int, default=8000, help="port to listen on (default 8000)")
    add("--model", help="checkpoint or config of the index's model, if the index does not locate it")
    add("--device", default="cpu", help="device of the text encoder and re-ranking (cpu, cuda, ...)")
    add("--max-top-k", type=int, default=MAX_TOP_K, help=f"largest k a request may ask for (default {MAX_TOP_K})")
    add("--max-rerank", type=int, default=MAX_RERANK, help=f"largest rerank (default {MAX_RERANK})")
    add("--debug", action="store_true", help="show tracebacks")
    return parser


def _open_searcher(args: argparse.Namespace) -> SearcherLike:
    from msa.search import Searcher

    return Searcher(args.index, model=args.model, device=args.device)


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: a free one), so that a port in use is reported before anything is
    loaded, as a user's error rather than a server crash."""
    family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, protocol)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        # Listening now: a browser that connects while the model loads waits in the backlog instead of being refused.
        listener.listen(128)
    except OSError:
        listener.close()
        raise
    return listener


def _serve(app: FastAPI, listener: socket.socket, host: str, debug: bool) -> None:
    import uvicorn

    port = listener.getsockname()[1]
    # uvicorn does not announce the address of a socket it is given: say where the page is.
    logger.info("msa-serve: search page on http://%s:%d/", f"[{host}]" if ":" in host else host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level="debug" if debug else "info")
    uvicorn.Server(config).run(sockets=[listener])


def _usage_error(message: str) -> int:
    print("msa-serve: error: " + message.replace("\n", " "), file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(message)s")
    if not 0 <= args.port <= 65535:
        return _usage_error(f"--port must be from 0 to 65535, got {args.port}")
    if args.max_top_k < 1:
        return _usage_error(f"--max-top-k must be at least 1, got {args.max_top_k}")
    if args.max_rerank < 0:
        return _usage_error(f"--max-rerank must be at least 0, got {args.max_rerank}")
    try:
        listener = _listen(args.host, args.port)
    except OSError as error:
        return _usage_error(f"--host/--port: cannot listen on {args.host}:{args.port}: {error.strerror or error}")
    with listener:
        try:
            searcher = _open_searcher(args)
        except (SearchIndexError, ValueError, OSError) as error:
            if args.debug:
                raise
            message = str(error)  # the model loader names its flag itself
            return _usage_error(message if message.startswith("--") else f"--index {args.index}: {message}")
        if args.host not in LOOPBACK_NAMES:
            logger.warning("listening on %s: anyone who can reach it can search and see the images", args.host)
        # On the loopback address, answer only to this machine's names; on another address, to any name.
        allowed_hosts = LOOPBACK_NAMES if args.host in LOOPBACK_NAMES else None
        app = create_app(searcher, limits=SearchLimits(args.max_top_k, args.max_rerank), allowed_hosts=allowed_hosts)
        _serve(app, listener, args.host, args.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
