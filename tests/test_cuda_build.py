"""setup.py's nvcc architecture flags: TORCH_CUDA_ARCH_LIST keeps its meaning, and machine code for compute
capability 9.0 is built for sm_90a (where wgmma and setmaxnreg exist) when the toolkit knows that target."""

from __future__ import annotations

import runpy
import shutil
import subprocess
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parent.parent
SM90 = "-gencode=arch=compute_90,code=sm_90"
SM90A = "-gencode=arch=compute_90a,code=sm_90a"


@pytest.fixture
def setup_module(monkeypatch) -> dict:
    """setup.py's functions, without running setup()."""
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    monkeypatch.setenv("MSA_SKIP_CUDA_BUILD", "1")
    return runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")


def arch_flags(module: dict, monkeypatch, arch_list: str, knows_sm90a: bool) -> list[str]:
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    arch_flags_of_setup = module["_cuda_arch_flags"]
    monkeypatch.setitem(arch_flags_of_setup.__globals__, "_nvcc_knows_sm90a", lambda: knows_sm90a)
    return arch_flags_of_setup()


def test_hopper_machine_code_is_sm90a(setup_module, monkeypatch):
    flags = arch_flags(setup_module, monkeypatch, "8.0;9.0", knows_sm90a=True)
    assert SM90A in flags and SM90 not in flags
    assert "-gencode=arch=compute_80,code=sm_80" in flags


def test_ptx_stays_portable_compute_90(setup_module, monkeypatch):
    flags = arch_flags(setup_module, monkeypatch, "9.0+PTX", knows_sm90a=True)
    assert sorted(flags) == sorted([SM90A, "-gencode=arch=compute_90,code=compute_90"])


def test_other_architectures_and_old_toolkits_are_untouched(setup_module, monkeypatch):
    assert arch_flags(setup_module, monkeypatch, "8.0;8.6", knows_sm90a=True) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_86,code=sm_86",
    ]
    assert SM90 in arch_flags(setup_module, monkeypatch, "9.0", knows_sm90a=False)


def test_toolkit_probe_with_the_real_nvcc(setup_module, monkeypatch):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on PATH")
    # nvcc on PATH may be a wrapper: the toolkit is the TOP its dry run names.
    dry = subprocess.run(
        [nvcc, "--dryrun", "-c", "-x", "cu", "/dev/null", "-o", "/dev/null"], capture_output=True, text=True
    )
    tops = [line.split("=", 1)[1] for line in dry.stderr.splitlines() if line.startswith("#$ TOP=")]
    if not tops:
        pytest.skip("nvcc --dryrun names no toolkit folder")
    probe = setup_module["_nvcc_knows_sm90a"]
    monkeypatch.setitem(probe.__globals__, "CUDA_HOME", str(Path(tops[0]).resolve()))
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    knows = probe()
    if "release 12." in version or "release 13." in version:
        assert knows, "CUDA 12 and 13 compile for sm_90a"
