"""benchmarks/bench_train_step.py runs without tokenizer files, under autocast, and reports the MSCMAT part's share of
the training step from its own medians (the GPU target: < 5% at the published sizes, B = 128)."""

from __future__ import annotations

import json

import pytest
from conftest import import_benchmark


@pytest.fixture(scope="module")
def bench_train_step():
    return import_benchmark("bench_train_step")


def test_share_of_step_from_the_rows(bench_train_step, tmp_path):
    argv = ["--sizes", "tiny", "--batches", "4", "--repeats", "1", "--providers", "fused,reference"]
    assert bench_train_step.main([*argv, "--precision", "bf16", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_train_step.json").read_text())
    assert {(r["mode"], r["provider"]) for r in rows} == {
        ("mscmat", "fused"), ("mscmat", "reference"), ("step", "fused"), ("step", "reference")
    }  # fmt: skip
    assert all(r["median_ms"] > 0 and r["environment"]["precision"] == "bf16" for r in rows)
    median = {(r["mode"], r["provider"]): r["median_ms"] for r in rows}
    table = (tmp_path / "bench_train_step.md").read_text()
    for provider in ("fused", "reference"):
        share = median["mscmat", provider] / median["step", provider]
        assert f"| tiny | 4 | {provider} | {share:.1%} |" in table


def test_share_needs_both_modes(bench_train_step):
    row = bench_train_step.Row
    rows = [row("tiny", 4, "mscmat", "fused", 2.0, None, None), row("tiny", 4, "step", "fused", 8.0, None, None)]
    assert bench_train_step.mscmat_shares(rows) == {("tiny", 4, "fused"): 0.25}
    assert bench_train_step.mscmat_shares(rows[:1]) == {}
