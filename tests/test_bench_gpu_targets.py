"""benchmarks/bench_gpu_targets.py reports which configuration Triton's autotuner chose for each kernel, so that a
card's run says which tile its figures belong to. The timing itself needs a GPU (tests/test_ops_gpu.py and the
device check run it)."""

from __future__ import annotations

import pytest
from conftest import import_benchmark, require_triton_kernels


@pytest.fixture(scope="module")
def bench_gpu_targets():
    return import_benchmark("bench_gpu_targets")


def test_autotuner_choices_reach_the_table(bench_gpu_targets, monkeypatch):
    triton = require_triton_kernels()
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


def test_target_rows_are_written_before_the_fused_backward_runs(bench_gpu_targets, monkeypatch, tmp_path):
    """The fused backward is a side measurement and runs last: when it fails (or its compiles are cut by the
    phase's time limit), every target row, the RSICD ones included, is already in the JSON."""
    import json

    bench = bench_gpu_targets
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "environment", lambda device: {"device": "card", "torch": "t", "triton": "3",
                                                              "git_sha": "x"})  # fmt: skip
    monkeypatch.setattr(bench, "backend_available", lambda name, device: True)
    monkeypatch.setattr(bench, "matmul_rate", lambda device, dtype: 1e15)
    monkeypatch.setattr(bench, "autotuned_tiles", lambda: [])

    def op_rows(backends, *args):
        modes = [("reference", "forward")] + [(backends[0], mode) for mode in ("forward", "backward")]
        return [{"provider": provider, "mode": mode, "median_ms": 1.0} for provider, mode in modes]

    def fused_backward_rows(shape, backward_ms, *args):
        (tmp_path / "seen.json").write_text((tmp_path / "bench_gpu_targets_card.json").read_text())
        raise RuntimeError("out of resources")

    rsicd = [{"provider": "triton", "mode": "RSICD", "median_ms": 9.0}]
    monkeypatch.setattr(bench, "op_rows", op_rows)
    monkeypatch.setattr(bench, "rsicd_rows", lambda backends, device, repeats: rsicd)
    monkeypatch.setattr(bench, "fused_backward_rows", fused_backward_rows)
    assert bench.main(["--out", str(tmp_path)]) == 0
    before_fused = [row["mode"] for row in json.loads((tmp_path / "seen.json").read_text())["rows"]]
    assert before_fused == ["forward", "forward", "backward", "forward", "backward", "RSICD"]
    assert [row["mode"] for row in json.loads((tmp_path / "bench_gpu_targets_card.json").read_text())["rows"]] == (
        before_fused
    )
