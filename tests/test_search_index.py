"""msa-index: what a build stores, update, refusals, the lock, and crashes at any moment (kill -9)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from search_fixtures import NO_REAL_IMAGES, REAL_IMAGES, copy_real_images, make_synthetic_folder, pattern

pytest.importorskip("faiss")
pytest.importorskip("timm")

from msa.data import load_image  # noqa: E402
from msa.search import (  # noqa: E402
    IndexCorruptError,
    IndexFormatError,
    IndexLockedError,
    IndexMissingError,
    ModelMismatchError,
    Searcher,
    build_index,
    update_index,
)
from msa.search.index import IndexOptions, main  # noqa: E402
from msa.search.models import load_model  # noqa: E402
from msa.search.storage import index_lock, read_manifest, read_metadata, sha256_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return load_model("msa-tiny")


@pytest.fixture(scope="module")
def archive(tmp_path_factory, model):
    """A synthetic image folder and its index, built once for the module (tests copy it before changing it)."""
    base = tmp_path_factory.mktemp("archive")
    files = make_synthetic_folder(base / "images")
    report = build_index("msa-tiny", base / "images", base / "index", IndexOptions(batch_size=4))
    return base, files, report


def _copy_archive(archive, tmp_path: Path) -> tuple[Path, Path]:
    base, _, _ = archive
    shutil.copytree(base / "images", tmp_path / "images")
    shutil.copytree(base / "index", tmp_path / "index")
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    manifest["images_root"] = str((tmp_path / "images").resolve())
    (tmp_path / "index" / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "images", tmp_path / "index"


def test_build_stores_every_readable_image_and_lists_the_others(archive, model):
    base, files, report = archive
    assert report.indexed == len(files["good"]) and report.encoded == len(files["good"])
    assert sorted(path for path, _ in report.skipped) == files["bad"]
    skipped = dict(line.split("\t") for line in (base / "index" / "skipped.txt").read_text().splitlines())
    assert sorted(skipped) == files["bad"]
    assert skipped["bad/empty.png"] == "empty file"
    assert "truncated" in skipped["bad/truncated.jpg"]
    manifest = read_manifest(base / "index")
    assert manifest.num_images == len(files["good"]) and manifest.values["num_skipped"] == 3
    assert manifest.values["dtype"] == "float16" and manifest.values["model"]["spec"] == "msa-tiny"
    records = read_metadata(manifest.generation_dir / "metadata.sqlite")
    assert [r.path for r in records] == files["good"]  # rows in path order
    for record in records:
        path = base / "images" / record.path
        assert record.sha256 == sha256_file(path) and record.size == path.stat().st_size

    # Row r holds exactly what the model computes for file r, loaded as training loads it (float16 storage).
    searcher = Searcher(base / "index", model=model)
    transform = model.image_transform(train=False)
    pixels = torch.stack([transform(load_image(base / "images" / r.path)) for r in records])
    with torch.no_grad():
        expected = model.encode_image(pixels)
    torch.testing.assert_close(torch.from_numpy(np.asarray(searcher.embeddings, np.float32)), expected.embeds,
                               atol=2e-3, rtol=2e-3)  # fmt: skip
    for stored, feature in zip(searcher.scale_features, expected.scale_features):
        torch.testing.assert_close(torch.from_numpy(np.asarray(stored, np.float32)), feature, atol=1e-2, rtol=2e-3)


@pytest.mark.skipif(not REAL_IMAGES.is_dir(), reason=NO_REAL_IMAGES)
def test_build_and_search_real_images(tmp_path, model):
    copied = copy_real_images(tmp_path / "images")
    (tmp_path / "images" / "ucm" / "broken.tif").write_bytes(b"II*\x00garbage")
    report = build_index(model, tmp_path / "images", tmp_path / "index")
    assert report.indexed == len(copied) == 41
    assert [path for path, _ in report.skipped] == ["ucm/broken.tif"]
    hits = Searcher(tmp_path / "index", model=model).search(["many planes parked near a terminal"], top_k=5)[0]
    assert len(hits) == 5 and all(hit.path in copied for hit in hits)


def test_update_encodes_only_new_and_changed_files(archive, model, tmp_path):
    images, index = _copy_archive(archive, tmp_path)
    before = Searcher(index, model=model)
    rows_before = {before.image_path(row).relative_to(images).as_posix(): row for row in range(before.num_images)}
    embeddings_before = np.asarray(before.embeddings).copy()
    (images / "flat" / "scene_001.PNG").unlink()  # deleted
    changed = "flat/scene_002.png"
    from PIL import Image

    Image.fromarray(pattern(1234)).save(images / changed)
    os.utime(images / changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    Image.fromarray(pattern(555)).save(images / "nested" / "new.png")
    (images / "bad" / "empty.png").unlink()

    report = update_index(index, model=model)
    assert (report.encoded, report.removed) == (2, 2)  # changed + new; deleted + changed
    assert report.reused == before.num_images - 2 and report.indexed == before.num_images
    assert sorted(p for p, _ in report.skipped) == ["bad/not_an_image.jpg", "bad/truncated.jpg"]
    after = Searcher(index, model=model)
    paths_after = {after.image_path(row).relative_to(images).as_posix(): row for row in range(after.num_images)}
    assert "flat/scene_001.PNG" not in paths_after and "nested/new.png" in paths_after
    for path, row in paths_after.items():  # unchanged rows are copied bit for bit, not re-encoded
        if path in rows_before and path != changed:
            np.testing.assert_array_equal(after.embeddings[row], embeddings_before[rows_before[path]])
    assert not np.array_equal(after.embeddings[paths_after[changed]], embeddings_before[rows_before[changed]])
    assert len(list(index.glob("gen-*"))) == 1  # the previous generation is gone


def test_refusals_name_the_problem(archive, model, tmp_path):
    base, _, _ = archive
    with pytest.raises(IndexMissingError, match="does not exist"):
        Searcher(tmp_path / "nowhere", model=model)
    with pytest.raises(IndexMissingError, match="not an index"):
        Searcher(base / "images", model=model)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "some other tool"}')
    with pytest.raises(IndexFormatError, match="not the manifest of an msa index"):
        Searcher(foreign, model=model)
    with pytest.raises(IndexFormatError, match="not an msa index"):
        build_index(model, base / "images", foreign)
    with pytest.raises(IndexFormatError, match="not empty and holds no index"):
        build_index(model, base / "images", base / "images" / "flat")
    with pytest.raises(ModelMismatchError, match="built with model"):
        Searcher(base / "index", model=load_model("msa-tiny-proj"))
    images, index = _copy_archive(archive, tmp_path / "copy")
    with pytest.raises(ModelMismatchError):
        update_index(index, model=load_model("msa-tiny-proj"))
    with pytest.raises(IndexFormatError, match="another folder"):
        update_index(index, images=base / "images", model=model)
    scale = next(index.glob("gen-*")) / "scale_2.f16"
    scale.write_bytes(scale.read_bytes()[:-10])
    with pytest.raises(IndexCorruptError, match="truncated"):
        Searcher(index, model=model)


def test_a_second_writer_refuses_while_the_lock_is_held(archive, model, tmp_path, capsys):
    images, index = _copy_archive(archive, tmp_path)
    with index_lock(index):
        with pytest.raises(IndexLockedError, match="being written by process"):
            update_index(index, model=model)
        assert main(["update", "--index", str(index), "--no-progress"]) == 2
    assert "being written" in capsys.readouterr().err
    assert update_index(index, model=model).encoded == 0  # released: the next writer proceeds


def test_cli_build_update_and_user_errors(tmp_path, capsys):
    make_synthetic_folder(tmp_path / "images", count=3)
    out = tmp_path / "index"
    args = ["--images", str(tmp_path / "images"), "--out", str(out), "--no-progress", "--batch-size", "2"]
    assert main(["build", "--model", "msa-tiny", *args]) == 0
    summary = capsys.readouterr().out
    assert "5 images indexed (5 encoded, 0 unchanged, 0 removed), 3 skipped" in summary
    assert read_manifest(out).values["model"]["spec"] == "msa-tiny"
    assert main(["update", "--index", str(out), "--no-progress"]) == 0
    assert "(0 encoded, 5 unchanged, 0 removed)" in capsys.readouterr().out
    assert main(["build", "--model", "no-such-model", *args]) == 2
    error = capsys.readouterr().err
    assert error.startswith("msa-index: --model no-such-model") and error.count("\n") == 1
    assert main(["update", "--index", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_crash_before_the_manifest_switch_keeps_the_old_index(archive, model, tmp_path, monkeypatch):
    images, index = _copy_archive(archive, tmp_path)
    before = read_manifest(index)
    from PIL import Image

    Image.fromarray(pattern(777)).save(images / "added.png")
    import msa.search.storage as storage

    def crash(path, text):
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(storage, "write_atomically", crash)
    with pytest.raises(KeyboardInterrupt):
        update_index(index, model=model)
    monkeypatch.undo()
    assert read_manifest(index).values == before.values  # the complete new generation is not current
    assert len(list(index.glob("gen-*"))) == 2
    assert Searcher(index, model=model).num_images == before.num_images
    assert update_index(index, model=model).indexed == before.num_images + 1
    assert len(list(index.glob("gen-*"))) == 1


def _kill_during(command: list[str], index: Path, tmp_path: Path) -> None:
    """Run ``command`` and kill -9 it once it is encoding into a new generation of ``index``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "killed.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not list(index.glob("gen-*/parts/part-0/embeddings.f16")):
            assert process.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "the indexer never started encoding"
            time.sleep(0.02)
        time.sleep(0.3)  # a few batches into the encoding
        assert process.poll() is None, "the indexer finished before it could be killed"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        log.close()
    assert process.returncode == -signal.SIGKILL


def _slow_folder(root: Path, count: int = 160) -> None:
    from PIL import Image

    root.mkdir(parents=True)
    for index in range(count):
        Image.fromarray(pattern(index, (160, 160))).save(root / f"img_{index:04d}.png")


@pytest.mark.slow
def test_kill_9_during_build_and_update_leaves_a_usable_index(tmp_path, model):
    _slow_folder(tmp_path / "images")
    index = tmp_path / "index"
    build_index("msa-tiny", tmp_path / "images", index, IndexOptions(batch_size=32))
    cli = [sys.executable, "-m", "msa.search.index"]
    small = ["--batch-size", "2", "--no-progress"]

    # A rebuild killed mid-encoding: the previous index still answers, the next run recovers.
    _kill_during([*cli, "build", "--model", "msa-tiny", "--images", str(tmp_path / "images"), "--out", str(index),
                  *small], index, tmp_path)  # fmt: skip
    assert Searcher(index).num_images == 160
    (tmp_path / "images" / "img_0000.png").unlink()
    for extra in range(3):
        from PIL import Image

        Image.fromarray(pattern(1000 + extra, (160, 160))).save(tmp_path / "images" / f"new_{extra}.png")
    # An update killed mid-encoding (100 changed files keep it encoding long enough): same.
    for number in range(1, 101):
        os.utime(tmp_path / "images" / f"img_{number:04d}.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    _kill_during([*cli, "update", "--index", str(index), *small], index, tmp_path)
    assert Searcher(index).num_images == 160
    report = update_index(index)
    assert (report.indexed, report.encoded, report.removed) == (162, 103, 101)
    assert len(list(index.glob("gen-*"))) == 1
    assert Searcher(index).search(["a scene"], top_k=3)[0][0].path.endswith(".png")
