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


def test_each_case_is_written_when_it_ends(bench_train_step, monkeypatch, tmp_path):
    """A run cut after its first case (the device check's phase limit) keeps that case's rows on disk."""
    import torch

    def fake_mscmat(model, provider, images, texts, precision):
        return lambda: torch.ones(2, 2)

    def failing_step(model, provider, batch, precision):
        def call():
            raise RuntimeError("cut by the time limit")

        return call

    monkeypatch.setattr(bench_train_step, "leaf_features", lambda model, batch: (None, None))
    monkeypatch.setattr(bench_train_step, "mscmat_call", fake_mscmat)
    monkeypatch.setattr(bench_train_step, "step_call", failing_step)
    argv = ["--sizes", "tiny", "--batches", "2", "--providers", "fused", "--device", "cpu", "--repeats", "1"]
    with pytest.raises(RuntimeError, match="cut by the time limit"):
        bench_train_step.main([*argv, "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench_train_step.json").read_text())
    assert [(row["mode"], row["provider"]) for row in rows] == [("mscmat", "fused")]
    assert "| tiny | 2 |" in (tmp_path / "bench_train_step.md").read_text()
