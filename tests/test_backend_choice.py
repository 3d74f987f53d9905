"""backend="auto" on a GPU follows the measured choices of msa/ops/backend_choices.json (per card, dtype, size and
use), and benchmarks/bench_backends.py builds and merges that table. No GPU needed: the card name is faked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import import_benchmark

import msa.ops.mscmat as mscmat_module
from msa.ops import backend_choice, resolve_backend
from msa.ops.backend_choice import load_choices, measured_choice, nearest_choice

CARD = "Test GPU 80GB"
SMALL, LARGE = 128 * 128 * 32 * 12 * 64, 4096 * 4096 * 32 * 12 * 64
TABLE = {
    CARD: {
        "measured": "git 0000000, synthetic",
        "bfloat16": {"inference": [[SMALL, "cuda"], [LARGE, "triton"]], "training": [[SMALL, "triton"]]},
        "float32": {"inference": [[SMALL, "cuda"]]},
    }
}
CUDA0 = torch.device("cuda", 0)
BOTH = ["triton", "cuda", "reference"]


@pytest.fixture
def fake_card(monkeypatch):
    monkeypatch.setattr(backend_choice, "_device_name", lambda index: CARD)
    monkeypatch.setattr(backend_choice, "_CHOICES", TABLE)


def test_nearest_on_a_log_scale():
    points = [[1_000, "cuda"], [1_000_000, "triton"]]
    assert nearest_choice(points, 20_000) == "cuda"  # 20x above 1e3, 50x below 1e6
    assert nearest_choice(points, 40_000) == "triton"
    assert nearest_choice(points, 0) == "cuda"


def test_measured_choice_per_dtype_size_and_use(fake_card):
    assert measured_choice(CUDA0, torch.bfloat16, SMALL, False, BOTH) == "cuda"
    assert measured_choice(CUDA0, torch.bfloat16, LARGE, False, BOTH) == "triton"
    assert measured_choice(CUDA0, torch.bfloat16, SMALL, True, BOTH) == "triton"
    assert measured_choice(CUDA0, torch.float16, SMALL, False, BOTH) == "cuda"  # bfloat16's measurements
    assert measured_choice(CUDA0, torch.float32, LARGE, False, BOTH) == "cuda"
    assert measured_choice(CUDA0, torch.float32, SMALL, True, BOTH) is None  # fp32 training not measured
    assert measured_choice(CUDA0, torch.bfloat16, SMALL, False, ["triton", "reference"]) is None  # cuda not built
    assert measured_choice(torch.device("cpu"), torch.bfloat16, SMALL, False, BOTH) is None


def test_float32_with_tf32_sets_the_measurements_aside(fake_card, set_tf32):
    """The float32 measurements were taken with TF32 off, and only the Triton kernels multiply in TF32: with TF32 on,
    float32 calls keep the default order; other dtypes still follow the table."""
    set_tf32(True)
    assert measured_choice(CUDA0, torch.float32, LARGE, False, BOTH) is None
    assert measured_choice(CUDA0, torch.bfloat16, SMALL, False, BOTH) == "cuda"
    set_tf32(False)
    assert measured_choice(CUDA0, torch.float32, LARGE, False, BOTH) == "cuda"


def test_tf32_allowed_reads_either_torch_api():
    """torch >= 2.9's fp32_precision (global or for CUDA matmuls), after which reading the legacy allow_tf32 raises,
    and the legacy allow_tf32 itself."""
    from msa._tf32 import tf32_allowed

    matmul = torch.backends.cuda.matmul
    if not hasattr(torch.backends, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has no fp32_precision")
    saved = torch.backends.fp32_precision, matmul.fp32_precision
    try:
        torch.backends.fp32_precision = "tf32"
        assert tf32_allowed()
        torch.backends.fp32_precision, matmul.fp32_precision = "none", "ieee"
        assert not tf32_allowed()
        torch.backends.fp32_precision, matmul.fp32_precision = "none", "none"
        matmul.allow_tf32 = True
        assert tf32_allowed()
        matmul.allow_tf32 = False
        assert not tf32_allowed()
    finally:
        torch.backends.fp32_precision, matmul.fp32_precision = saved


def test_unmeasured_card_keeps_the_default_order(monkeypatch):
    monkeypatch.setattr(backend_choice, "_device_name", lambda index: "Another GPU")
    monkeypatch.setattr(backend_choice, "_CHOICES", TABLE)
    assert measured_choice(CUDA0, torch.bfloat16, SMALL, False, BOTH) is None


def test_auto_resolves_to_the_measured_backend(fake_card, monkeypatch):
    monkeypatch.delenv("MSA_BACKEND", raising=False)
    monkeypatch.setattr(mscmat_module, "available_backends", lambda device: BOTH)
    monkeypatch.setattr(mscmat_module, "backend_available", lambda name, device: name in BOTH)
    assert resolve_backend("auto", "cuda:0", dtype=torch.bfloat16, work=SMALL) == "cuda"
    assert resolve_backend("auto", "cuda:0", dtype=torch.bfloat16, work=SMALL, training=True) == "triton"
    assert resolve_backend("auto", "cuda:0") == "triton"  # no call details: the default order
    monkeypatch.setenv("MSA_BACKEND", "triton")  # the environment still overrides auto
    assert resolve_backend("auto", "cuda:0", dtype=torch.bfloat16, work=SMALL) == "triton"


def test_shipped_table_is_valid():
    assert backend_choice.CHOICES_FILE.is_file()  # installed beside the module (package data), not only in git
    table = load_choices()
    for entry in table.values():
        assert "measured" in entry


@pytest.mark.parametrize(
    "entry",
    [
        {"bfloat16": {"inference": [[100, "cpu"]]}},  # not a GPU backend
        {"bfloat16": {"serving": [[100, "cuda"]]}},  # unknown use
        {"bfloat16": {"inference": [[0, "cuda"]]}},  # work must be positive
    ],
)
def test_bad_tables_are_refused(tmp_path, entry):
    path = tmp_path / "choices.json"
    path.write_text(json.dumps({CARD: {"measured": "x", **entry}}))
    with pytest.raises(ValueError, match="bad entry"):
        load_choices(path)


@pytest.fixture(scope="module")
def bench_backends():
    return import_benchmark("bench_backends")


def rows_for(faster_small: str, faster_large: str) -> list[dict]:
    def row(size, faster):
        work = size * size * 32 * 12 * 64
        return {"dtype": "bfloat16", "use": "inference", "size": size, "work": work, "faster": faster}

    return [row(4096, faster_large), row(128, faster_small)]


def test_table_from_rows_and_merge(bench_backends, tmp_path):
    env = {"device": CARD, "git_sha": "abc1234", "torch": "2.11", "triton": "3.6.0", "date": "2026-11-28"}
    table = bench_backends.choice_table(rows_for("cuda", "triton"), env)
    assert table[CARD]["bfloat16"] == {"inference": [[SMALL, "cuda"], [LARGE, "triton"]]}  # sorted by work
    path = tmp_path / "choices.json"
    path.write_text(json.dumps({"Old GPU": {"measured": "y", "float32": {"inference": [[5, "cuda"]]}}}))
    merged = bench_backends.merge_into(path, table)
    assert set(merged) == {"Old GPU", CARD}
    # A later run of the same card replaces the uses it measured and keeps the others.
    path_table = {CARD: {"measured": "z", "bfloat16": {"training": [[SMALL, "cuda"]]}}}
    merged = bench_backends.merge_into(path, path_table)
    assert merged[CARD]["bfloat16"]["inference"] == [[SMALL, "cuda"], [LARGE, "triton"]]
    assert merged[CARD]["bfloat16"]["training"] == [[SMALL, "cuda"]]
    assert merged[CARD]["measured"] == "z"
    assert load_choices(path) == merged


def test_install_cli(bench_backends, tmp_path, monkeypatch, capsys):
    target = tmp_path / "backend_choices.json"
    target.write_text("{}\n")
    monkeypatch.setattr(bench_backends, "CHOICES_FILE", target)
    env = {"device": CARD, "git_sha": "abc1234", "torch": "2.11", "triton": "3.6.0", "date": "2026-11-28"}
    result = tmp_path / "backend_choice.json"
    result.write_text(json.dumps({"rows": [], "table": bench_backends.choice_table(rows_for("cuda", "cuda"), env)}))
    assert bench_backends.main(["--install", str(result)]) == 0
    assert load_choices(target)[CARD]["bfloat16"]["inference"] == [[SMALL, "cuda"], [LARGE, "cuda"]]
    with pytest.raises(SystemExit) as exit_info:
        bench_backends.main(["--install", str(tmp_path / "missing.json")])
    assert exit_info.value.code == 2
    assert "--install" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="measures for real on a GPU")
def test_measuring_needs_a_gpu(bench_backends, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_backends.main(["--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "needs a CUDA device" in capsys.readouterr().err


TRACE_CHECK = f"""
import torch
from msa.ops import backend_choice

backend_choice._device_name = lambda index: {CARD!r}
backend_choice._CHOICES = {TABLE!r}


def shifted(x, work):
    choice = backend_choice.measured_choice(torch.device("cuda", 0), torch.bfloat16, work, False, {BOTH!r})
    return x + (1.0 if choice == "cuda" else 2.0)


compiled = torch.compile(shifted, fullgraph=True, backend="eager")
assert compiled(torch.zeros(2), {SMALL}).tolist() == [1.0, 1.0]
assert compiled(torch.zeros(2), {LARGE}).tolist() == [2.0, 2.0]
"""


def test_choice_traces_under_torch_compile():
    """torch.compile(fullgraph=True) of a model calling mscmat_scores on a GPU traces through the choice. In a child
    process: torch.compile here would break the fork-started workers of tests/test_ddp.py."""
    run = subprocess.run([sys.executable, "-c", TRACE_CHECK], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


MEASURE_CHECK = """
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import bench_backends as bench

rows = [bench.measure("float32", use, 16, 3, torch.device("cpu"), ("cpu", "reference")) for use in bench.USES]
env = {"device": "CPU", "git_sha": "x", "torch": torch.__version__, "triton": None, "date": "today"}
print(json.dumps({"rows": rows, "table": bench.choice_table(rows, env), "markdown": bench.markdown(rows, env)}))
"""


def test_measure_times_two_backends_side_by_side():
    """The measuring code itself, with the CPU kernel and the reference standing in for the two GPU backends (in a
    child process: the training rows run backward)."""
    from msa.ops import backend_available

    if not backend_available("cpu", "cpu"):
        pytest.skip("msa._C is not built: no CPU kernel to time")
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    run = subprocess.run([sys.executable, "-c", MEASURE_CHECK, str(benchmarks)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for row, use in zip(result["rows"], ("inference", "training")):
        assert row["use"] == use and row["work"] == 16 * 16 * 32 * 12 * 64
        medians = row["median_ms"]
        assert set(medians) == {"cpu", "reference"} and all(ms > 0 for ms in medians.values())
        assert row["faster"] == min(medians, key=medians.get)
        low, median, high = row["ratio"]
        assert 0 < low <= median <= high
    assert set(result["table"]["CPU"]["float32"]) == {"inference", "training"}
    assert "| float32 | training | 16 |" in result["markdown"]
