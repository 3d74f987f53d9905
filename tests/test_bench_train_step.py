"""benchmarks/bench_train_step.py runs without tokenizer files, under autocast, and reports the MSCMAT part's share of
the training step from its own medians (the GPU target: < 5% at the published sizes, B = 128)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import import_benchmark

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench_train_step():
    return import_benchmark("bench_train_step")


def test_share_of_step_from_the_rows(tmp_path):
    # In a child process: backward in this one would break the fork-started workers of tests/test_ddp.py.
    command = [sys.executable, str(BENCHMARKS / "bench_train_step.py"), "--sizes", "tiny", "--batches", "4"]
    command += ["--repeats", "1", "--providers", "fused,reference", "--precision", "bf16", "--device", "cpu"]
    run = subprocess.run([*command, "--out", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
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
