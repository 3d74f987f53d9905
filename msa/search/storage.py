"""The on-disk format of an archive index, and the rules that keep it consistent under crashes.

An index folder holds::

    manifest.json      format, counts, dtype, model fingerprint, the current generation and its file sizes
    skipped.txt        files that could not be indexed, one "path<TAB>reason" per line
    .lock              taken (flock) by a build or update for its whole run
    gen-000007/        the current generation:
        embeddings.f16     [N, D] L2-normalised global image embeddings, float16, row-major, no header
        scale_<s>.f16      [N, C_s] pooled image features of scale s (the input of MSCMAT), float16
        metadata.sqlite    table images(row, path, size, mtime_ns, sha256), path relative to the image folder
        vectors.faiss      the trained IVF / IVF-PQ index (absent for exact search)

A build or update writes a whole new generation folder, flushes it to disk, then replaces ``manifest.json``
atomically (``os.replace``): whatever moment a process is killed at, the manifest names a complete generation.
Generations the manifest does not name are leftovers of an interrupted run and are removed by the next writer.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "msa-index"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SKIPPED_NAME = "skipped.txt"
LOCK_NAME = ".lock"
EMBEDDINGS_NAME = "embeddings.f16"
METADATA_NAME = "metadata.sqlite"
VECTORS_NAME = "vectors.faiss"
STORAGE_DTYPE = np.float16
_GENERATION = re.compile(r"^gen-(\d{6})$")


class SearchIndexError(Exception):
    """Base class of the errors of an archive index; the message says what is wrong and what to do."""


class IndexMissingError(SearchIndexError):
    """The folder does not exist or holds no index."""


class IndexFormatError(SearchIndexError):
    """The folder holds something that is not an index of this format (a foreign folder, another version)."""


class IndexCorruptError(SearchIndexError):
    """A file of the index is missing, truncated or inconsistent with the manifest."""


class ModelMismatchError(SearchIndexError):
    """The model given is not the one the index was built with."""


class IndexLockedError(SearchIndexError):
    """Another process is writing the index."""


def scale_name(scale: int) -> str:
    return f"scale_{scale}.f16"


@dataclass
class Manifest:
    """The parsed ``manifest.json``: counts and shapes of the current generation and where it lives."""

    directory: Path
    values: dict[str, Any]

    @property
    def generation_dir(self) -> Path:
        return self.directory / self.values["generation"]

    @property
    def num_images(self) -> int:
        return int(self.values["num_images"])

    @property
    def embed_dim(self) -> int:
        return int(self.values["embed_dim"])

    @property
    def scale_channels(self) -> list[int]:
        return [int(c) for c in self.values["scale_channels"]]

    @property
    def images_root(self) -> Path:
        return Path(self.values["images_root"])

    @property
    def fingerprint(self) -> str:
        return self.values["model"]["fingerprint"]

    def file_shapes(self) -> dict[str, tuple[int, int]]:
        """Shape [rows, columns] of every float16 matrix of the generation."""
        shapes = {EMBEDDINGS_NAME: (self.num_images, self.embed_dim)}
        shapes.update({scale_name(s): (self.num_images, c) for s, c in enumerate(self.scale_channels)})
        return shapes


def read_manifest(directory: str | Path) -> Manifest:
    """Parse and check an index's manifest and the sizes of the files it names.

    Raises:
        IndexMissingError: no folder or no manifest.
        IndexFormatError: a manifest of something else, or of another format version.
        IndexCorruptError: a file is missing or its size differs from the manifest's record (a truncated copy).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise IndexMissingError(f"index folder {directory} does not exist; create it with `msa-index build`")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise IndexMissingError(
            f"{directory} holds no {MANIFEST_NAME}: not an index (create one with `msa-index build`)"
        )
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IndexCorruptError(f"{path} cannot be read as JSON: {error}") from error
    if not isinstance(values, dict) or values.get("format") != FORMAT_NAME:
        raise IndexFormatError(f'{path} is not the manifest of an msa index (no "format": "{FORMAT_NAME}")')
    if values.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(
            f"{path} has format version {values.get('format_version')}, this msa reads version {FORMAT_VERSION}; "
            "rebuild the index with `msa-index build`"
        )
    manifest = Manifest(directory, values)
    for name, expected in values["files"].items():
        file = manifest.generation_dir / name
        if not file.is_file():
            raise IndexCorruptError(f"index file {file} is missing; rebuild the index with `msa-index build`")
        size = file.stat().st_size
        if size != expected:
            raise IndexCorruptError(
                f"index file {file} has {size} bytes, the manifest records {expected} (truncated or replaced); "
                "rebuild the index with `msa-index build`"
            )
    return manifest


def open_matrix(manifest: Manifest, name: str) -> np.ndarray:
    """A read-only memory map of one float16 matrix of the current generation."""
    rows, columns = manifest.file_shapes()[name]
    if rows == 0:
        return np.zeros((0, columns), dtype=STORAGE_DTYPE)
    return np.memmap(manifest.generation_dir / name, dtype=STORAGE_DTYPE, mode="r", shape=(rows, columns))


# ------------------------------------------------------------------------------------------------ metadata
@dataclass(frozen=True)
class FileRecord:
    """One indexed image: ``path`` relative to the image folder (POSIX separators), size, mtime, SHA-256."""

    path: str
    size: int
    mtime_ns: int
    sha256: str


def write_metadata(path: Path, records: list[FileRecord]) -> None:
    """Write the metadata table; row r of the matrices is ``records[r]``."""
    connection = sqlite3.connect(path)
    try:
        connection.execute(
            "CREATE TABLE images (row INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, size INTEGER NOT NULL, "
            "mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL)"
        )
        connection.executemany(
            "INSERT INTO images VALUES (?, ?, ?, ?, ?)",
            ((row, r.path, r.size, r.mtime_ns, r.sha256) for row, r in enumerate(records)),
        )
        connection.commit()
    finally:
        connection.close()


def read_metadata(path: Path) -> list[FileRecord]:
    """All records, in row order."""
    connection = connect_read_only(path)
    try:
        rows = connection.execute("SELECT path, size, mtime_ns, sha256 FROM images ORDER BY row").fetchall()
    finally:
        connection.close()
    return [FileRecord(*row) for row in rows]


def connect_read_only(path: Path) -> sqlite3.Connection:
    # immutable=1: the generation never changes once written, so SQLite needs no lock or journal (and works on a
    # read-only copy of the index).
    return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)


# ------------------------------------------------------------------------------------------------ writing
def fsync_path(path: Path) -> None:
    """Flush a file or a folder entry to disk (a rename is durable only once its folder is flushed)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that a reader sees the old or the new content, never a mix."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_path(path.parent)


def new_generation(directory: Path) -> Path:
    """Create the folder of the next generation. Call after :func:`remove_stale_generations`: the only folder left is
    the current one, which the new number never reuses."""
    numbers = [int(m.group(1)) for p in directory.iterdir() if (m := _GENERATION.match(p.name))]
    path = directory / f"gen-{max(numbers, default=0) + 1:06d}"
    path.mkdir()
    return path


def commit_generation(directory: Path, generation: Path, values: dict[str, Any], skipped: list[tuple[str, str]]):
    """Flush ``generation``, then make it current by replacing the manifest; write ``skipped.txt``; remove the
    generations that are no longer current."""
    files = {}
    for file in sorted(generation.iterdir()):
        fsync_path(file)
        files[file.name] = file.stat().st_size
    fsync_path(generation)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **values,
        "generation": generation.name,
        "files": files,
    }
    write_atomically(directory / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    write_atomically(directory / SKIPPED_NAME, "".join(f"{path}\t{reason}\n" for path, reason in skipped))
    remove_stale_generations(directory)


def remove_stale_generations(directory: Path) -> None:
    """Delete generation folders (and temporary files) that the manifest does not name: leftovers of a killed run."""
    current = None
    manifest = directory / MANIFEST_NAME
    if manifest.is_file():
        try:
            current = json.loads(manifest.read_text()).get("generation")
        except (OSError, json.JSONDecodeError):
            current = None
    for path in directory.iterdir():
        if _GENERATION.match(path.name) and path.name != current:
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(".") and ".tmp-" in path.name:
            path.unlink(missing_ok=True)


@contextmanager
def index_lock(directory: Path, wait: bool = False) -> Iterator[None]:
    """Hold the index's write lock. The kernel drops a ``flock`` when its process dies, so a killed writer never
    leaves the index locked.

    Raises:
        IndexLockedError: another process holds the lock and ``wait`` is False.
    """
    handle = open(directory / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise IndexLockedError(
                f"{directory} is being written by {holder}; wait for it to finish (or pass --wait)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()
