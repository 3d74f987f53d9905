"""benchmarks/bench_gpu_targets.py reports which configuration Triton's autotuner chose for each kernel, so that a
card's run says which tile its figures belong to. The timing itself needs a GPU (tests/test_ops_gpu.py and the
device check run it)."""

from __future__ import annotations

import pytest
from conftest import import_benchmark


@pytest.fixture(scope="module")
def bench_gpu_targets():
    return import_benchmark("bench_gpu_targets")


def test_autotuner_choices_reach_the_table(bench_gpu_targets, monkeypatch):
    triton = pytest.importorskip("triton")
    from msa.kernels import mscmat_kernels

    words = mscmat_kernels.mscmat_scores_bwd_words_kernel
    choice = triton.Config({"BLOCK_I": 64, "BLOCK_T": 2}, num_warps=4, num_stages=2)
    monkeypatch.setattr(words, "cache", {(4096, 4096, 32, "torch.bfloat16"): choice})
    monkeypatch.setattr(mscmat_kernels.mscmat_scores_fwd_kernel, "cache", {})
    monkeypatch.setattr(mscmat_kernels.mscmat_scores_bwd_images_kernel, "cache", {})
    tiles = bench_gpu_targets.autotuned_tiles()
    assert tiles == [{"kernel": "bwd_words", "key": "(4096, 4096, 32, 'torch.bfloat16')", "config": str(choice)}]
    table = bench_gpu_targets.markdown([], 1e15, {"device": "card", "torch": "t", "triton": "3", "git_sha": "x"},
                                       (1, 1, 1, 1, 1), tiles)  # fmt: skip
    assert "BLOCK_T: 2" in table and "| bwd_words | (4096, 4096, 32, 'torch.bfloat16') |" in table
