"""msa-search: re-ranking equals brute-force MSCMAT over the same candidates, global and image search, the CLI,
IVF indexes, and a sharded (torchrun, 2 gloo processes) build equal to the single-process one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from search_fixtures import make_synthetic_folder

pytest.importorskip("faiss")
pytest.importorskip("timm")

from msa.mscmat import mscmat_pairs_ref  # noqa: E402
from msa.search import Searcher, build_index  # noqa: E402
from msa.search.index import IndexOptions  # noqa: E402
from msa.search.query import main  # noqa: E402
from msa.search.storage import read_manifest, read_metadata  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["many planes parked near a terminal", "a river crosses green farmland", "dense residential buildings"]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    base = tmp_path_factory.mktemp("query")
    make_synthetic_folder(base / "images", count=30)
    build_index("msa-tiny", base / "images", base / "index", IndexOptions(batch_size=8))
    return base / "index"


@pytest.fixture(scope="module")
def searcher(index):
    return Searcher(index)


def _brute_force(searcher: Searcher, query: str, depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global top-``depth`` by an exact float32 product, then the published pairwise MSCMAT (no fused op) summed over
    scales: (rows in final order, final scores, global scores)."""
    model = searcher.model
    tokens = model.tokenize([query])
    with torch.no_grad():
        text = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
        cosine = np.asarray(searcher.embeddings, np.float32) @ text.embeds[0].numpy()
        candidates = np.argsort(-cosine, kind="stable")[:depth]
        features = [torch.from_numpy(np.asarray(m[np.sort(candidates)], np.float32)) for m in searcher.scale_features]
        per_scale = mscmat_pairs_ref(model.mscmat, features, text.word_tokens, text.text_global, text.word_mask)
    final = torch.stack(per_scale).sum(0)[:, 0].numpy()
    order = np.argsort(-final, kind="stable")
    rows = np.sort(candidates)[order]
    return rows, final[order], cosine[rows]


@pytest.mark.parametrize("depth", [5, 12, 1000])
def test_rerank_order_equals_brute_force_mscmat(searcher, depth):
    results = searcher.search(QUERIES, top_k=5, rerank=depth)
    for query, hits in zip(QUERIES, results):
        rows, final, cosine = _brute_force(searcher, query, min(depth, searcher.num_images))
        assert [hit.row for hit in hits] == rows[:5].tolist()
        np.testing.assert_allclose([hit.score for hit in hits], final[:5], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose([hit.global_score for hit in hits], cosine[:5], rtol=1e-5, atol=1e-5)
        for hit in hits:
            assert len(hit.scale_scores) == searcher.num_scales == 4
            assert sum(hit.scale_scores) == pytest.approx(hit.score, abs=1e-5)


def test_global_only_and_search_by_image(searcher):
    hits = searcher.search(QUERIES[:1], top_k=4, rerank=0)[0]
    cosine = np.asarray(searcher.embeddings, np.float32) @ _text_embedding(searcher, QUERIES[0])
    assert [hit.row for hit in hits] == np.argsort(-cosine, kind="stable")[:4].tolist()
    assert all(hit.scale_scores == [] and hit.score == hit.global_score for hit in hits)
    row = 7
    hits = searcher.search_image(searcher.image_path(row), top_k=3)
    assert hits[0].row == row and hits[0].score == pytest.approx(1.0, abs=2e-3)
    assert hits[0].path == searcher.image_path(row).relative_to(searcher.images_root).as_posix()


def _text_embedding(searcher: Searcher, query: str) -> np.ndarray:
    tokens = searcher.model.tokenize([query])
    with torch.no_grad():
        return searcher.model.encode_text(tokens["input_ids"], tokens["attention_mask"]).embeds[0].numpy()


def test_image_path_only_for_indexed_rows(searcher):
    assert searcher.image_path(0).is_file()
    for row in (-1, searcher.num_images, "0", 1.0, True):
        with pytest.raises(KeyError):
            searcher.image_path(row)


def test_argument_checks(searcher):
    for kwargs in ({"top_k": 0}, {"rerank": -1}, {"top_k": 10, "rerank": 5}):
        with pytest.raises(ValueError):
            searcher.search(QUERIES, **kwargs)
    with pytest.raises(ValueError, match="non-empty"):
        searcher.search(["fine", "  "])
    with pytest.raises(ValueError, match="list"):
        searcher.search("a bare string")


def test_cli_json_queries_file_and_errors(index, tmp_path, capsys):
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(QUERIES[:2]) + "\n\n")
    assert main(["--index", str(index), "--queries", str(queries), "--json", "--top-k", "3", "--rerank", "10"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["query"] for line in lines] == QUERIES[:2]
    expected = Searcher(index).search(QUERIES[:2], top_k=3, rerank=10)
    for line, hits in zip(lines, expected):
        assert [hit["row"] for hit in line["hits"]] == [hit.row for hit in hits]
        assert set(line["hits"][0]) == {"row", "path", "score", "global_score", "scale_scores"}
    assert main(["--index", str(index), QUERIES[0], "--top-k", "2"]) == 0
    table = capsys.readouterr().out
    assert table.startswith(f"# {QUERIES[0]}\n| rank | score | global | per scale | path |")
    for argv, message in [
        (["--index", str(index)], "no query"),
        (["--index", str(index), "x", "--top-k", "0"], "--top-k"),
        (["--index", str(index), "x", "--top-k", "20", "--rerank", "5"], "--rerank"),
        (["--index", str(tmp_path / "missing"), "x"], "does not exist"),
        (["--index", str(index), "--image", str(tmp_path / "missing.png")], "--image"),
    ]:
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_ivf_index_finds_what_exact_search_finds(tmp_path, index, kind):
    images = read_manifest(index).images_root
    out = tmp_path / kind
    build_index("msa-tiny", images, out, IndexOptions(batch_size=16, vector_index=kind, nlist=2))
    manifest = read_manifest(out)
    assert manifest.values["vector_index"]["kind"] == kind and (manifest.generation_dir / "vectors.faiss").is_file()
    approximate = Searcher(out, nprobe=2).search(QUERIES, top_k=5, rerank=0)  # every list visited: exact
    exact = Searcher(index).search(QUERIES, top_k=5, rerank=0)
    for found, expected in zip(approximate, exact):
        assert [hit.row for hit in found] == [hit.row for hit in expected]


@pytest.mark.slow
def test_torchrun_sharded_build_equals_single_process(tmp_path, index):
    images = read_manifest(index).images_root
    out = tmp_path / "sharded"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "msa.search.index", "build", "--model", "msa-tiny", "--images", str(images), "--out", str(out),
               "--batch-size", "8", "--no-progress"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("images indexed") == 1  # rank 0 reports
    single, sharded = read_manifest(index), read_manifest(out)
    assert read_metadata(sharded.generation_dir / "metadata.sqlite") == read_metadata(
        single.generation_dir / "metadata.sqlite"
    )
    assert (out / "skipped.txt").read_text() == (index / "skipped.txt").read_text()
    for name in single.file_shapes():
        a = np.fromfile(single.generation_dir / name, dtype=np.float16)
        b = np.fromfile(sharded.generation_dir / name, dtype=np.float16)
        # The same images in other batches: equal up to float16 rounding of last-bit differences.
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=2e-3, atol=2e-3)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in index.iterdir())
