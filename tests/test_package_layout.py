"""The source tree's layout: the Triton sources in the top-level kernels/ folder are the package msa.kernels and
nothing else. A top-level package named `kernels` would shadow Hugging Face's `kernels`, which transformers
probes for (BERT then fails to import when a program runs from the repository root)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_triton_kernels

REPO = Path(__file__).resolve().parents[1]


def run_from_repository_root(code: str) -> str:
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip()


def test_kernels_folder_is_no_top_level_package():
    """From the repository root `kernels` is at most an empty namespace: no file of ours runs as `kernels`."""
    found = run_from_repository_root(
        "import importlib.util; spec = importlib.util.find_spec('kernels'); "
        "print('none' if spec is None else f'{spec.origin}|{spec.loader}')"
    )
    assert found in ("none", "None|None"), found
    assert not (REPO / "kernels" / "__init__.py").exists()


def test_bert_imports_from_repository_root():
    pytest.importorskip("transformers")
    printed = run_from_repository_root(
        "import transformers.models.bert\n"
        "from transformers import BertModel\n"
        "from transformers.utils import import_utils\n"
        "print(BertModel.__name__, import_utils.is_kernels_available())"
    )
    assert printed == "BertModel False", printed


def test_triton_sources_import_nothing_from_msa_ops():
    """msa.ops loads msa.kernels for the "triton" backend; the kernels must not import msa.ops back."""
    for path in sorted((REPO / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("msa.ops"), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not any(alias.name.startswith("msa.ops") for alias in node.names), path.name


def test_msa_kernels_is_found_where_msa_is():
    require_triton_kernels()
    printed = run_from_repository_root(
        "import msa.kernels.mscmat_triton as m, msa; print(hasattr(m, 'mscmat_scores_triton'))"
    )
    assert printed == "True"
